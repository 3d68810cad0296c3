"""benchmarks/ablation.py --quick end to end: six models x two seeds, the table and MLflow runs."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_quick_ablation_writes_table_and_child_runs(tmp_path):
    from mlflow import MlflowClient

    from benchmarks.ablation import MODELS, main

    results = tmp_path / "RESULTS.md"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    data = tmp_path / "data"
    assert main([
        "--quick", "--tracking-uri", uri, "--results", str(results),
        f"dataset.root={data}/videos", f"shards.output={data}/shards", f"data.shards={data}/shards",
    ]) == 0

    text = results.read_text()
    assert "<!-- ablation:start -->" in text and "<!-- ablation:end -->" in text
    # One row per model, a column per family with its test videos and chance level.
    for model in MODELS:
        assert f"| `{model}`:" in text
    for header in ("appearance (", "motion (", "conjunction (", "order (", "chance 0.50"):
        assert header in text
    assert "| claim | met | evidence |" in text

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("stresnet-ablation")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == len(MODELS) * 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    child = next(r for r in children if r.data.params["model"] == "full")
    assert "test_fused_top1_conjunction" in child.data.metrics
    assert "full_fused_top1_order_mean" in parents[0].data.metrics
    # Artifacts live next to the database (mlartifacts/), not in the working directory.
    assert child.info.artifact_uri.startswith(str(tmp_path / "mlartifacts"))
    assert {"report.json", "per_family.json"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
