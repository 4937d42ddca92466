"""Fashion-MNIST for the federation: decoded once, partitioned once, cached on disk.

The first process that needs the images (the ServerApp, in practice) decodes them all
into uint8 arrays and computes every client's rows with flwr-datasets'
`DirichletPartitioner`. Both land in a cache folder as `.npy` files. Every later
process, including the fresh ClientApp process that a SuperNode starts for each message
in a deployment, memory-maps those files in milliseconds instead of decoding again.
"""

import functools
import gzip
import hashlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from pytorch_example.files import save_atomically

# Bump when the layout or meaning of the cached files changes.
CACHE_FORMAT = 2
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPLITS = ("train", "test")
# Dirichlet concentrations offered when the configured one cannot be satisfied.
ALPHA_LADDER = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
ALPHA_SEARCH_S = 20.0
# DirichletPartitioner's default, which this app keeps.
MIN_PARTITION_SIZE = 10


class DataError(RuntimeError):
    """The data cannot be had; the message is one line for the user.

    `setting` names the `DataSettings` field the user would change to fix it.
    """

    def __init__(self, message: str, setting: str) -> None:
        super().__init__(message)
        self.setting = setting


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
            f"partition {partition_id} does not exist: the train split is cut into "
            f"{settings.num_partitions} partitions, 0..{settings.num_partitions - 1}",
            setting="num_partitions",
        )
    images, labels, rows = _mapped_train_split(settings)
    train_start, val_start, val_end = partition_bounds(rows, partition_id)
    return Partition(
        train=_take(images, labels, rows[train_start:val_start]),
        val=_take(images, labels, rows[val_start:val_end]),
    )


@functools.lru_cache(maxsize=4)
def _mapped_train_split(settings: DataSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The train images, labels and partition rows, memory-mapped once per process.

    A simulation worker handles message after message: it opens the files once. (Data
    files changed while a process runs are seen by the next process.)
    """
    source_dir = ensure_decoded(settings)
    rows = np.load(ensure_partitions(settings), mmap_mode="r")
    images = np.load(source_dir / "train-images.npy", mmap_mode="r")
    labels = np.load(source_dir / "train-labels.npy", mmap_mode="r")
    return images, labels, rows


def load_test_set(settings: DataSettings) -> ImageSet:
    """Return the whole test split, for central evaluation on the ServerApp."""
    source_dir = ensure_decoded(settings)
    images = np.load(source_dir / "test-images.npy", mmap_mode="r")
    labels = np.load(source_dir / "test-labels.npy", mmap_mode="r")
    return ImageSet(torch.from_numpy(np.array(images)), torch.from_numpy(np.array(labels)))


def _take(images: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> ImageSet:
    # Reading rows in ascending order keeps memory-mapped reads sequential; the order
    # inside a partition does not matter since training shuffles it every epoch.
    rows = np.sort(rows)
    return ImageSet(torch.from_numpy(images[rows]), torch.from_numpy(labels[rows]))


# --- Decoding ---------------------------------------------------------------------


def ensure_decoded(settings: DataSettings) -> Path:
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
        f"'{folder}' holds neither the four Fashion-MNIST files ({expected}) nor train*/test* parquet files",
        setting="dataset_path",
    )


def _decode_source(settings: DataSettings) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read every image of both splits into memory, from IDX, parquet or the Hub."""
    if settings.dataset_path is None:
        return _decode_hf(
            lambda: _load_hf(settings.dataset_name),
            f"'{settings.dataset_name}' from the Hugging Face Hub",
            "dataset_name",
        )
    files = _local_source_files(settings.dataset_path)
    if files[0].name == IDX_FILES["train"][0]:
        splits = {
            split: (_read_idx(settings.dataset_path / images), _read_idx(settings.dataset_path / labels))
            for split, (images, labels) in IDX_FILES.items()
        }
        for split, (images_file, _) in IDX_FILES.items():
            _check_split(settings.dataset_path / images_file, *splits[split])
        return splits
    data_files = {split: [str(path) for path in files if path.name.startswith(split)] for split in SPLITS}
    return _decode_hf(
        lambda: _load_hf("parquet", data_files=data_files),
        f"the parquet files in '{settings.dataset_path}'",
        "dataset_path",
    )


def _read_idx(path: Path) -> np.ndarray:
    """Parse one gzipped IDX file (the format Fashion-MNIST ships in)."""
    expected = "a gzipped IDX file of unsigned bytes, as Zalando ships Fashion-MNIST"
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as err:
        raise DataError(f"'{path}' cannot be read as {expected} ({err})", setting="dataset_path") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"'{path}' is not {expected}: its header is wrong", setting="dataset_path")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=min(4 + 4 * ndim, len(raw)))
    if data.size != int(np.prod(shape)):
        raise DataError(
            f"'{path}' is truncated: expected {int(np.prod(shape))} values, found {data.size}",
            setting="dataset_path",
        )
    data = data.reshape(shape)
    return data.astype(np.int64) if ndim == 1 else data


def _check_split(source, images: np.ndarray, labels: np.ndarray) -> None:
    """Fashion-MNIST's shape: 28x28 images, one label in 0..9 per image."""
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(
            f"{source} holds images of shape {images.shape[1:]}: expected 28x28 grey images",
            setting="dataset_path",
        )
    if labels.shape != (len(images),) or (len(labels) and not 0 <= labels.min() <= labels.max() <= 9):
        raise DataError(
            f"{source} holds {len(images)} images but labels of shape {labels.shape} "
            f"in {labels.min() if len(labels) else '-'}..{labels.max() if len(labels) else '-'}: "
            "expected one label in 0..9 per image",
            setting="dataset_path",
        )


