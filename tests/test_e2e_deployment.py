"""End to end: the same app on the Deployment Engine, a SuperLink and two SuperNodes."""

import json

from tests.flower_processes import LocalFederation, copy_app


def test_two_supernodes_each_with_half_of_the_data(idx_dataset, tmp_path):
    federation = LocalFederation(
        tmp_path / "deployment",
        node_configs=[{"partition-id": i, "num-partitions": 2} for i in range(2)],
    )
    try:
        log, record = federation.run(
            copy_app(tmp_path / "app"),
            {
                "num-server-rounds": 2,
                "fraction-train": 1.0,
                "fraction-evaluate": 1.0,
                "dataset-path": str(idx_dataset),
                "data-cache-dir": str(tmp_path / "cache"),
                "output-dir": str(tmp_path / "outputs"),
                "use-wandb": False,
            },
        )
    finally:
        federation.stop()
    assert record["status"] == "finished:completed", log
    [results_file] = (tmp_path / "outputs").glob("*/*/results.json")
    results = json.loads(results_file.read_text())
    assert [entry["round"] for entry in results] == [1, 2]
    assert "Sampled 2 nodes (out of 2)" in log
    # Every message ran in a fresh ClientApp process: 2 nodes x 2 rounds x (train, evaluate).
    node_logs = "".join(path.read_text() for path in (tmp_path / "deployment").glob("supernode-*.log"))
    assert node_logs.count("ClientApp process ready for its first batch") == 8
    assert all(process.poll() is not None for process in federation.processes)
