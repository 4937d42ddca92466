"""What each `aggregation` rule and DP noise level costs and buys.

    python -m benchmarks.trust robustness [--rules fedavg,trimmed-mean,...] [--attacks
        clean,scaled,sign-flip,label-flip,gaussian] [--fractions 0.2,0.1] [--rounds 5]
        [--seeds 1] [--out trust-robustness.json]
    python -m benchmarks.trust privacy [--noise 0,0.5,1,2] [--clipping-norms 1.0,0.1]
        [--rounds 30] [--report 10,30]
    python -m benchmarks.trust cost [--replies 12,125,500]

- robustness: runs the app through the real `flwr run` (50 simulated SuperNodes, 12
  sampled a round, the default run-config but for `aggregation`, `num-malicious` and the
  rounds; federated evaluation off: central accuracy is the measure) with the harness's
  attacks ClientApp, the first `fraction` x 50 partitions attacking, on generated
  Fashion-MNIST-format data (noise 200). Prints final central accuracy per rule and
  attack, beside the clean run.
- privacy: the same runs, without attackers, at each `dp-noise-multiplier` (0: DP off)
  and `dp-clipping-norm`, printing central accuracy and epsilon (at the default
  `dp-delta`, 1e-5) at the `--report` rounds, and how each run ended.
- cost: times one `aggregate_train` of each rule in this process, on that many replies
  of this app's model (80,202 weights); 12, 125 and 500 are what fraction-train 0.25
  samples from 50, 500 and 2,000 SuperNodes.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from harness.attacks import ATTACK_RUN_CONFIG, ATTACKS_CLIENT_APP
from harness.flower_processes import LocalFederation, copy_app, default_run_config
from harness.synthetic_fmnist import write_idx_dataset
from pytorch_example.config import AGGREGATIONS, AppConfig
from pytorch_example.task import Net
from pytorch_example.trust import EQUAL_WEIGHT_KEY, build_strategy

FEDERATION = {"num-supernodes": 50, "client-resources-num-cpus": 1}
# At most 2 of the 12 sampled replies may be malicious: Bulyan's limit (4f + 3 <= 12).
NUM_MALICIOUS = 2


def run_once(
    federation: LocalFederation,
    app_dir: Path,
    work: Path,
    name: str,
    settings: dict,
    must_complete: bool = True,
) -> tuple[list[dict], str]:
    """One run to its end: its results.json rounds and how it ended (with why, if failed)."""
    output_dir = work / "outputs" / name
    run_config = {
        **default_run_config(),
        "fraction-evaluate": 0.0,
        "num-malicious": NUM_MALICIOUS,
        **settings,
        "dataset-path": str(work / "fmnist-idx"),
        "data-cache-dir": str(work / "cache"),
        "output-dir": str(output_dir),
        "use-wandb": False,
    }
    started = time.perf_counter()
    log, record = federation.run(app_dir, run_config, FEDERATION)
    status = record["status"]
    if status != "finished:completed":
        status = f"{status}: {record.get('status-details')}"
        if must_complete:
            raise RuntimeError(f"{name}: {status}\n{log[-3000:]}")
    results_files = list(output_dir.glob("*/*/results.json"))
    rounds = json.loads(results_files[0].read_text()) if results_files else []
    curve = " ".join(f"{entry['evaluate_metrics_serverapp']['accuracy']:.3f}" for entry in rounds)
    print(
        f"{name}: {time.perf_counter() - started:.0f} s, {status}, central accuracy by round: {curve}",
        flush=True,
    )
    return rounds, status


def central(rounds: list[dict], server_round: int) -> float:
    return rounds[server_round - 1]["evaluate_metrics_serverapp"]["accuracy"]


def robustness(args, federation: LocalFederation, app_dir: Path, work: Path) -> dict:
    rules, attacks = args.rules.split(","), args.attacks.split(",")
    fractions = [float(fraction) for fraction in args.fractions.split(",")]
    table: dict[str, dict[str, list[float]]] = {rule: {} for rule in rules}
    for fraction in fractions:
        for attack in attacks:
            if attack == "clean" and fraction != fractions[0]:
                continue
            column = "clean" if attack == "clean" else f"{attack} {fraction:.0%}"
            for rule in rules:
                accuracies = []
                for seed in range(args.seeds):
                    settings = {"aggregation": rule, "num-server-rounds": args.rounds, "seed": seed}
                    if attack != "clean":
                        settings |= {"attack": attack, "attack-fraction": fraction}
                    name = f"{rule}-{column}-{seed}".replace(" ", "")
                    rounds, _ = run_once(federation, app_dir, work, name, settings)
                    accuracies.append(central(rounds, args.rounds))
                table[rule][column] = accuracies
                if args.out:
                    args.out.write_text(json.dumps(table, indent=1))
    columns = list(next(iter(table.values())))
    print(f"\nFinal central accuracy after {args.rounds} rounds ({args.seeds} seed(s) each)\n")
    print("| aggregation | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for rule, row in table.items():
        print(f"| {rule} | " + " | ".join(f"{np.mean(row[column]):.3f}" for column in columns) + " |")
    return table


def privacy(args, federation: LocalFederation, app_dir: Path, work: Path) -> dict:
    """Each noise level at each clipping norm (noise 0: DP off, once); a run whose model
    DP noise wrecks fails (its clients diverge to NaN), and the table says so."""
    levels = [float(level) for level in args.noise.split(",")]
    norms = [float(norm) for norm in args.clipping_norms.split(",")]
    report_rounds = [int(server_round) for server_round in args.report.split(",")]
    arms = [(level, norm) for level in levels for norm in (norms if level > 0 else norms[:1])]
    table = {}
    for level, norm in arms:
        settings = {"num-server-rounds": args.rounds, "dp-noise-multiplier": level, "dp-clipping-norm": norm}
        rounds, status = run_once(
            federation, app_dir, work, f"dp-{level}-{norm}", settings, must_complete=False
        )
        row = {"status": status}
        for server_round in report_rounds:
            if server_round <= len(rounds):
                entry = rounds[server_round - 1]
                row[server_round] = {
                    "central": entry["evaluate_metrics_serverapp"]["accuracy"],
                    "epsilon": entry.get("privacy", {}).get("epsilon"),
                }
        table[f"{level:g}, {norm:g}" if level > 0 else "0 (DP off)"] = row
        if args.out:
            args.out.write_text(json.dumps(table, indent=1))
    header = " | ".join(f"round {r}: central | round {r}: epsilon" for r in report_rounds)
    print(f"\nCentral accuracy and epsilon at delta {AppConfig().dp_delta:g}\n")
    print(f"| dp-noise-multiplier, dp-clipping-norm | {header} | how the run ended |")
    print("| --- |" + " ---: | ---: |" * len(report_rounds) + " --- |")
    for arm, row in table.items():
        cells = []
        for server_round in report_rounds:
            if server_round not in row:
                cells += ["-", "-"]
                continue
            epsilon = row[server_round]["epsilon"]
            cells += [f"{row[server_round]['central']:.3f}", "-" if epsilon is None else f"{epsilon:.1f}"]
        print(f"| {arm} | " + " | ".join(cells) + f" | {row['status'][:120]} |")
    return table


def cost(args) -> dict:
    """Seconds of one aggregate_train per rule and reply count, in this process."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        setattr(TaskIdentity, name, value)  # what Flower sets in a ServerApp process
    torch.manual_seed(0)
    model = Net().state_dict()
    table: dict[str, dict[int, float | None]] = {}
    counts = [int(count) for count in args.replies.split(",")]
    for rule in AGGREGATIONS:
        table[rule] = {}
        for count in counts:
            if any(seconds is not None and seconds > args.cap_s for seconds in table[rule].values()):
                table[rule][count] = None  # the previous size already took too long
                continue
            config = AppConfig(aggregation=rule, fraction_train=1.0, num_malicious=NUM_MALICIOUS)
            strategy = build_strategy(config, count)
            replies = []
            for node in range(count):
                message = Message(
                    RecordDict({"arrays": ArrayRecord(model), "config": ConfigRecord()}),
                    dst_node_id=node + 1,
                    message_type="train",
                )
                noisy = {key: value + 0.01 * torch.randn_like(value) for key, value in model.items()}
                content = RecordDict(
                    # As the gate hands them over: rows, and the equal weight robust rules use.
                    {
                        "arrays": ArrayRecord(noisy),
                        "metrics": MetricRecord({"num-examples": 100, EQUAL_WEIGHT_KEY: 1}),
                    }
                )
                replies.append(Message(content, reply_to=message))
            started = time.perf_counter()
            strategy.aggregate_train(1, replies)
            table[rule][count] = time.perf_counter() - started
            print(f"{rule} on {count} replies: {table[rule][count]:.3f} s", flush=True)
    print(
        f"\nSeconds of one aggregate_train (this app's model; '-': not run, "
        f"the size before took > {args.cap_s:g} s)\n"
    )
    print("| aggregation | " + " | ".join(f"{count} replies" for count in counts) + " |")
    print("| --- |" + " ---: |" * len(counts))
    for rule, row in table.items():
        print(f"| {rule} | " + " | ".join("-" if row[c] is None else f"{row[c]:.3f}" for c in counts) + " |")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("part", choices=["robustness", "privacy", "cost"])
    parser.add_argument("--rules", default=",".join(AGGREGATIONS))
    parser.add_argument("--attacks", default="clean,scaled,sign-flip,label-flip,gaussian")
    parser.add_argument("--fractions", default="0.2,0.1")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--noise", default="0,0.5,1,2")
    parser.add_argument("--clipping-norms", default="1.0,0.1")
    parser.add_argument("--report", default="10,30")
    parser.add_argument("--replies", default="12,125,500")
    parser.add_argument("--cap-s", type=float, default=60.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.part == "cost":
        result = cost(args)
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
        return
    args.rounds = args.rounds or (5 if args.part == "robustness" else 30)
    with tempfile.TemporaryDirectory(prefix="trust-") as tmp:
        work = Path(tmp)
        write_idx_dataset(work / "fmnist-idx", 60_000, 10_000, noise=200.0)
        app_dir = copy_app(work / "app", client_app=ATTACKS_CLIENT_APP, extra_config=ATTACK_RUN_CONFIG)
        federation = LocalFederation(work / "federation")
        try:
            (robustness if args.part == "robustness" else privacy)(args, federation, app_dir, work)
        finally:
            federation.stop()


if __name__ == "__main__":
    main()
