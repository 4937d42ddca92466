"""End to end: the same app on the Deployment Engine, a SuperLink and two SuperNodes."""

import json
import math
from pathlib import Path

import pytest
import torch

from harness.attacks import ATTACKS_CLIENT_APP
from harness.flower_processes import LocalFederation, copy_app, wait_until
from harness.wandb_offline import read_offline_run

pytestmark = pytest.mark.e2e


def run_deployment(
    tmp_path: Path, idx_dataset: Path, node_configs: list[dict], client_app: str | None = None, **run_config
):
    """Every node trains and evaluates every round; returns the log, the run record and
    the federation (stopped). `client_app` replaces the app's own (see `copy_app`)."""
    federation = LocalFederation(tmp_path / "deployment", node_configs=node_configs)
    try:
        log, record = federation.run(
            copy_app(tmp_path / "app", client_app=client_app),
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


def test_a_run_whose_clientapps_all_fail_ends_failed(idx_dataset, tmp_path):
    """Two SuperNodes started with a partition that does not exist: nothing trains."""
    nodes = [{"partition-id": 5, "num-partitions": 2} for _ in range(2)]
    log, record, _ = run_deployment(
        tmp_path, idx_dataset, nodes, **{"num-server-rounds": 4, "max-failed-rounds": 2, "use-wandb": True}
    )
    assert record["status"] == "finished:failed", log
    details = record["status-details"]
    assert "2 round(s) in a row trained nothing" in details
    assert "node config partition-id=5 num-partitions=2: partition 5 does not exist" in details
    [run_dir] = [path for path in (tmp_path / "outputs").glob("*/*") if path.is_dir()]
    results = json.loads((run_dir / "results.json").read_text())
    assert [entry["train_metrics"] for entry in results] == [{}, {}]
    assert not (run_dir / "final_model.pt").exists()
    [wandb_run] = (run_dir / "wandb").glob("offline-run-*")
    assert read_offline_run(wandb_run).exit_code == 1


def test_a_supernode_killed_mid_run_costs_its_replies_and_comes_back_with_its_head(idx_dataset, tmp_path):
    output_dir = tmp_path / "outputs"
    federation = LocalFederation(
        tmp_path / "deployment", node_configs=[{"partition-id": i, "num-partitions": 3} for i in range(3)]
    )
    try:
        run_id = federation.submit(
            copy_app(tmp_path / "app"),
            {
                "num-server-rounds": 4,
                "fraction-train": 1.0,
                "fraction-evaluate": 1.0,
                "dataset-path": str(idx_dataset),
                "data-cache-dir": str(tmp_path / "cache"),
                "output-dir": str(output_dir),
                "use-wandb": False,
            },
        )

        def rounds_done() -> int:
            return sum(len(json.loads(path.read_text())) for path in output_dir.glob("*/*/results.json"))

        wait_until(lambda: rounds_done() >= 1)
        federation.kill_supernode(1)  # it evaluated in round 1: its refit head is on its disk
        wait_until(lambda: rounds_done() >= 2)
        federation.start_supernode(1, name="supernode-1-restarted")
        wait_until(lambda: federation.status(run_id)["status"].startswith("finished"))
        record = federation.status(run_id)
    finally:
        federation.stop()
    assert record["status"] == "finished:completed", record
    [results_file] = output_dir.glob("*/*/results.json")
    results = json.loads(results_file.read_text())
    assert [entry["round"] for entry in results] == [1, 2, 3, 4]
    # The dead node's messages came back as errors; the others' replies were aggregated.
    assert results[1]["replies"]["train"]["failed"] >= 1 and results[1]["train_metrics"]
    assert results[-1]["replies"]["train"]["failed"] == 0
    restarted_log = (tmp_path / "deployment" / "supernode-1-restarted.log").read_text()
    assert "Restored this client's head from" in restarted_log and "partition-1-of-3.pt" in restarted_log


def test_a_supernode_sending_nan_weights_is_left_out_and_dp_rounds_go_on(idx_dataset, tmp_path):
    """With DP on, the NaN reply is left out and adds a zero update: every round still
    trains, releases once and reports epsilon."""
    nodes = [
        {"partition-id": 0, "num-partitions": 2},
        {"partition-id": 1, "num-partitions": 2, "attack": "nan-weights"},
    ]
    dp = {"dp-noise-multiplier": 2.0, "dp-clipping-norm": 0.01}
    log, record, _ = run_deployment(
        tmp_path,
        idx_dataset,
        nodes,
        client_app=ATTACKS_CLIENT_APP,
        **{"num-server-rounds": 2, "use-wandb": False, **dp},
    )
    assert record["status"] == "finished:completed", log
    [run_dir] = [path for path in (tmp_path / "outputs").glob("*/*") if path.is_dir()]
    results = json.loads((run_dir / "results.json").read_text())
    for entry in results:
        assert entry["replies"]["train"] == {
            "expected": 2, "received": 2, "failed": 0, "dropped": 1, "clipped": 0, "capped": 0
        }  # fmt: skip
        assert entry["train_metrics"] and math.isfinite(entry["evaluate_metrics_serverapp"]["loss"])
    privacy = [entry["privacy"] for entry in results]
    assert [spent["releases"] for spent in privacy] == [1, 2]
    assert 0 < privacy[0]["epsilon"] < privacy[1]["epsilon"]
    assert "left out the train reply of node" in log and "holds NaN or Inf" in log
    for value in torch.load(run_dir / "final_model.pt", weights_only=True).values():
        assert torch.isfinite(value).all()
