"""What each `aggregation` rule and DP noise level costs and buys.

    python -m benchmarks.trust robustness [--rules fedavg,median,...] [--attacks
        none,scaled,...] [--alphas 0.3,1.0] [--rounds 20] [--seeds 3] [--fraction 0.2]
        [--workers 2] [--out trust-robustness.json]
    python -m benchmarks.trust bound [--seeds 3] [--rounds 10] [--alphas 1.0]
    python -m benchmarks.trust privacy [--noise 0,0.5,1,2] [--clipping-norms 1.0,0.1]
        [--rounds 30] [--report 10,30]
    python -m benchmarks.trust cost [--replies 12,125,500]

- robustness: each rule against each attack, at each `dirichlet-alpha` and seed: 50
  clients, 12 sampled a round, the lowest `fraction` x 50 partition ids attacking
  whenever sampled (harness/attacks.py), `num-malicious=2`, the default run-config
  otherwise, on generated Fashion-MNIST-format data (noise 200). It runs, in this
  process, the app's own round loop, reply gate, strategies and ClientApp, with
  harness/local_grid.py's grid in place of Flower's transport (which changes no
  aggregate: only seconds; the 378 runs of the full grid take about 2 hours this way,
  and would take 6 through `flwr run`). Per cell: central accuracy after the last
  round (mean and worst seed), the share of rounds in which the attack moved the
  model (the aggregate lies further than half a step from the one the same round
  would have given had its attackers sent what they trained honestly), and the rule's
  seconds per aggregation. Cells
  land in `--out` as they finish; a rerun with the same `--out` skips them.
- bound: real `flwr run`s of the default run-config (50 simulated SuperNodes) with the
  gate's bound and without it (`update-norm-bound=0 update-weight-bound=0`), at each
  `dirichlet-alpha`, seed by seed: final central accuracy, seconds a run, and how many
  train replies it cut.
- privacy: real `flwr run`s of the app without attackers (50 simulated SuperNodes), at
  each `dp-noise-multiplier` (0: DP off) and `dp-clipping-norm`, printing central
  accuracy and epsilon (at the default `dp-delta`, 1e-5) at the `--report` rounds, and
  how each run ended.
- cost: times one `aggregate_train` of each rule in this process, on that many replies
  of this app's model (80,202 weights), and the gate's bound on them; 12, 125 and 500
  are what fraction-train 0.25 samples from 50, 500 and 2,000 SuperNodes.
"""

import argparse
import copy
import json
import logging
import multiprocessing
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from harness import attacks
from harness.attacks import ATTACK_RUN_CONFIG
from harness.flower_processes import LocalFederation, copy_app, default_run_config
from harness.local_grid import ClientAppGrid
from harness.synthetic_fmnist import write_idx_dataset
from pytorch_example import client_app
from pytorch_example.config import AGGREGATIONS, AppConfig
from pytorch_example.data import load_test_set, prepare_partitions
from pytorch_example.gate import EQUAL_WEIGHT_KEY, ReplyGate
from pytorch_example.outputs import RunOutputs
from pytorch_example.rounds import RoundLoop, RunFailed
from pytorch_example.server_app import central_evaluation
from pytorch_example.strategy import CustomFedAvg
from pytorch_example.task import Net
from pytorch_example.trust import build_strategy

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


