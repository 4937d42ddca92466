"""Fashion-MNIST for the federation: decoded once, partitioned once, cached on disk.

The first process that needs the images (the ServerApp, in practice) decodes them all
into uint8 arrays; the first ClientApp computes every client's rows with flwr-datasets'
`DirichletPartitioner`. Both land in a cache folder as `.npy`/`.npz` files. Every later
process, including the fresh ClientApp process that a SuperNode starts for each message
in a deployment, memory-maps those files in milliseconds instead of decoding again.
"""

import functools
import gzip
import hashlib
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

# Bump when the layout or meaning of the cached files changes.
CACHE_FORMAT = 1
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPLITS = ("train", "test")


class DataError(RuntimeError):
    """The data cannot be had; the message is one line for the user."""


@dataclass(frozen=True)
class DataSettings:
    """Everything that decides which images each client holds."""

    dataset_name: str
    dataset_path: Path | None
    cache_dir: Path
    num_partitions: int
    alpha: float
    partition_seed: int
    val_fraction: float


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


def load_partition(settings: DataSettings, partition_id: int) -> Partition:
    """Return client `partition_id`'s train and validation images."""
    if not 0 <= partition_id < settings.num_partitions:
        raise DataError(
            f"partition-id {partition_id} is outside 0..{settings.num_partitions - 1} "
            "(num-partitions in the node config)"
        )
    source_dir = _ensure_decoded(settings)
    rows_file = _ensure_partition_rows(settings, source_dir)
    images = np.load(source_dir / "train-images.npy", mmap_mode="r")
    labels = np.load(source_dir / "train-labels.npy", mmap_mode="r")
    with np.load(rows_file) as rows:
        train_rows = rows[f"train-{partition_id}"]
        val_rows = rows[f"val-{partition_id}"]
    return Partition(
        train=_take(images, labels, train_rows), val=_take(images, labels, val_rows)
    )


def load_test_set(settings: DataSettings) -> ImageSet:
    """Return the whole test split, for central evaluation on the ServerApp."""
    source_dir = _ensure_decoded(settings)
    images = np.load(source_dir / "test-images.npy", mmap_mode="r")
    labels = np.load(source_dir / "test-labels.npy", mmap_mode="r")
    return ImageSet(torch.from_numpy(np.array(images)), torch.from_numpy(np.array(labels)))


