"""Central accuracy against epsilon: client-level DP on a simulated population, with a
fixed clipping norm and with adaptive clipping, beside the same run without DP.

    python -m benchmarks.dp_curve [--population 1000] [--sampled 100] [--rounds 30]
                                  [--epsilons 1 2 4 8] [--seeds 0] [--quantile 0.5]
                                  [--clippings fixed adaptive] [--no-no-dp]
                                  [--server-steps 1:0 0.3:0.9]

For each target epsilon it finds the noise multiplier whose credited epsilon after
`--rounds` rounds (a uniform `--sampled` of `--population`, delta 1e-5: privacy.py's
account) is that target, then runs the real `flwr run` on the generated set: without
DP, then at each multiplier with `dp-clipping-norm` fixed at its default and with
`dp-clipping-quantile`; each of those once per `server-learning-rate:server-momentum`
pair (1:0, FedAvg's step, by default). It prints one row per run and, at the end, the
table for benchmarks/README.md: central accuracy after the last round, and the best.
"""

import argparse
import json
import tempfile
from pathlib import Path

from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant

from benchmarks.round_cost import SIMULATION_CPUS_PER_CLIENT, run_app
from benchmarks.scale import population_run_config

DELTA = 1e-5


def epsilon(population: int, sampled: int, rounds: int, multiplier: float) -> float:
    """Credited epsilon after `rounds` rounds, as privacy.py accounts them."""
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    event = dp_event.SampledWithoutReplacementDpEvent(
        population, sampled, dp_event.GaussianDpEvent(multiplier / 2)
    )
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(DELTA))


def multiplier_for(target: float, population: int, sampled: int, rounds: int) -> float:
    """The noise multiplier whose epsilon after `rounds` is `target` (to 0.1%)."""
    low, high = 0.05, 100.0
    while high / low > 1.001:
        middle = (low * high) ** 0.5
        low, high = (middle, high) if epsilon(population, sampled, rounds, middle) > target else (low, middle)
    return high


def server_step(text: str) -> tuple[str, dict]:
    """`"1:0.9"` -> the label it adds to a run's name, and its run-config."""
    learning_rate, momentum = (float(part) for part in text.split(":"))
    fedavg = (learning_rate, momentum) == (1.0, 0.0)
    label = "" if fedavg else f", server {learning_rate:g} momentum {momentum:g}"
    return label, {"server-learning-rate": learning_rate, "server-momentum": momentum}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--population", type=int, default=1000, help="simulated SuperNodes")
    parser.add_argument("--sampled", type=int, default=100, help="clients trained a round")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--quantile", type=float, default=0.5, help="adaptive clipping's target quantile")
    parser.add_argument(
        "--clippings", nargs="+", choices=["fixed", "adaptive"], default=["fixed", "adaptive"]
    )
    parser.add_argument("--no-dp", action=argparse.BooleanOptionalAction, default=True,
                        help="run the baseline without DP too")  # fmt: skip
    parser.add_argument(
        "--server-steps", nargs="+", default=["1:0"], metavar="LR:MOMENTUM",
        help="server-learning-rate:server-momentum pairs, each run for every cell (1:0, FedAvg)",
    )  # fmt: skip
    parser.add_argument("--train-images", type=int, default=60_000, help="generated train images")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep files here (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dp-curve-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        base = {
            **population_run_config(work, args.rounds, args.train_images),
            "data-cache-dir": str(work / "cache"),  # shared: the partitions are cut once
            # FedAvg samples int(nodes x fraction): half a node of slack against rounding.
            "fraction-train": (args.sampled + 0.5) / args.population,
            "fraction-evaluate": 0.0,  # central evaluation scores every round
            "lr-decay-rounds": "",
        }
        steps = [server_step(text) for text in args.server_steps]
        cells = [("no DP", None, {})] if args.no_dp else []
        for target in args.epsilons:
            sigma = multiplier_for(target, args.population, args.sampled, args.rounds)
            dp = {"dp-noise-multiplier": round(sigma, 4), "dp-delta": DELTA}
            for clipping in args.clippings:
                adaptive = {"dp-clipping-quantile": args.quantile} if clipping == "adaptive" else {}
                cells.append((f"epsilon {target:g}, {clipping}", sigma, {**dp, **adaptive}))
        cells = [
            (label + step_label, sigma, {**settings, **step})
            for label, sigma, settings in cells
            for step_label, step in steps
        ]
        rows = []
        for seed in args.seeds:
            for label, sigma, settings in cells:
                name = f"{label.replace(' ', '').replace(',', '-')}-seed{seed}"
                run_config = {**base, **settings, "seed": seed, "output-dir": str(work / f"out-{name}")}
                app = run_app(
                    work / f"run-{name}",
                    run_config,
                    node_configs=None,
                    federation_config={
                        "num-supernodes": args.population,
                        "client-resources-num-cpus": SIMULATION_CPUS_PER_CLIENT,
                    },
                )
                [results_file] = Path(run_config["output-dir"]).glob("*/*/results.json")
                rounds = [entry for entry in json.loads(results_file.read_text()) if entry["round"] > 0]
                accuracy = [entry["evaluate_metrics_serverapp"]["accuracy"] for entry in rounds]
                privacy = rounds[-1].get("privacy", {})
                rows.append((label, seed, sigma, privacy.get("epsilon"), accuracy[-1], max(accuracy),
                             privacy.get("clipping_norm"), app["steady_s"]))  # fmt: skip
                spent = privacy.get("epsilon", 0.0)
                print(
                    f"{label:<44} seed {seed}: sigma {sigma or 0:.3f}, epsilon {spent:.2f}, accuracy last "
                    f"{accuracy[-1]:.4f} best {max(accuracy):.4f}, last clipping norm "
                    f"{privacy.get('clipping_norm', '-')}, {app['steady_s']:.2f} s/round",
                    flush=True,
                )

    print(
        f"\n{args.population} SuperNodes, {args.sampled} a round, {args.rounds} rounds, delta {DELTA:g}:\n"
        "| run | seed | noise multiplier | epsilon | central accuracy, last round | best "
        "| last clipping norm |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, seed, sigma, spent, last, best, norm, _ in rows:
        shown_norm = "-" if norm is None else f"{norm:.3g}"
        shown_spent = "-" if spent is None else f"{spent:.2f}"
        cells = f"{sigma or 0:.3f} | {shown_spent} | {last:.4f} | {best:.4f} | {shown_norm}"
        print(f"| {label} | {seed} | {cells} |")


if __name__ == "__main__":
    main()