def bound(args, federation: LocalFederation, app_dir: Path, work: Path) -> dict:
    """The default run-config with the gate's bound (its defaults) and without it, at each
    `dirichlet-alpha`, seed by seed: final central accuracy, seconds a run, and the train
    replies the bound cut."""
    alphas = [float(alpha) for alpha in args.alphas.split(",")]
    table: dict[str, list[dict]] = {}
    for alpha in alphas:
        for seed in range(args.seeds):
            for arm in ("bounded", "unbounded"):
                settings = {
                    "seed": seed,
                    "dirichlet-alpha": alpha,
                    "num-server-rounds": args.rounds,
                    "fraction-evaluate": AppConfig().fraction_evaluate,
                }
                settings |= UNBOUNDED if arm == "unbounded" else {}
                started = time.perf_counter()
                rounds, _ = run_once(federation, app_dir, work, f"{arm}-{alpha:g}-{seed}", settings)
                train = [entry["replies"]["train"] for entry in rounds]
                table.setdefault(f"{arm}, alpha {alpha:g}", []).append(
                    {
                        "accuracy": central(rounds, len(rounds)),
                        "run_s": time.perf_counter() - started,
                        "received": sum(counts["received"] for counts in train),
                        "clipped": sum(counts.get("clipped", 0) for counts in train),
                        "capped": sum(counts.get("capped", 0) for counts in train),
                    }
                )
                if args.out:
                    args.out.write_text(json.dumps(table, indent=1))
    print(f"\nThe default run-config, {args.rounds} rounds, with and without the bound, {args.seeds} seeds\n")
    print("| | central accuracy by seed | mean | seconds a run (mean) | train replies clipped, capped |")
    print("| --- | --- | ---: | ---: | ---: |")
    for arm, runs in table.items():
        accuracies = " ".join(f"{run['accuracy']:.4f}" for run in runs)
        clipped, capped = sum(r["clipped"] for r in runs), sum(r["capped"] for r in runs)
        cut = f"{clipped}, {capped} of {sum(r['received'] for r in runs)}"
        print(f"| {arm} | {accuracies} | {np.mean([r['accuracy'] for r in runs]):.4f} | "
              f"{np.mean([r['run_s'] for r in runs]):.0f} | {cut} |")  # fmt: skip
    return table


NUM_CLIENTS = 50
ATTACKS = (
    "none",
    "scaled",
    "sign-flip",
    "label-flip",
    "gaussian",
    "alie",
    "ipm",
    "replacement",
    "huge-weights",
)
# Rows: the app's rules as a run gets them, FedAvg without the bound (the control), and
# pre-aggregations measured against ALIE and IPM (byzfl's, in this benchmark only).
UNBOUNDED = {"update-norm-bound": 0.0, "update-weight-bound": 0.0}
RULES = {
    **{rule: {"aggregation": rule} for rule in AGGREGATIONS},
    "fedavg-unbounded": {"aggregation": "fedavg", **UNBOUNDED},
}
CANDIDATES = ("nnm+median", "nnm+trimmed-mean", "bucketing+median", "centered-clipping")
# The attack moved a round's model when the aggregate lies further than this share of
# a step from where the round would have put it had the attackers been honest.
MOVED_SHARE = 0.5


@dataclass(frozen=True)
class Cell:
    rule: str
    attack: str
    alpha: float
    seed: int
    rounds: int
    fraction: float
    work: str

    @property
    def key(self) -> str:
        return f"{self.rule} | {self.attack} | {self.alpha:g} | {self.seed}"


def flat(arrays: ArrayRecord) -> np.ndarray:
    return np.concatenate([array.numpy().astype(np.float64).ravel() for array in arrays.values()])


class Meter:
    """A strategy that also aggregates each round as it would have been had the
    attackers been honest, to see how far the attack moved the model, and times the rule.

    `honest_replies`: what each node sampled would have sent honestly, as it reached the
    server, by round and node (filled by `honest_too`)."""

    def __init__(self, strategy, gate: ReplyGate) -> None:
        self.strategy, self.gate = strategy, gate
        self.honest_replies: dict[tuple[int, int], Message] = {}
        self.moved = self.compared = 0
        self.seconds: list[float] = []

    def __getattr__(self, name):
        return getattr(self.strategy, name)

    def honest_too(self, train):
        """`train`, keeping a copy of what the node would have sent honestly."""

        def train_keeping_the_honest_reply(msg: Message, context: Context) -> Message:
            reply = train(msg, context)
            honest = client_app.train(msg, context) if attacks.attack_of(context) else reply
            server_round = int(msg.content["config"]["server-round"])
            self.honest_replies[server_round, context.node_id] = copy.deepcopy(honest)
            return reply

        return train_keeping_the_honest_reply

    def aggregate_train(self, server_round, replies):
        started = time.perf_counter()
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        self.seconds.append(time.perf_counter() - started)
        if arrays is not None:
            # The round again, every node honest: through the gate, bounded, aggregated.
            this_round = [reply for (r, _), reply in self.honest_replies.items() if r == server_round]
            honest = self.gate.screen("train", this_round, server_round)
            self.gate.bound(honest, self.strategy.sent_arrays, server_round)
            honest_arrays, _ = self.strategy.aggregate_train(server_round, honest)
            sent, alone = flat(self.strategy.sent_arrays), flat(honest_arrays)
            self.compared += 1
            moved_by = np.linalg.norm(flat(arrays) - alone)
            self.moved += int(moved_by > MOVED_SHARE * np.linalg.norm(alone - sent))
        self.honest_replies = {}
        return arrays, metrics


