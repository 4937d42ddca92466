"""End to end: the same app on the Deployment Engine, a SuperLink and two SuperNodes."""

import json
from pathlib import Path

import pytest

from harness.flower_processes import LocalFederation, copy_app
from harness.wandb_offline import read_offline_run

pytestmark = pytest.mark.e2e


def run_deployment(tmp_path: Path, idx_dataset: Path, node_configs: list[dict], **run_config):
    """Every node trains and evaluates every round; returns the log, the run record and
    the federation (stopped)."""
    federation = LocalFederation(tmp_path / "deployment", node_configs=node_configs)
    try:
        log, record = federation.run(
            copy_app(tmp_path / "app"),
            {
                "fraction-train": 1.0,
                "fraction-evaluate": 1.0,
                "dataset-path": str(idx_dataset),
                "data-cache-dir": str(tmp_path / "cache"),
                "output-dir": str(tmp_path / "outputs"),
                **run_config,
            },
        )
    finally:
        federation.stop()
    return log, record, federation


def test_two_supernodes_each_with_half_of_the_data(idx_dataset, tmp_path):
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    log, record, federation = run_deployment(
        tmp_path, idx_dataset, nodes, **{"num-server-rounds": 2, "use-wandb": False}
    )
    assert record["status"] == "finished:completed", log
    [results_file] = (tmp_path / "outputs").glob("*/*/results.json")
    results = json.loads(results_file.read_text())
    assert [entry["round"] for entry in results] == [1, 2]
    assert "Sampled 2 nodes (out of 2)" in log
    assert all(process.poll() is not None for process in federation.processes)


def test_a_run_whose_clientapps_all_fail_ends_failed(idx_dataset, tmp_path):
    """Two SuperNodes started with a partition that does not exist: nothing trains."""
    nodes = [{"partition-id": 5, "num-partitions": 2} for _ in range(2)]
    log, record, _ = run_deployment(
        tmp_path, idx_dataset, nodes, **{"num-server-rounds": 4, "max-failed-rounds": 2, "use-wandb": True}
    )
    assert record["status"] == "finished:failed", log
    details = record["status-details"]
    assert "2 round(s) in a row got no valid train reply" in details
    assert "node config partition-id=5 num-partitions=2: partition 5 does not exist" in details
    [run_dir] = [path for path in (tmp_path / "outputs").glob("*/*") if path.is_dir()]
    results = json.loads((run_dir / "results.json").read_text())
    assert [entry["train_metrics"] for entry in results] == [{}, {}]
    assert not (run_dir / "final_model.pt").exists()
    [wandb_run] = (run_dir / "wandb").glob("offline-run-*")
    assert read_offline_run(wandb_run).exit_code == 1