def _take(images: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> ImageSet:
    # Reading rows in ascending order keeps memory-mapped reads sequential; the order
    # inside a partition does not matter since training shuffles it every epoch.
    rows = np.sort(rows)
    return ImageSet(torch.from_numpy(images[rows]), torch.from_numpy(labels[rows]))


# --- Decoding ---------------------------------------------------------------------


def _ensure_decoded(settings: DataSettings) -> Path:
    """Return the cache folder holding the decoded splits, decoding them if needed."""
    source_dir = settings.cache_dir / f"fashion-mnist-{_source_key(settings)}"
    files = [source_dir / f"{split}-{kind}.npy" for split in SPLITS for kind in ("images", "labels")]
    if all(path.exists() for path in files):
        return source_dir
    splits = _decode_source(settings)
    source_dir.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in splits.items():
        save_atomically(source_dir / f"{split}-images.npy", lambda f, a=images: np.save(f, a))
        save_atomically(source_dir / f"{split}-labels.npy", lambda f, a=labels: np.save(f, a))
    return source_dir


def _source_key(settings: DataSettings) -> str:
    """Hash of what the decoded arrays depend on: the source and its files' stats."""
    parts = [f"format={CACHE_FORMAT}"]
    if settings.dataset_path is None:
        parts.append(f"hub={settings.dataset_name}")
    else:
        for path in sorted(_local_source_files(settings.dataset_path)):
            stat = path.stat()
            parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _local_source_files(folder: Path) -> list[Path]:
    idx_files = [folder / name for names in IDX_FILES.values() for name in names]
    if all(path.is_file() for path in idx_files):
        return idx_files
    parquet_files = sorted(folder.rglob("*.parquet"))
    if any(path.name.startswith("train") for path in parquet_files) and any(
        path.name.startswith("test") for path in parquet_files
    ):
        return parquet_files
    expected = ", ".join(name for names in IDX_FILES.values() for name in names)
    raise DataError(
        f"run-config key 'dataset-path' = '{folder}' holds neither the Fashion-MNIST "
        f"files ({expected}) nor train*/test* parquet files"
    )


def _decode_source(settings: DataSettings) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read every image of both splits into memory, from IDX, parquet or the Hub."""
    if settings.dataset_path is not None:
        files = _local_source_files(settings.dataset_path)
        if files[0].name == IDX_FILES["train"][0]:
            return {
                split: (_read_idx(settings.dataset_path / images), _read_idx(settings.dataset_path / labels))
                for split, (images, labels) in IDX_FILES.items()
            }
        data_files = {
            split: [str(path) for path in files if path.name.startswith(split)] for split in SPLITS
        }
        return _decode_hf(lambda: _load_hf("parquet", data_files=data_files))
    return _decode_hf(lambda: _load_hf(settings.dataset_name), hub_name=settings.dataset_name)


def _read_idx(path: Path) -> np.ndarray:
    """Parse one gzipped IDX file (the format Fashion-MNIST ships in)."""
    raw = gzip.decompress(path.read_bytes())
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {data.size}")
    data = data.reshape(shape)
    return data.astype(np.int64) if ndim == 1 else data


def _load_hf(path: str, **kwargs):
    import datasets  # noqa: PLC0415 (only the Hub and parquet paths need it)

    return datasets.load_dataset(path, **kwargs)


def _decode_hf(
    load: Callable[[], "object"], hub_name: str | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    try:
        dataset = load()
    except Exception as err:  # noqa: BLE001 (any failure here means: no data)
        if hub_name is None:
            raise DataError(
                f"run-config key 'dataset-path': could not read its parquet files ({err})"
            ) from err
        raise DataError(
            f"could not load '{hub_name}' from the Hugging Face Hub ({type(err).__name__}); "
            "set run-config key 'dataset-path' to a folder with the Fashion-MNIST .gz or parquet files"
        ) from err
    splits = {}
    for split in SPLITS:
        numpy_split = dataset[split].with_format("numpy")
        images = np.asarray(numpy_split["image"], dtype=np.uint8)
        splits[split] = (images, np.asarray(numpy_split["label"], dtype=np.int64))
    return splits


# --- Partitioning -----------------------------------------------------------------


def _ensure_partition_rows(settings: DataSettings, source_dir: Path) -> Path:
    """Return the `.npz` of every client's train/val rows, computing it if needed."""
    key = hashlib.sha256(
        "\n".join(
            [
                f"num_partitions={settings.num_partitions}",
                f"alpha={settings.alpha!r}",
                f"seed={settings.partition_seed}",
                f"val_fraction={settings.val_fraction!r}",
                *library_versions(),
            ]
        ).encode()
    ).hexdigest()[:16]
    rows_file = source_dir / f"partitions-{key}.npz"
    if not rows_file.exists():
        labels = np.load(source_dir / "train-labels.npy")
        rows = compute_partition_rows(labels, settings)
        save_atomically(rows_file, lambda f: np.savez(f, **rows))
    return rows_file


@functools.cache
def library_versions() -> tuple[str, ...]:
    """Their partitioning, shuffling and random numbers decide the rows too."""
    return tuple(f"{name}={version(name)}" for name in ("flwr-datasets", "datasets", "numpy"))


def compute_partition_rows(labels: np.ndarray, settings: DataSettings) -> dict[str, np.ndarray]:
    """Rows of the train split held by each client, as `train-<id>` and `val-<id>`.

    This is what `FederatedDataset(partitioners={"train": DirichletPartitioner(...)})`
    followed by `partition.train_test_split(...)` selects, computed on a table of row
    numbers and labels only, so that no image is touched.
    """
    import datasets  # noqa: PLC0415
    from flwr_datasets.partitioner import DirichletPartitioner  # noqa: PLC0415

    table = datasets.Dataset.from_dict({"row": np.arange(len(labels)), "label": labels})
    # FederatedDataset shuffles each split with its seed before partitioning.
    table = table.shuffle(seed=settings.partition_seed)
    partitioner = DirichletPartitioner(
        num_partitions=settings.num_partitions,
        partition_by="label",
        alpha=settings.alpha,
        seed=settings.partition_seed,
    )
    partitioner.dataset = table
    rows = {}
    for partition_id in range(settings.num_partitions):
        split = partitioner.load_partition(partition_id).train_test_split(
            test_size=settings.val_fraction, seed=settings.partition_seed
        )
        rows[f"train-{partition_id}"] = np.asarray(split["train"]["row"], dtype=np.int64)
        rows[f"val-{partition_id}"] = np.asarray(split["test"]["row"], dtype=np.int64)
    return rows


def save_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write to a private temporary file, then rename: readers see all or nothing."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