class PreAggregated(CustomFedAvg):
    """A byzfl pre-aggregation and rule on the round's updates (replies minus the model
    sent, flattened): `nnm` (each update replaced by the mean of its n - f nearest),
    `bucketing` (means of random pairs), then `median` or `trimmed-mean`; or
    `centered-clipping` (3 steps, radius the updates' median norm)."""

    def __init__(self, name: str, num_malicious: int, trim_fraction: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.name, self.f, self.trim_fraction = name, num_malicious, trim_fraction

    def aggregate_train(self, server_round, replies):
        import byzfl  # noqa: PLC0415 (3 s to import; only these candidate rows use it)

        replies = list(replies)
        if not replies:
            return None, None
        names = list(replies[0].content["arrays"].keys())
        sent = np.concatenate([self.sent_arrays[name].numpy().ravel() for name in names])
        updates = np.stack(
            [
                np.concatenate([r.content["arrays"][name].numpy().ravel() for name in names]) - sent
                for r in replies
            ]
        )
        if self.name == "centered-clipping":
            radius = float(np.median(np.linalg.norm(updates, axis=1)))
            aggregate = byzfl.CenteredClipping(L=3, tau=radius)(updates)
        else:
            pre, _, rule = self.name.partition("+")
            mixed = byzfl.NNM(f=self.f)(updates) if pre == "nnm" else byzfl.Bucketing(s=2)(updates)
            cut = int(self.trim_fraction * len(mixed))
            aggregate = byzfl.Median()(mixed) if rule == "median" else byzfl.TrMean(f=cut)(mixed)
        model, start = {}, 0
        for name in names:
            shape = replies[0].content["arrays"][name].numpy().shape
            size = int(np.prod(shape))
            model[name] = Array(
                (sent[start : start + size] + aggregate[start : start + size])
                .reshape(shape)
                .astype(np.float32)
            )
            start += size
        metrics = self.train_metrics_aggr_fn([reply.content for reply in replies], self.weighted_by_key)
        return ArrayRecord({**self.sent_arrays, **model}), metrics


def rule_strategy(rule: str, config: AppConfig):
    if rule in CANDIDATES:
        return PreAggregated(
            rule,
            config.num_malicious,
            config.trim_fraction,
            learning_rate_at=config.learning_rate_at,
            fraction_train=config.fraction_train,
            fraction_evaluate=config.fraction_evaluate,
            weighted_by_key=EQUAL_WEIGHT_KEY,
        )
    return build_strategy(config, NUM_CLIENTS)


def run_cell(cell: Cell) -> dict:
    """One run of `cell.rounds` rounds, in this process."""
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        setattr(TaskIdentity, name, value)  # what Flower sets in a ServerApp process
    work = Path(cell.work)
    run_dir = Path(tempfile.mkdtemp(prefix="cell-", dir=work))
    settings = RULES.get(cell.rule, {"aggregation": "median"})  # a candidate: its replies weigh 1
    run_config = {
        **default_run_config(),
        **ATTACK_RUN_CONFIG,
        **settings,
        "num-server-rounds": cell.rounds,
        "fraction-evaluate": 0.0,
        "num-malicious": NUM_MALICIOUS,
        "dirichlet-alpha": cell.alpha,
        "seed": cell.seed,
        "dataset-path": str(work / "fmnist-idx"),
        "data-cache-dir": str(work / "cache"),
        "output-dir": str(run_dir),
        "use-wandb": False,
        "attack-pool-dir": str(run_dir / "pool"),
    }
    if cell.attack != "none":
        run_config |= {"attack": cell.attack, "attack-fraction": cell.fraction}
    config = AppConfig.from_run_config(run_config)
    random.seed(cell.seed)  # which clients Flower's FedAvg samples
    torch.manual_seed(cell.seed)  # the gaussian attack's draws
    prepare_partitions(config.data_source, config.partitioning(NUM_CLIENTS))
    torch.manual_seed(config.seed)
    initial = ArrayRecord(Net().state_dict())
    gate = ReplyGate.for_run(config, initial)
    meter = Meter(rule_strategy(cell.rule, config), gate)
    node_configs = [{"partition-id": p, "num-partitions": NUM_CLIENTS} for p in range(NUM_CLIENTS)]
    grid = ClientAppGrid(run_config, node_configs, meter.honest_too(attacks.train), attacks.evaluate)
    outputs = RunOutputs(run_dir, {}, wandb_project=None)
    loop = RoundLoop(config, meter, grid, outputs, gate)
    started = time.perf_counter()
    try:
        arrays, status = loop.run(initial).arrays, "completed"
    except RunFailed as failed:
        arrays, status = outputs.state.arrays, f"failed at round {outputs.state.round}: {failed}"
    accuracy = central_evaluation(load_test_set(config.data_source), config)(cell.rounds, arrays)["accuracy"]
    shutil.rmtree(run_dir)
    return {
        "accuracy": accuracy,
        "moved": meter.moved,
        "compared": meter.compared,
        "aggregate_s": float(np.mean(meter.seconds)) if meter.seconds else None,
        "status": status,
        "run_s": time.perf_counter() - started,
    }


def robustness(args) -> dict:
    rules = args.rules.split(",")
    attacks_run = args.attacks.split(",")
    alphas = [float(alpha) for alpha in args.alphas.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="trust-"))
    if not (work / "fmnist-idx").exists():
        write_idx_dataset(work / "fmnist-idx", 60_000, 10_000, noise=200.0)
    for alpha in alphas:  # partitions computed once, before the workers share them
        config = AppConfig.from_run_config(
            {
                **default_run_config(),
                "dirichlet-alpha": alpha,
                "dataset-path": str(work / "fmnist-idx"),
                "data-cache-dir": str(work / "cache"),
            }  # fmt: skip
        )
        prepare_partitions(config.data_source, config.partitioning(NUM_CLIENTS))
        load_test_set(config.data_source)
    done = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
    # Seed by seed: cut short, the table has every cell, with fewer seeds.
    cells = [
        Cell(rule, attack, alpha, seed, args.rounds, args.fraction, str(work))
        for seed in range(args.seeds)
        for alpha in alphas
        for attack in attacks_run
        for rule in rules
    ]
    todo = [cell for cell in cells if cell.key not in done]
    print(f"{len(cells)} cells, {len(todo)} to run, in {work}", flush=True)
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for cell, outcome in zip(todo, pool.imap(run_cell, todo), strict=True):
            done[cell.key] = outcome
            print(f"{cell.key}: {outcome['accuracy']:.3f}, moved {outcome['moved']}/{outcome['compared']}, "
                  f"{outcome['run_s']:.0f} s, {outcome['status'][:80]}", flush=True)  # fmt: skip
            if args.out:
                args.out.write_text(json.dumps(done, indent=1))
    print_robustness(done, rules, attacks_run, alphas, args.seeds, args.rounds)
    return done


