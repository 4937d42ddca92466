"""How a round's cost grows with the federation: 50, 500 and 2,000 simulated SuperNodes.

    python -m benchmarks.scale [--sizes 50 500 2000] [--rounds 3]
    python -m benchmarks.scale --sizes 1000 5000 --dp-sampled 100 200 [--train-images 300000]

For each size it runs the real `flwr run` on the generated Fashion-MNIST-shaped set
(60,000 + 10,000 images) twice: at the default fractions (a quarter of the nodes train,
half evaluate, so the work per round grows with the federation) and at a fixed 10
clients per round for both (so only the idle nodes grow). It prints seconds per round
(steady state, round 1 excluded), the first round (data preparation, the partition
cache included), and the peak memory of every process involved; and, outside Flower,
what one warm partition lookup costs at each size.

Every size uses dirichlet-alpha 2.0: at 1.0, the default, flwr-datasets'
DirichletPartitioner cannot give 2,000 partitions of at least 10 of the 60,000 images.

With `--dp-sampled M ...` (one per size) it runs instead the population DP needs: M
clients train a round (a tenth as many evaluate), DP on (noise multiplier 1, the sample
credited against the simulation's fixed population), and prints epsilon after the
last round too. `--train-images` grows the generated set so that 5,000 partitions
each hold their minimum.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.round_cost import SIMULATION_CPUS_PER_CLIENT, run_app
from harness.flower_processes import default_run_config, trained_rounds
from harness.synthetic_fmnist import write_idx_dataset
from pytorch_example.config import AppConfig
from pytorch_example.data import load_partition

ALPHA = 2.0
FIXED_CLIENTS = 10


def lookup_ms(config: AppConfig, num_partitions: int, calls: int = 200) -> float:
    """Median milliseconds of one `load_partition` with a warm cache."""
    settings = config.data_source, config.partitioning(num_partitions)
    load_partition(*settings, 0)  # fills the cache
    ids = np.random.default_rng(0).integers(0, num_partitions, calls)
    durations = []
    for partition_id in ids:
        started = time.perf_counter()
        load_partition(*settings, int(partition_id))
        durations.append(time.perf_counter() - started)
    return 1000 * float(np.median(durations))


def population_run_config(work: Path, rounds: int, train_images: int) -> dict:
    """The run-config of a run on a large simulated population: `rounds` rounds on a
    generated set of `train_images` written into `work`, W&B off."""
    dataset = write_idx_dataset(work / "fmnist-idx", num_train=train_images, num_test=10_000)
    return {
        **default_run_config(),
        "num-server-rounds": rounds,
        "dirichlet-alpha": ALPHA,
        "dataset-path": str(dataset),
        "use-wandb": False,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 500, 2000], help="SuperNodes")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (default 3)")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep files here (default: a temp dir)")
    parser.add_argument("--dp-sampled", type=int, nargs="+", help="DP mode: clients a round, one per size")
    parser.add_argument("--train-images", type=int, default=60_000, help="generated train images")
    args = parser.parse_args()
    if args.dp_sampled and len(args.dp_sampled) != len(args.sizes):
        parser.error("--dp-sampled takes one number per size")

    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        base = population_run_config(work, args.rounds, args.train_images)
        rows = []
        for index, size in enumerate(args.sizes):
            # FedAvg samples int(nodes x fraction): half a node of slack against rounding.
            modes = [
                ("default fractions", {}),
                (
                    f"{FIXED_CLIENTS} clients/round",
                    {
                        "fraction-train": (FIXED_CLIENTS + 0.5) / size,
                        "fraction-evaluate": (FIXED_CLIENTS + 0.5) / size,
                    },
                ),
            ]
            if args.dp_sampled:
                sampled = args.dp_sampled[index]
                modes = [
                    (
                        f"DP, {sampled} clients/round",
                        {
                            "fraction-train": (sampled + 0.5) / size,
                            "fraction-evaluate": (sampled // 10 + 0.5) / size,
                            "dp-noise-multiplier": 1.0,
                        },
                    )
                ]
            for label, fractions in modes:
                name = f"{size}-{label.split()[0]}"
                run_config = {
                    **base,
                    **fractions,
                    # A fresh cache per run: the first round pays for the partitions.
                    "data-cache-dir": str(work / f"cache-{name}"),
                    "output-dir": str(work / f"out-{name}"),
                }
                config = AppConfig.from_run_config(run_config)
                train = max(int(size * config.fraction_train), 2)
                evaluate = max(int(size * config.fraction_evaluate), 2)
                app = run_app(
                    work / f"run-{name}",
                    run_config,
                    node_configs=None,
                    federation_config={
                        "num-supernodes": size,
                        "client-resources-num-cpus": SIMULATION_CPUS_PER_CLIENT,
                    },
                )
                rows.append((size, label, train, evaluate, app, lookup_ms(config, size)))
                last = trained_rounds(next(Path(run_config["output-dir"]).glob("*/*/results.json")))[-1]
                privacy = last.get("privacy")
                print(
                    f"{size:>5} SuperNodes, {label:<18} {train:>4} train + {evaluate:>4} evaluate: "
                    f"{app['steady_s']:6.2f} s/round, first round {app['first_round_s']:6.1f} s, "
                    f"peak {app['peak_gib']:.2f} GiB, partition lookup {rows[-1][5]:.2f} ms"
                    + (
                        f", epsilon {privacy['epsilon']:.2f} after {privacy['releases']} rounds "
                        f"({privacy['credited']} credited)"
                        if privacy
                        else ""
                    ),  # fmt: skip
                    flush=True,
                )

        print(
            "\n| SuperNodes | clients per round | train + evaluate | s/round | ms per message | "
            "first round | peak memory | partition lookup |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for size, label, train, evaluate, app, lookup in rows:
            per_message = 1000 * app["steady_s"] / (train + evaluate)
            print(
                f"| {size} | {label} | {train} + {evaluate} | {app['steady_s']:.2f} | {per_message:.0f} | "
                f"{app['first_round_s']:.1f} s | {app['peak_gib']:.2f} GiB | {lookup:.2f} ms |"
            )


if __name__ == "__main__":
    main()
