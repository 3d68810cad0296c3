"""The local Ray of a run without ``cluster.address``: private to the run, found by its own processes.

Used by ``cluster/train.py`` ``connect_ray``. Kept free of heavy imports: Ray imports this module
in every worker process of a local Ray (:func:`quiet_ray_train` is their setup hook).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
from contextlib import contextmanager


def secure_local_ray() -> None:
    """Token authentication for the local Ray this process starts (``cluster.address`` None).

    Ray's GCS, raylet and object manager listen on every interface whatever the node address
    (``ray.init(_node_ip_address="127.0.0.1")`` is mapped back to the host's address), so binding
    to 127.0.0.1 cannot keep other machines out; Ray's token authentication does: a client
    without the token is refused by every Ray server. The token is this process's own
    (``RAY_AUTH_TOKEN``, inherited by the Ray processes it starts), never written to disk, so
    neither another machine nor another user or run on this host can connect to the run's Ray.
    A token or ``RAY_AUTH_MODE`` of the user's own wins.

    Ray reads ``RAY_AUTH_MODE`` once, when first imported, so it is set here only if Ray is not
    imported yet (``stresnet train``: this runs before any Ray import). Otherwise Ray itself turns
    token mode on for a new local cluster when the variable is unset (Ray >= 2.59).
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        return  # the user's explicit choice; connect_ray says what it means
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        if mode is None or "ray" not in sys.modules:  # else Ray may have loaded a token already
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    if "ray" not in sys.modules:
        os.environ["RAY_AUTH_MODE"] = "token"


def free_port() -> int:
    """A TCP port no process listens on now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


@contextmanager
def announced_gcs_port():
    """While starting a local Ray: its GCS port chosen here, ``RAY_ADDRESS`` naming it.

    The Ray processes a local ``ray.init`` starts inherit this environment, and so do the
    workers they start. Ray Train's placement-group cleaner (a detached actor) asks Ray's state
    API for "the" local Ray: without ``RAY_ADDRESS`` it looks for running Ray instances and,
    with another one on the host, dies with "Found multiple active Ray instances". With it, it
    asks this run's Ray. ``RAY_GCS_SERVER_PORT`` makes Ray's head use the port chosen here, so
    the address is known before the processes start. The driver's own environment is restored:
    ``address="local"`` ignores ``RAY_ADDRESS`` anyway, and nothing later in this process should
    follow it to a Ray that has stopped.
    """
    port = free_port()
    saved = {name: os.environ.get(name) for name in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    # 127.0.0.1: Ray maps it to the host's address, where the GCS listens too.
    os.environ.update(RAY_ADDRESS=f"127.0.0.1:{port}", RAY_GCS_SERVER_PORT=str(port))
    try:
        yield port
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# Ray Train's controller asks Ray Data's autoscaling coordinator (a detached actor, started on
# first use) for resources and gives up after 5 s, logging a warning with a traceback, "safe to
# ignore" by its own words. On one host that is never autoscaled, only a loaded machine makes the
# actor's start take that long, and the request changes nothing.
NOISE = ("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",)


def quiet_ray_train() -> None:
    """Setup hook of every process of a local Ray: Ray Train's known non-errors stay unprinted.

    A filter, not a level: Ray Train configures its loggers (``logging.config.dictConfig``) after
    this hook has run, which resets the levels of the ``ray.train`` logger's children but keeps
    their filters.
    """
    for name in NOISE:
        logging.getLogger(name).addFilter(errors_only)


def errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR
