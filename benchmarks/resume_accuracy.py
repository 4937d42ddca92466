"""A killed and resumed run against uninterrupted ones: same rounds, same accuracy?

    python -m benchmarks.resume_accuracy [--repeats 3] [--kill-after 4]

Runs the default run-config (10 rounds, 50 simulated SuperNodes) on a generated,
deliberately hard Fashion-MNIST-format set, `--repeats` times uninterrupted and
`--repeats` times SIGKILLed (the SuperLink's whole process tree) once `--kill-after`
rounds have landed, then resumed with `resume-from`. It prints, for each run, the rounds
in results.json and the final central accuracy, and the mean and spread of each group.
Which clients a round samples differs from run to run, so runs differ anyway: the
question is whether the resumed ones differ more than that.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from harness.flower_processes import LocalFederation, copy_app, default_run_config, trained_rounds
from harness.synthetic_fmnist import write_idx_dataset

FEDERATION = {"num-supernodes": 50, "client-resources-num-cpus": 1}


def rounds_in(output_dir: Path) -> list[dict]:
    for results_file in output_dir.glob("*/*/results.json"):
        return trained_rounds(results_file)
    return []


def uninterrupted(work: Path, run_config: dict) -> list[dict]:
    federation = LocalFederation(work / "federation")
    try:
        _, record = federation.run(copy_app(work / "app"), run_config, FEDERATION)
    finally:
        federation.stop()
    assert record["status"] == "finished:completed", record
    return rounds_in(Path(run_config["output-dir"]))


def killed_and_resumed(work: Path, run_config: dict, kill_after: int) -> list[dict]:
    output_dir = Path(run_config["output-dir"])
    app_dir = copy_app(work / "app")
    crashed = LocalFederation(work / "crashed")
    try:
        crashed.submit(app_dir, run_config, FEDERATION)
        while len(rounds_in(output_dir)) < kill_after:
            time.sleep(0.05)
    finally:
        crashed.kill()
    [run_dir] = [path for path in output_dir.glob("*/*") if path.is_dir()]
    resumed = LocalFederation(work / "resumed")
    try:
        _, record = resumed.run(app_dir, {**run_config, "resume-from": str(run_dir)}, FEDERATION)
    finally:
        resumed.stop()
    assert record["status"] == "finished:completed", record
    return rounds_in(output_dir)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kill-after", type=int, default=4, help="rounds landed before the kill")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="resume-accuracy-") as tmp:
        work = Path(tmp)
        dataset = write_idx_dataset(work / "fmnist-idx", 60_000, 10_000, noise=200.0)
        finals: dict[str, list[float]] = {"uninterrupted": [], "killed and resumed": []}
        for repeat in range(args.repeats):
            for label, run in (("uninterrupted", uninterrupted), ("killed and resumed", killed_and_resumed)):
                name = f"{label.split()[0]}-{repeat}"
                run_config = {
                    **default_run_config(),
                    "dataset-path": str(dataset),
                    "data-cache-dir": str(work / "cache"),
                    "output-dir": str(work / f"out-{name}"),
                    "use-wandb": False,
                }
                extra = (args.kill_after,) if run is killed_and_resumed else ()
                results = run(work / name, run_config, *extra)
                final = results[-1]["evaluate_metrics_serverapp"]["accuracy"]
                finals[label].append(final)
                rounds = [entry["round"] for entry in results]
                print(
                    f"{label:<20} repeat {repeat}: rounds {rounds}, final central accuracy {final:.4f}",
                    flush=True,
                )
        for label, values in finals.items():
            print(f"{label:<20} final central accuracy {np.mean(values):.4f} +- {np.std(values, ddof=1):.4f}")


if __name__ == "__main__":
    main()
