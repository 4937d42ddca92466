"""Does the cached, batch-augmented data path learn as the straightforward one does?

    python -m benchmarks.same_accuracy [--seeds 5] [--rounds 8]

Runs the same FedAvg (same clients each round, same initial model, same SGD) twice
per seed on a generated data set stored as the Hub's parquet files:

- straightforward: flwr-datasets' `FederatedDataset` + `DirichletPartitioner`,
  `train_test_split`, torchvision's per-image `RandomCrop(28, padding=4)`,
  `RandomHorizontalFlip`, `ToTensor`, `Normalize` through a `DataLoader`;
- this app: `data.load_partition` (decoded once, cached) and `task.train`/`task.test`
  with whole-batch augmentation.

It prints the central test accuracy after each round for both, their mean and spread
over seeds, and the seconds each path spent. The two differ only in random draws
(batch order, crops, flips), so their accuracies should agree within seed-to-seed noise.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import Compose, Normalize, RandomCrop, RandomHorizontalFlip, ToTensor

from harness.synthetic_fmnist import write_parquet_dataset
from pytorch_example import task
from pytorch_example.config import DataSource, Partitioning
from pytorch_example.data import load_partition, load_test_set

NUM_PARTITIONS = 10
CLIENTS_PER_ROUND = 5
BATCH_SIZE = 32
LEARNING_RATE = 0.02
MOMENTUM = 0.9
CPU = torch.device("cpu")
SGD = task.SGD(LEARNING_RATE, MOMENTUM, BATCH_SIZE, CPU)
NOISE = 250.0


def straightforward_path(folder: Path):
    """Client loaders and the test loader, built the way the reference example does."""
    from flwr_datasets import FederatedDataset  # noqa: PLC0415
    from flwr_datasets.partitioner import DirichletPartitioner  # noqa: PLC0415

    normalize = Normalize((task.NORMALIZE_MEAN,), (task.NORMALIZE_STD,))
    train_transforms = Compose([RandomCrop(28, padding=4), RandomHorizontalFlip(), ToTensor(), normalize])
    eval_transforms = Compose([ToTensor(), normalize])

    def apply(transforms):
        def transform(batch):
            batch["image"] = [transforms(image) for image in batch["image"]]
            return batch

        return transform

    fds = FederatedDataset(
        dataset="parquet",
        data_files={split: str(folder / f"{split}-00000-of-00001.parquet") for split in ("train", "test")},
        partitioners={
            "train": DirichletPartitioner(
                num_partitions=NUM_PARTITIONS, partition_by="label", alpha=1.0, seed=42
            )
        },
    )
    client_loaders = []
    for partition_id in range(NUM_PARTITIONS):
        split = fds.load_partition(partition_id).train_test_split(test_size=0.2, seed=42)
        client_loaders.append(
            DataLoader(
                split["train"].with_transform(apply(train_transforms)), batch_size=BATCH_SIZE, shuffle=True
            )
        )
    test_loader = DataLoader(fds.load_split("test").with_transform(apply(eval_transforms)), batch_size=256)
    return client_loaders, test_loader


def train_straightforward(net, loader) -> int:
    optimizer = torch.optim.SGD(net.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    net.train()
    for batch in loader:
        loss = F.cross_entropy(net(batch["image"]), batch["label"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return len(loader.dataset)


@torch.inference_mode()
def accuracy_straightforward(net, loader) -> float:
    net.eval()
    correct = sum((net(batch["image"]).argmax(1) == batch["label"]).sum().item() for batch in loader)
    return correct / len(loader.dataset)


def federate(train_client, evaluate, seed: int, rounds: int) -> list[float]:
    """FedAvg over the same sampled clients for either path; central accuracy per round."""
    torch.manual_seed(seed)
    global_model = task.Net()
    sampler = np.random.default_rng(seed)
    accuracies = []
    for _ in range(rounds):
        states, weights = [], []
        for partition_id in sampler.choice(NUM_PARTITIONS, CLIENTS_PER_ROUND, replace=False):
            net = task.Net()
            net.load_state_dict(global_model.state_dict())
            weights.append(train_client(net, int(partition_id)))
            states.append(net.state_dict())
        total = sum(weights)
        global_model.load_state_dict(
            {
                name: sum(s[name] * (w / total) for s, w in zip(states, weights, strict=True))
                for name in states[0]
            }
        )
        accuracies.append(evaluate(global_model))
    return accuracies


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5, help="at least 2")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--train-images", type=int, default=12_000)
    args = parser.parse_args()

    import datasets  # noqa: PLC0415

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="same-accuracy-") as tmp:
        # Noisy enough that accuracy stays well below 100%, where a difference would show.
        folder = write_parquet_dataset(Path(tmp) / "parquet", args.train_images, 2_000, noise=NOISE)
        source = DataSource(dataset_name="unused", dataset_path=folder, data_cache_dir=Path(tmp) / "cache")
        partitioning = Partitioning(
            num_partitions=NUM_PARTITIONS, dirichlet_alpha=1.0, partition_seed=42, val_fraction=0.2
        )
        client_loaders, test_loader = straightforward_path(folder)
        partitions = [load_partition(source, partitioning, p) for p in range(NUM_PARTITIONS)]
        test_set = load_test_set(source)

        results = {"straightforward": [], "this app": []}
        seconds = dict.fromkeys(results, 0.0)
        for seed in range(args.seeds):
            generator = torch.Generator().manual_seed(seed)
            runs = {
                "straightforward": lambda s=seed: federate(
                    lambda net, p: train_straightforward(net, client_loaders[p]),
                    lambda net: accuracy_straightforward(net, test_loader),
                    s,
                    args.rounds,
                ),
                "this app": lambda s=seed, g=generator: federate(
                    lambda net, p: (
                        task.train(net, partitions[p].train, 1, SGD, g),
                        len(partitions[p].train),
                    )[1],
                    lambda net: task.test(net, test_set, 256, CPU)[1],
                    s,
                    args.rounds,
                ),
            }
            for name, run in runs.items():
                torch.manual_seed(1000 + seed)  # the DataLoader's shuffling and transforms
                started = time.perf_counter()
                results[name].append(run())
                seconds[name] += time.perf_counter() - started
                print(
                    f"seed {seed} {name:15s} accuracy per round: "
                    + " ".join(f"{a:.3f}" for a in results[name][-1])
                )

        print()
        for name, runs in results.items():
            final = np.array([accuracies[-1] for accuracies in runs])
            mean_over_rounds = np.array([np.mean(accuracies) for accuracies in runs])
            print(
                f"{name:15s} final accuracy {final.mean():.4f} +- {final.std(ddof=1):.4f}, "
                f"mean over rounds {mean_over_rounds.mean():.4f} +- {mean_over_rounds.std(ddof=1):.4f} "
                f"({args.seeds} seeds, {args.rounds} rounds), {seconds[name]:.1f} s"
            )


if __name__ == "__main__":
    main()