def _load_hf(path: str, **kwargs):
    import datasets  # noqa: PLC0415 (only the Hub and parquet paths need it)

    return datasets.load_dataset(path, **kwargs)


def _decode_hf(
    load: Callable[[], object], source: str, setting: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Both splits of a Hugging Face dataset with `image` and `label` columns."""
    try:
        dataset = load()
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"could not load {source} ({reason})", setting=setting) from err
    splits = {}
    for split in SPLITS:
        columns = dataset[split].column_names
        if not {"image", "label"} <= set(columns):
            raise DataError(
                f"the {split} split of {source} has columns {columns}: expected 'image' and 'label'",
                setting=setting,
            )
        numpy_split = dataset[split].with_format("numpy")
        try:
            images = np.asarray(numpy_split["image"], dtype=np.uint8)
            labels = np.asarray(numpy_split["label"], dtype=np.int64)
        except (TypeError, ValueError) as err:
            raise DataError(
                f"the {split} split of {source} does not hold 28x28 grey images and integer labels ({err})",
                setting=setting,
            ) from None
        _check_split(f"the {split} split of {source}", images, labels)
        splits[split] = (images, labels)
    return splits


# --- Partitioning -----------------------------------------------------------------
# One int64 file holds every client's rows: [N, 2N+1 offsets, rows...], where client
# p's train rows lie between offsets 2p and 2p+1 and its validation rows between 2p+1
# and 2p+2. A lookup reads three numbers and a slice of a memory map, whatever N is.


def ensure_partitions(settings: DataSettings) -> Path:
    """Return the file of every client's train/val rows, computing it if needed.

    Raises `DataError` naming the setting to change when the partitioner cannot
    satisfy `alpha` or the validation split would leave a client without rows.
    """
    source_dir = ensure_decoded(settings)
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
    rows_file = source_dir / f"partitions-{key}.npy"
    if not rows_file.exists():
        labels = np.load(source_dir / "train-labels.npy")
        rows = compute_partition_rows(labels, settings)
        parts = [rows[f"{kind}-{p}"] for p in range(settings.num_partitions) for kind in ("train", "val")]
        offsets = np.concatenate([[0], np.cumsum([len(part) for part in parts])])
        packed = np.concatenate([[settings.num_partitions], offsets, *parts]).astype(np.int64)
        save_atomically(rows_file, lambda f: np.save(f, packed))
    return rows_file


def partition_bounds(rows: np.ndarray, partition_id: int) -> tuple[int, int, int]:
    """Where client `partition_id`'s train rows start, its val rows start and end."""
    num_partitions = int(rows[0])
    data_start = 2 + 2 * num_partitions
    train_start, val_start, val_end = rows[1 + 2 * partition_id : 4 + 2 * partition_id]
    return data_start + int(train_start), data_start + int(val_start), data_start + int(val_end)


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

    table = datasets.Dataset.from_dict({"row": np.arange(len(labels)), "label": labels})
    # FederatedDataset shuffles each split with its seed before partitioning.
    table = table.shuffle(seed=settings.partition_seed)
    partitioner = _dirichlet_partitioner(
        table, settings.num_partitions, settings.alpha, settings.partition_seed
    )
    if not _can_assign(partitioner):
        raise DataError(_unsatisfiable_alpha(table, settings), setting="alpha")
    rows = {}
    for partition_id in range(settings.num_partitions):
        partition = partitioner.load_partition(partition_id)
        try:
            split = partition.train_test_split(test_size=settings.val_fraction, seed=settings.partition_seed)
        except ValueError:
            raise DataError(
                f"a validation share of {settings.val_fraction} leaves partition {partition_id} "
                f"({partition.num_rows} images) with an empty train or validation set",
                setting="val_fraction",
            ) from None
        rows[f"train-{partition_id}"] = np.asarray(split["train"]["row"], dtype=np.int64)
        rows[f"val-{partition_id}"] = np.asarray(split["test"]["row"], dtype=np.int64)
    return rows


def _dirichlet_partitioner(table, num_partitions: int, alpha: float, seed: int):
    from flwr_datasets.partitioner import DirichletPartitioner  # noqa: PLC0415

    partitioner = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=alpha,
        min_partition_size=MIN_PARTITION_SIZE,
        seed=seed,
    )
    partitioner.dataset = table
    return partitioner


def _can_assign(partitioner) -> bool:
    """Whether the partitioner finds partitions of its minimum size within its retries."""
    with warnings.catch_warnings():
        # It warns on every failed try; the caller reports the outcome in one line.
        warnings.simplefilter("ignore", UserWarning)
        try:
            partitioner.load_partition(0)
        except ValueError:
            return False
    return True


def _unsatisfiable_alpha(table, settings: DataSettings) -> str:
    """Why the partitioner gave up, and the smallest concentration that works here."""
    message = (
        f"alpha {settings.alpha} leaves some of the {settings.num_partitions} partitions of "
        f"{table.num_rows} images with fewer than the partitioner's minimum of "
        f"{MIN_PARTITION_SIZE} in every try"
    )
    most_partitions = table.num_rows // MIN_PARTITION_SIZE
    if settings.num_partitions > most_partitions:
        return f"{message}, whatever alpha: use at most {most_partitions} partitions"
    deadline = time.monotonic() + ALPHA_SEARCH_S
    for alpha in (candidate for candidate in ALPHA_LADDER if candidate > settings.alpha):
        if time.monotonic() > deadline:
            break
        if _can_assign(
            _dirichlet_partitioner(table, settings.num_partitions, alpha, settings.partition_seed)
        ):
            return f"{message}: use {alpha} or more, or fewer partitions"
    return f"{message}: use a larger alpha or fewer partitions"
