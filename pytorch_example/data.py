"""Which images each client holds: Fashion-MNIST's train split cut into partitions by
flwr-datasets' `DirichletPartitioner` (by label), each split into train and validation
rows, exactly as this recipe on the Hub's copy would:

    fds = FederatedDataset(dataset="zalando-datasets/fashion_mnist", seed=partition_seed,
        partitioners={"train": DirichletPartitioner(num_partitions, partition_by="label",
                      alpha=dirichlet_alpha, seed=partition_seed)})
    fds.load_partition(partition_id).train_test_split(test_size=val_fraction, seed=partition_seed)

The recipe runs once per federation, on row numbers and labels only; the images are
decoded once and mapped by every process (see `data_cache.py`).
"""

from dataclasses import dataclass, replace

import numpy as np
import torch

from pytorch_example import alpha_advice, data_cache
from pytorch_example.config import ConfigError, DataSource, Partitioning
from pytorch_example.data_cache import DataError

# DirichletPartitioner's default, which this app keeps.
MIN_PARTITION_SIZE = 10


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 `[N, 28, 28]` and labels as int64 `[N]`."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Partition:
    """One client's share of the train split, divided into train and validation."""

    train: ImageSet
    val: ImageSet


def load_partition(source: DataSource, partitioning: Partitioning, partition_id: int) -> Partition:
    """Client `partition_id`'s train and validation images."""
    if not 0 <= partition_id < partitioning.num_partitions:
        raise ConfigError(
            f"partition {partition_id} does not exist: the train split is cut into "
            f"{partitioning.num_partitions} partitions, 0..{partitioning.num_partitions - 1}"
        )
    images, labels, rows = data_cache.mapped_train_split(source, partitioning, partition_rows)
    train_rows, val_rows = data_cache.partition_slices(rows, partition_id)
    return Partition(train=_take(images, labels, train_rows), val=_take(images, labels, val_rows))


def prepare_partitions(source: DataSource, partitioning: Partitioning) -> None:
    """Decode the data and compute every client's rows now, once for all ClientApps, or
    fail in one line."""
    if partitioning.num_partitions:
        data_cache.packed_rows_file(source, partitioning, partition_rows)


def load_test_set(source: DataSource) -> ImageSet:
    """The whole test split, for central evaluation on the ServerApp."""
    images, labels = data_cache.split_arrays(source, "test")
    return ImageSet(torch.from_numpy(np.array(images)), torch.from_numpy(np.array(labels)))


def _take(images: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> ImageSet:
    # Reading rows in ascending order keeps memory-mapped reads sequential; the order
    # inside a partition does not matter since training shuffles it every epoch.
    rows = np.sort(rows)
    return ImageSet(torch.from_numpy(images[rows]), torch.from_numpy(labels[rows]))


def partition_rows(labels: np.ndarray, partitioning: Partitioning) -> dict[str, np.ndarray]:
    """The recipe above, on a table of row numbers and labels: each client's rows as
    `train-<id>` and `val-<id>`."""
    import datasets  # noqa: PLC0415 (a second to import; only the first process needs it)

    table = datasets.Dataset.from_dict({"row": np.arange(len(labels)), "label": labels})
    # FederatedDataset shuffles each split with its seed before partitioning.
    table = table.shuffle(seed=partitioning.partition_seed)
    partitioner = dirichlet_partitioner(table, partitioning)
    if not alpha_advice.can_assign(partitioner):

        def partitioner_for(alpha: float):
            return dirichlet_partitioner(table, replace(partitioning, dirichlet_alpha=alpha))

        advice = alpha_advice.why_unsatisfiable(
            table.num_rows, partitioning, MIN_PARTITION_SIZE, partitioner_for
        )
        raise DataError("dirichlet-alpha", partitioning.dirichlet_alpha, advice)
    rows = {}
    for partition_id in range(partitioning.num_partitions):
        partition = partitioner.load_partition(partition_id)
        try:
            split = partition.train_test_split(
                test_size=partitioning.val_fraction, seed=partitioning.partition_seed
            )
        except ValueError:
            raise DataError(
                "val-fraction",
                partitioning.val_fraction,
                f"it leaves partition {partition_id} ({partition.num_rows} images) with an empty train "
                "or validation set",
            ) from None
        rows[f"train-{partition_id}"] = np.asarray(split["train"]["row"], dtype=np.int64)
        rows[f"val-{partition_id}"] = np.asarray(split["test"]["row"], dtype=np.int64)
    return rows


def dirichlet_partitioner(table, partitioning: Partitioning):
    from flwr_datasets.partitioner import DirichletPartitioner  # noqa: PLC0415

    partitioner = DirichletPartitioner(
        num_partitions=partitioning.num_partitions,
        partition_by="label",
        alpha=partitioning.dirichlet_alpha,
        min_partition_size=MIN_PARTITION_SIZE,
        seed=partitioning.partition_seed,
    )
    partitioner.dataset = table
    return partitioner