def print_robustness(done: dict, rules, attacks_run, alphas, seeds: int, rounds: int) -> None:
    def cells_of(rule, attack, alpha):
        keys = [f"{rule} | {attack} | {alpha:g} | {seed}" for seed in range(seeds)]
        return [done[key] for key in keys if key in done]

    def accuracy_text(cells: list[dict]) -> str:
        if not cells:
            return "-"
        accuracies = [cell["accuracy"] for cell in cells]
        failed = sum(cell["status"] != "completed" for cell in cells)
        seeds_run = "" if len(cells) == seeds else f" [{len(cells)}]"
        return f"{np.mean(accuracies):.2f} ({min(accuracies):.2f})" + "!" * failed + seeds_run

    def moved_text(cells: list[dict]) -> str:
        compared = sum(cell["compared"] for cell in cells)
        return f"{sum(cell['moved'] for cell in cells) / compared:.2f}" if compared else "-"

    for alpha in alphas:
        for title, text in (
            (
                f"Central accuracy after round {rounds}, dirichlet-alpha {alpha:g}: mean of {seeds} seeds "
                "(worst; ! a failed run; [k] only k seeds run)",
                accuracy_text,
            ),
            (f"Share of rounds the attack moved the model, dirichlet-alpha {alpha:g}", moved_text),
        ):
            print(f"\n{title}\n")
            print("| aggregation | " + " | ".join(attacks_run) + " |")
            print("| --- |" + " ---: |" * len(attacks_run))
            for rule in rules:
                row = [text(cells_of(rule, attack, alpha)) for attack in attacks_run]
                print(f"| {rule} | " + " | ".join(row) + " |")
    print("\nSeconds per aggregation (mean over every round of every cell)\n")
    for rule in rules:
        seconds = [
            done[key]["aggregate_s"] for key in done
            if key.startswith(f"{rule} | ") and done[key]["aggregate_s"] is not None
        ]  # fmt: skip
        print(f"| {rule} | {np.mean(seconds):.4f} |" if seconds else f"| {rule} | - |")


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


