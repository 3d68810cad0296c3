"""The ``stresnet`` command, Ray Train driver and workers, MLflow tracking (docs/architecture.md).

MLflow's HTTP client retries a failed request 7 times with a doubling back-off and waits up to
120 s for each answer by default: a tracking server that is down or failing stalled a command
about 4 minutes before its error (issue 13). Bounded here, for every process that imports
``cluster`` (the driver and the Ray workers): ~15 s of retries, 30 s per request. Settings made
in the environment win.
"""

import os

for _name, _value in {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}.items():
    os.environ.setdefault(_name, _value)
