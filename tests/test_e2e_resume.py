"""End to end: a run whose SuperLink is SIGKILLed mid-run, resumed in its own folder."""

import re
import time

import pytest

from harness.flower_processes import LocalFederation, copy_app, trained_rounds
from harness.wandb_offline import read_offline_run

pytestmark = pytest.mark.e2e


def completed_rounds(output_dir) -> list[int]:
    for results_file in output_dir.glob("*/*/results.json"):
        return [entry["round"] for entry in trained_rounds(results_file)]
    return []


def test_a_killed_run_resumes_with_every_round_exactly_once(idx_dataset, tmp_path):
    output_dir = tmp_path / "outputs"
    run_config = {
        "num-server-rounds": 5,
        "lr-decay-rounds": "4",
        "fraction-train": 0.5,
        "fraction-evaluate": 1.0,
        "dataset-path": str(idx_dataset),
        "data-cache-dir": str(tmp_path / "cache"),
        "output-dir": str(output_dir),
    }
    app_dir = copy_app(tmp_path / "app")
    crashed = LocalFederation(tmp_path / "crashed")
    try:
        crashed.submit(app_dir, run_config, {"num-supernodes": 4})
        deadline = time.monotonic() + 300
        while len(completed_rounds(output_dir)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        crashed.kill()
    before = completed_rounds(output_dir)
    assert 2 <= len(before) < 5, before
    [run_dir] = [path for path in output_dir.glob("*/*") if path.is_dir()]

    # README's command: `resume-from` and where the data lies (its ClientApps read that
    # from this command; without it the resume is refused: test_outputs); the rest comes
    # from the folder's config.json.
    resumed = LocalFederation(tmp_path / "resumed")
    try:
        where = {key: run_config[key] for key in ("dataset-path", "data-cache-dir")}
        log, record = resumed.run(app_dir, {"resume-from": str(run_dir), **where}, {"num-supernodes": 4})
    finally:
        resumed.stop()
    assert record["status"] == "finished:completed", log
    assert f"Resuming with the settings in {run_dir / 'config.json'}: num-server-rounds=5" in log
    # Nothing of the killed run went on: it left off where results.json said it had.
    assert f"Resuming {run_dir} after round {len(before)} of 5" in log
    # Clients that trained before the crash go on with their own heads, from their disk,
    # said in one line, not one per client.
    kept = re.search(r"Each client restores its own head as it is first sampled: (\d) of 4 kept", log)
    assert kept and int(kept.group(1)) > 0, log[-3000:]
    assert "Restored this client's head" not in log
    results = trained_rounds(run_dir / "results.json")
    assert [entry["round"] for entry in results] == [1, 2, 3, 4, 5]
    assert [entry["learning_rate"] for entry in results] == [0.02, 0.02, 0.02, 0.01, 0.01]
    # The best-checkpoint logic kept its best across the crash: each one beats all before it.
    accuracies = [entry["evaluate_metrics_serverapp"]["accuracy"] for entry in results]
    best = [float(path.stem.split("_acc_")[1]) for path in sorted(run_dir.glob("best_model_round_*.pt"),
            key=lambda path: int(path.name.split("_")[3]))]  # fmt: skip
    assert best == sorted(set(best)) and best[-1] == pytest.approx(max(accuracies), abs=1e-4)
    assert (run_dir / "final_model.pt").exists()
    # W&B goes on with the same run: two offline folders, one run id.
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and len({path.name.rsplit("-", 1)[1] for path in wandb_runs}) == 1
    assert read_offline_run(wandb_runs[-1]).exit_code == 0