def train_replies(model: dict, count: int) -> list[Message]:
    """`count` train replies to `model`, each moved by noise, the last 100 times further
    and claiming 10 times the rows: as the gate hands them on (rows, and the equal
    weight the robust rules use)."""
    replies = []
    for node in range(count):
        message = Message(
            RecordDict({"arrays": ArrayRecord(model), "config": ConfigRecord()}),
            dst_node_id=node + 1,
            message_type="train",
        )
        scale = 1.0 if node < count - 1 else 100.0
        moved = {key: value + scale * 0.01 * torch.randn_like(value) for key, value in model.items()}
        rows = 100 if node < count - 1 else 1000
        metrics = MetricRecord({"num-examples": rows, EQUAL_WEIGHT_KEY: 1})
        replies.append(
            Message(RecordDict({"arrays": ArrayRecord(moved), "metrics": metrics}), reply_to=message)
        )
    return replies


def cost(args) -> dict:
    """Seconds of one aggregate_train per rule and reply count, and of the gate's bound
    (the median of 5), in this process."""
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
            replies = train_replies(model, count)
            started = time.perf_counter()
            strategy.aggregate_train(1, replies)
            table[rule][count] = time.perf_counter() - started
            print(f"{rule} on {count} replies: {table[rule][count]:.3f} s", flush=True)
    sent = ArrayRecord(model)
    gate = ReplyGate.for_run(AppConfig(), sent)
    table["the gate's bound"] = {}
    for count in counts:
        seconds = []
        for _ in range(5):
            replies = train_replies(model, count)
            started = time.perf_counter()
            bounded = gate.bound(replies, sent, 1)
            seconds.append(time.perf_counter() - started)
        assert bounded.clipped == bounded.capped == 1, bounded
        table["the gate's bound"][count] = float(np.median(seconds))
    print(
        f"\nSeconds of one aggregate_train (this app's model; '-': not run, "
        f"the size before took > {args.cap_s:g} s), and of the gate's bound (fedavg's defaults)\n"
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
    parser.add_argument("part", choices=["robustness", "bound", "privacy", "cost"])
    parser.add_argument("--rules", default=",".join([*AGGREGATIONS, "fedavg-unbounded"]))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--alphas", help="robustness: 0.3,1.0; bound: the default run-config's")
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", help="a folder for the data, kept between reruns (default: a new one)")
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
    args.rounds = args.rounds or {"robustness": 20, "bound": AppConfig().num_server_rounds}.get(args.part, 30)
    default_alphas = "0.3,1.0" if args.part == "robustness" else f"{AppConfig().dirichlet_alpha:g}"
    args.alphas = args.alphas or default_alphas
    if args.part == "robustness":
        robustness(args)
        return
    with tempfile.TemporaryDirectory(prefix="trust-") as tmp:
        work = Path(tmp)
        write_idx_dataset(work / "fmnist-idx", 60_000, 10_000, noise=200.0)
        app_dir = copy_app(work / "app")
        federation = LocalFederation(work / "federation")
        try:
            (bound if args.part == "bound" else privacy)(args, federation, app_dir, work)
        finally:
            federation.stop()


if __name__ == "__main__":
    main()
