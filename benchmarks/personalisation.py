"""Does a client's own model beat the global model on its own rows, round after round?

    python -m benchmarks.personalisation [--alphas 0.1,0.3,1.0] [--seeds 3] [--rounds 20]
        [--schemes stored-head,refit-head,private-head] [--skewed "learning-rate=0.02" ...]
        [--set "learning-rate=0.02"] [--out personalisation.json]

For each Dirichlet alpha, seed and `personalisation` scheme it runs the app with the
default run-config (12 of 50 simulated SuperNodes train a round, 25 evaluate), but for
`num-server-rounds`, `dirichlet-alpha`, `seed` and the scheme, through the real `flwr
run` on one SuperLink, on a generated Fashion-MNIST-format set (noise 200: hard enough
that no model is perfect). Each `--skewed` adds, at the smallest alpha, a run set of
the default scheme with those run-config settings (candidates for very unlike data);
`--set` changes those settings for every run.

Per alpha and scheme it prints, per round, the mean over seeds of: the clients' own-
model accuracy (`eval_acc`), the global model's on the same rows (`eval_acc_global`),
own minus global in points with its spread over seeds, the share of clients whose own
model wins (`eval_gain_share`), the worst client's own accuracy, and central accuracy;
then a summary: the rounds from 3 on in which the own model's mean is at or above the
global model's, central accuracy at the last round (mean, and its worst seed), and
seconds per round as a ratio to the stored head's. `--out` keeps
every round of every run as JSON.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from harness.flower_processes import (
    LocalFederation,
    RoundLandings,
    copy_app,
    default_run_config,
    trained_rounds,
)
from harness.synthetic_fmnist import write_idx_dataset

FEDERATION = {"num-supernodes": 50, "client-resources-num-cpus": 1}
FIRST_JUDGED_ROUND = 3
BASELINE = "stored-head"


def run_once(federation: LocalFederation, app_dir: Path, work: Path, name: str, settings: dict) -> dict:
    """One run to completion: its results.json rounds and its seconds per round."""
    output_dir = work / "outputs" / name
    run_config = {
        **default_run_config(),
        **settings,
        "dataset-path": str(work / "fmnist-idx"),
        "data-cache-dir": str(work / "cache"),
        "output-dir": str(output_dir),
        "use-wandb": False,
    }
    landings = RoundLandings(output_dir)
    started = time.perf_counter()
    try:
        log, record = federation.run(app_dir, run_config, FEDERATION)
    finally:
        landed = landings.stop()
    if record["status"] != "finished:completed":
        raise RuntimeError(f"{name}: {record['status']} {record.get('status-details')}\n{log[-3000:]}")
    [results_file] = output_dir.glob("*/*/results.json")
    rounds = trained_rounds(results_file)
    # From the first round's landing on: the start-up (data, Ray) is not a round's cost.
    times = [landed[number] for number in sorted(landed)]
    seconds_per_round = (times[-1] - times[0]) / max(len(times) - 1, 1)
    return {"rounds": rounds, "s_per_round": seconds_per_round, "wall_s": time.perf_counter() - started}


def per_round(runs: list[dict], name: str, section: str = "evaluate_metrics_clientapp") -> np.ndarray:
    """`[seed, round]` of one metric."""
    return np.array([[entry[section][name] for entry in run["rounds"]] for run in runs])


def report(label: str, runs: list[dict], baseline_s: float | None) -> dict:
    own, global_model = per_round(runs, "eval_acc"), per_round(runs, "eval_acc_global")
    gain = 100 * (own - global_model)  # own minus global of the weighted means, per seed, in points
    share, worst = per_round(runs, "eval_gain_share"), per_round(runs, "eval_acc_min")
    central = per_round(runs, "accuracy", "evaluate_metrics_serverapp")
    print(f"\n### {label} ({len(runs)} seeds)\n")
    columns = ["round", "own model", "global model", "own - global (points)", "clients that gain"]
    print("| " + " | ".join([*columns, "worst client", "central"]) + " |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for index in range(own.shape[1]):
        print(
            f"| {index + 1} | {own[:, index].mean():.3f} | {global_model[:, index].mean():.3f} | "
            f"{gain[:, index].mean():+.1f} ± {gain[:, index].std():.1f} | {share[:, index].mean():.2f} | "
            f"{worst[:, index].mean():.3f} | {central[:, index].mean():.3f} |"
        )
    judged = slice(FIRST_JUDGED_ROUND - 1, None)
    mean_gain = gain.mean(axis=0)[judged]
    s_per_round = float(np.mean([run["s_per_round"] for run in runs]))
    summary = {
        "rounds_own_at_or_above_global": f"{int((mean_gain >= 0).sum())} of {mean_gain.size}",
        "smallest_mean_gain_points": float(mean_gain.min()),
        "final_own": float(own[:, -1].mean()),
        "final_global": float(global_model[:, -1].mean()),
        "final_gain_points": f"{gain[:, -1].mean():+.1f} ± {gain[:, -1].std():.1f}",
        "final_share_gaining": float(share[:, -1].mean()),
        "final_worst_client": float(worst[:, -1].mean()),
        "final_central": float(central[:, -1].mean()),
        "final_central_worst_seed": float(central[:, -1].min()),
        "best_central": float(central.max(axis=1).mean()),
        "s_per_round": s_per_round,
        "ratio_to_stored_head": s_per_round / baseline_s if baseline_s else None,
    }
    print(f"\n{label}: {json.dumps(summary)}", flush=True)
    return summary


def run_config_pairs(text: str) -> dict:
    """`"learning-rate=0.02 momentum=0.0"` -> `{"learning-rate": 0.02, "momentum": 0.0}`."""
    return {key: json.loads(value) for key, value in (pair.split("=", 1) for pair in text.split())}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--alphas", default="0.1,0.3,1.0")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--schemes", default="stored-head,refit-head,private-head")
    parser.add_argument(
        "--skewed",
        action="append",
        default=[],
        help='run-config pairs, e.g. "learning-rate=0.02"; repeatable',
    )
    parser.add_argument("--set", default="", help='run-config pairs for every run, e.g. "learning-rate=0.02"')
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    alphas = [float(alpha) for alpha in args.alphas.split(",")]
    schemes = args.schemes.split(",")
    common = run_config_pairs(args.set)
    suffix = f", {args.set}" if args.set else ""
    arms = [
        (alpha, scheme + suffix, {**common, "personalisation": scheme})
        for alpha in alphas
        for scheme in schemes
    ]
    for skewed in args.skewed:
        arms.append(
            (
                min(alphas),
                f"refit-head, {skewed}",
                {"personalisation": "refit-head", **run_config_pairs(skewed)},
            )
        )

    everything: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="personalisation-") as tmp:
        work = Path(tmp)
        write_idx_dataset(work / "fmnist-idx", 60_000, 10_000, noise=200.0)
        app_dir = copy_app(work / "app")
        federation = LocalFederation(work / "federation")
        try:
            for alpha, label, settings in arms:
                runs = []
                for seed in range(args.seeds):
                    name = f"alpha{alpha}-{label.split(',')[0]}-{len(everything)}-seed{seed}"
                    run_settings = {
                        **settings,
                        "num-server-rounds": args.rounds,
                        "dirichlet-alpha": alpha,
                        "seed": seed,
                    }
                    runs.append(run_once(federation, app_dir, work, name, run_settings))
                    print(
                        f"{name}: {runs[-1]['s_per_round']:.2f} s/round, {runs[-1]['wall_s']:.0f} s",
                        flush=True,
                    )
                baseline = everything.get(f"alpha {alpha}, {BASELINE}{suffix}", {}).get("summary", {})
                summary = report(f"alpha {alpha}, {label}", runs, baseline.get("s_per_round"))
                everything[f"alpha {alpha}, {label}"] = {"summary": summary, "runs": runs}
                if args.out:
                    args.out.write_text(json.dumps(everything, indent=1))
        finally:
            federation.stop()
    summary_columns = [
        "alpha, scheme",
        "own >= global (rounds 3+)",
        "final own",
        "final global",
        "final own - global (points)",
        "clients that gain",
        "worst client",
        "final central (worst seed)",
        "s/round (x stored-head)",
    ]
    print("\n| " + " | ".join(summary_columns) + " |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, entry in everything.items():
        summary = entry["summary"]
        ratio = summary["ratio_to_stored_head"]
        cells = [
            label,
            summary["rounds_own_at_or_above_global"],
            f"{summary['final_own']:.3f}",
            f"{summary['final_global']:.3f}",
            summary["final_gain_points"],
            f"{summary['final_share_gaining']:.2f}",
            f"{summary['final_worst_client']:.3f}",
            f"{summary['final_central']:.3f} ({summary['final_central_worst_seed']:.3f})",
            f"{summary['s_per_round']:.2f}" + (f" ({ratio:.2f})" if ratio else ""),
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
