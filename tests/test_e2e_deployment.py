"""End to end: the same app on the Deployment Engine, a SuperLink and two SuperNodes."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from harness import mountns
from harness.attacks import ATTACKS_CLIENT_APP
from harness.deployment import Deployment
from harness.flower_processes import (
    LocalFederation,
    copy_app,
    pairs,
    started_run_id,
    trained_rounds,
    wait_until,
)
from harness.sent_log import SENT_LOG_CLIENT_APP, read_sent_log
from harness.wandb_offline import read_offline_run
from pytorch_example.config import DataSource, Partitioning
from pytorch_example.data_cache import IDX_FILES
from pytorch_example.node_data import export

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
        tmp_path, idx_dataset, nodes, **{"num-server-rounds": 4, "max-failed-rounds": 1, "use-wandb": True}
    )
    assert record["status"] == "finished:failed", log
    details = record["status-details"]
    assert "1 round(s) in a row trained nothing" in details
    assert "node config partition-id=5 num-partitions=2: partition 5 does not exist" in details
    [run_dir] = [path for path in (tmp_path / "outputs").glob("*/*") if path.is_dir()]
    results = trained_rounds(run_dir / "results.json")
    assert [entry["train_metrics_clientapp"] for entry in results] == [{}]
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
            return sum(len(trained_rounds(path)) for path in output_dir.glob("*/*/results.json"))

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
    results = trained_rounds(results_file)
    assert [entry["round"] for entry in results] == [1, 2, 3, 4]
    # The dead node's messages came back as errors; the others' replies were aggregated.
    assert results[1]["replies"]["train"]["failed"] >= 1 and results[1]["train_metrics_clientapp"]
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
    results = trained_rounds(run_dir / "results.json")
    for entry in results:
        assert entry["replies"]["train"] == {
            "expected": 2, "received": 2, "failed": 0, "dropped": 1, "clipped": 0, "capped": 0
        }  # fmt: skip
        assert entry["train_metrics_clientapp"] and math.isfinite(entry["evaluate_metrics_serverapp"]["loss"])
    privacy = [entry["privacy"] for entry in results]
    assert [spent["releases"] for spent in privacy] == [1, 2]
    assert 0 < privacy[0]["epsilon"] < privacy[1]["epsilon"]
    assert "left out the train reply of node" in log and "holds NaN or Inf" in log
    for value in torch.load(run_dir / "final_model.pt", weights_only=True).values():
        assert torch.isfinite(value).all()


def rounds_landed(output_dir: Path) -> list[int]:
    results = list(output_dir.glob("*/*/results.json"))
    return [entry["round"] for entry in trained_rounds(results[0])] if results else []


@pytest.mark.skipif(not mountns.available(), reason="needs root and util-linux's unshare")
def test_supernodes_holding_only_their_own_data_run_stop_and_resume(idx_dataset, tmp_path):
    """Two SuperNodes, each on a filesystem of its own (a mount namespace): the server's
    data, cache, outputs and federation folder hidden, its own HOME and Flower home, and
    its exported partition at a path the server never names. The SuperLink's machine
    holds the test set only. A run is stopped after round 1 and resumed: every round
    lands once, each client restores its own head, and no message names a server path."""
    server_data, server_cache, outputs = (
        tmp_path / "server-data",
        tmp_path / "server-cache",
        tmp_path / "outputs",
    )
    server_data.mkdir()
    for name in IDX_FILES["test"]:
        shutil.copy(idx_dataset / name, server_data / name)
    # Whoever holds all of the data hands each member its own partition, once.
    source = DataSource("zalando-datasets/fashion_mnist", idx_dataset, tmp_path / "export-cache")
    exported = export(source, Partitioning(2, 1.0, 42, 0.2), tmp_path / "exported")
    deployment = Deployment(tmp_path / "superlink")
    outputs.mkdir()
    hidden = [
        deployment.root,
        server_data,
        outputs,
        tmp_path / "exported",
        tmp_path / "export-cache",
        idx_dataset,
    ]
    machines = {}
    try:
        deployment.up("--nodes", "0")
        server_cache.mkdir()
        hidden.append(server_cache)
        for index, name in enumerate(["node-a", "node-b"]):
            machine = machines[name] = tmp_path / name
            key = deployment.enrol(machine, name)
            shutil.move(exported[index], machine / "data")
            for folder in ("home", "flwr-home"):
                (machine / folder).mkdir()
            deployment.start_stranger(
                name,
                *("--root-certificates", str(machine / "ca.pem"), "--auth-supernode-private-key", str(key)),
                node_config=f"dataset-path='{machine / 'data'}'",
                env={"HOME": str(machine / "home"), "FLWR_HOME": str(machine / "flwr-home")},
                hidden=hidden,
            )
        deployment.wait_until_connected(2)

        app = copy_app(tmp_path / "app", client_app=SENT_LOG_CLIENT_APP)
        run_config = {
            "num-server-rounds": 3,
            "fraction-train": 1.0,
            "fraction-evaluate": 1.0,
            "dataset-path": str(server_data),
            "data-cache-dir": str(server_cache),
            "output-dir": str(outputs),
            "use-wandb": False,
        }
        started = deployment.flwr("run", ".", "local-deployment", "--run-config", pairs(run_config), cwd=app)
        run_id = started_run_id(started.stdout + started.stderr)
        wait_until(lambda: rounds_landed(outputs), timeout_s=300)
        stopped = deployment.flwr("stop", run_id, "local-deployment", cwd=app)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        [run_dir] = [path for path in outputs.glob("*/*") if path.is_dir()]
        resumed = {**run_config, "resume-from": str(run_dir)}
        done = deployment.flwr(
            "run", ".", "local-deployment", "--stream", "--run-config", pairs(resumed), cwd=app, timeout=600
        )
        listing = deployment.flwr("ls", "local-deployment", "--format", "json", cwd=app)
        runs = {run["run-id"]: run for run in json.loads(listing.stdout)["runs"]}
        resumed_id = started_run_id(done.stdout + done.stderr)
    finally:
        deployment.close()
    assert runs[resumed_id]["status"] == "finished:completed", runs[resumed_id]
    [results_file] = outputs.glob("*/*/results.json")
    results = trained_rounds(results_file)
    assert [entry["round"] for entry in results] == [1, 2, 3], done.stdout + done.stderr
    # Every round trained and evaluated on both SuperNodes' own rows.
    assert all(
        entry["replies"]["train"]["received"] == 2 and entry["train_metrics_clientapp"] for entry in results
    )
    assert all(entry["replies"]["evaluate"]["dropped"] == 0 for entry in results)
    server_paths = [str(path) for path in (server_data, server_cache, outputs, deployment.root, idx_dataset)]
    for name, machine in machines.items():
        own_cache = machine / "home" / ".cache" / "pytorch-example"
        log = (deployment.root / f"{name}.log").read_text()
        # After the resume each client's first message found no head in memory: it read its own.
        assert f"Restored this client's head from {own_cache / 'heads'}" in log, log[-3000:]
        received = [line["received-config"] for line in read_sent_log(own_cache)]
        assert received and not [
            (key, value) for config in received for key, value in config.items()
            if any(path in str(value) for path in server_paths)
        ]  # fmt: skip
