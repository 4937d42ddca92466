"""Speed machinery behind `data.py`: the images decoded once, every client's rows
computed once, both cached on disk as `.npy` files that any process maps in
milliseconds.

The first process that needs the data (the ServerApp, in practice) decodes Fashion-MNIST
into uint8 arrays and packs every client's rows into one file. Every later process,
including the fresh ClientApp process a SuperNode starts for each message in a
deployment, memory-maps them instead of decoding and partitioning again. What that
earns is measured in benchmarks/README.md#the-data-cache.
"""

import functools
import gzip
import hashlib
from collections.abc import Callable
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import numpy as np

from pytorch_example.config import ConfigError, DataSource, Partitioning
from pytorch_example.files import save_atomically

# Bump when the layout or meaning of the cached files changes.
CACHE_FORMAT = 2
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPLITS = ("train", "test")


class DataError(ConfigError):
    """A run-config value the data cannot satisfy, in one line that names the key."""

    def __init__(self, key: str, value, reason: str) -> None:
        shown = f"'{value}'" if isinstance(value, str | Path) else value
        super().__init__(f"run-config key '{key}' = {shown}: {reason}")
        self.key = key


# --- Decoded images ---------------------------------------------------------------


def split_arrays(source: DataSource, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images `[N, 28, 28]` uint8 and labels `[N]` int64 of `split`, memory-mapped."""
    if not has_split(source, split):
        expected = ", ".join(IDX_FILES[split])
        raise DataError(
            "dataset-path",
            source.dataset_path,
            f"holds no {split} split: expected {expected} or {split}*.parquet files",
        )
    folder = decoded_folder(source)
    images = np.load(folder / f"{split}-images.npy", mmap_mode="r")
    labels = np.load(folder / f"{split}-labels.npy", mmap_mode="r")
    return images, labels


def has_split(source: DataSource, split: str) -> bool:
    """Whether the source holds `split`: the Hub holds both; a folder may hold the test
    split alone (a server that only evaluates)."""
    return source.dataset_path is None or split in _local_source_files(source.dataset_path)


def decoded_folder(source: DataSource) -> Path:
    """The cache folder holding the source's decoded splits, decoding them if needed."""
    folder = source.data_cache_dir / f"fashion-mnist-{_source_key(source)}"
    splits = SPLITS if source.dataset_path is None else tuple(_local_source_files(source.dataset_path))
    return cached_splits(folder, splits, lambda: _decode_source(source))


def cached_splits(folder: Path, splits: tuple[str, ...], decode: Callable[[], dict]) -> Path:
    """`folder`, holding `<split>-images.npy` and `<split>-labels.npy` for each of
    `splits`; written from `decode()` (`{split: (images, labels)}`) if any is missing."""
    files = [folder / f"{split}-{kind}.npy" for split in splits for kind in ("images", "labels")]
    if all(path.exists() for path in files):
        return folder
    decoded = decode()
    folder.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in decoded.items():
        save_atomically(folder / f"{split}-images.npy", lambda f, a=images: np.save(f, a))
        save_atomically(folder / f"{split}-labels.npy", lambda f, a=labels: np.save(f, a))
    return folder


def files_key(settings: list[str], files: list[Path]) -> str:
    """Hash of `settings` and the files' paths, sizes and modification times: what decoded
    arrays depend on, short of reading every byte."""
    parts = [f"format={CACHE_FORMAT}", *settings]
    for path in sorted(files):
        stat = path.stat()
        parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _source_key(source: DataSource) -> str:
    """Hash of what the decoded arrays depend on: the source and its files' stats."""
    if source.dataset_path is None:
        return files_key([f"hub={source.dataset_name}"], [])
    files = [path for paths in _local_source_files(source.dataset_path).values() for path in paths]
    return files_key([], files)


def _local_source_files(folder: Path) -> dict[str, list[Path]]:
    """The files of each split the folder holds: both IDX files of a split, or its
    parquet files; a one-line error if it holds no split."""
    found = {}
    for split, names in IDX_FILES.items():
        if all((folder / name).is_file() for name in names):
            found[split] = [folder / name for name in names]
    if not found:
        parquet_files = sorted(folder.rglob("*.parquet"))
        for split in SPLITS:
            if files := [path for path in parquet_files if path.name.startswith(split)]:
                found[split] = files
    if not found:
        expected = ", ".join(name for names in IDX_FILES.values() for name in names)
        raise DataError(
            "dataset-path",
            folder,
            f"'{folder}' holds neither the Fashion-MNIST files ({expected}) nor train*/test* parquet files",
        )
    return found


def _decode_source(source: DataSource) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read every image of the splits the source holds into memory, from IDX, parquet or the Hub."""
    if source.dataset_path is None:
        return _decode_hf(
            lambda: _load_hf(source.dataset_name),
            f"'{source.dataset_name}' from the Hugging Face Hub",
            "dataset-name",
            source.dataset_name,
        )
    files = _local_source_files(source.dataset_path)
    if next(iter(files.values()))[0].suffix != ".parquet":
        splits = {split: (_read_idx(images), _read_idx(labels)) for split, (images, labels) in files.items()}
        for split, (images_file, _) in files.items():
            _check_split(images_file, *splits[split], "dataset-path", source.dataset_path)
        return splits
    data_files = {split: [str(path) for path in paths] for split, paths in files.items()}
    return _decode_hf(
        lambda: _load_hf("parquet", data_files=data_files),
        f"the parquet files in '{source.dataset_path}'",
        "dataset-path",
        source.dataset_path,
    )


def _read_idx(path: Path) -> np.ndarray:
    """Parse one gzipped IDX file (the format Fashion-MNIST ships in)."""
    expected = "a gzipped IDX file of unsigned bytes, as Zalando ships Fashion-MNIST"
    folder = path.parent
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as err:
        raise DataError("dataset-path", folder, f"'{path}' cannot be read as {expected} ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError("dataset-path", folder, f"'{path}' is not {expected}: its header is wrong")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=min(4 + 4 * ndim, len(raw)))
    if data.size != int(np.prod(shape)):
        raise DataError(
            "dataset-path",
            folder,
            f"'{path}' is truncated: expected {int(np.prod(shape))} values, found {data.size}",
        )
    data = data.reshape(shape)
    return data.astype(np.int64) if ndim == 1 else data


def _check_split(where, images: np.ndarray, labels: np.ndarray, key: str, value) -> None:
    if (problem := split_problem(where, images, labels)) is not None:
        raise DataError(key, value, problem)


def split_problem(where, images: np.ndarray, labels: np.ndarray) -> str | None:
    """Why `images` and `labels` are not Fashion-MNIST's shape (28x28 images, one label
    in 0..9 per image), or None."""
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        return f"{where} holds images of shape {images.shape[1:]}: expected 28x28 grey images"
    if labels.shape != (len(images),) or (len(labels) and not 0 <= labels.min() <= labels.max() <= 9):
        return (
            f"{where} holds {len(images)} images but labels of shape {labels.shape} "
            f"in {labels.min() if len(labels) else '-'}..{labels.max() if len(labels) else '-'}: "
            "expected one label in 0..9 per image"
        )
    return None


def _load_hf(path: str, **kwargs):
    import datasets  # noqa: PLC0415 (only the Hub and parquet paths need it)

    return datasets.load_dataset(path, **kwargs)


def _decode_hf(
    load: Callable[[], object], where: str, key: str, value
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Both splits of a Hugging Face dataset with `image` and `label` columns."""
    try:
        dataset = load()
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        fix = ""
        if key == "dataset-name":
            fix = (
                "; set run-config key 'dataset-path' to a folder with the Fashion-MNIST .gz or parquet files"
            )
        raise DataError(key, value, f"could not load {where} ({reason}){fix}") from err
    splits = {}
    for split in (split for split in SPLITS if split in dataset):
        columns = dataset[split].column_names
        if not {"image", "label"} <= set(columns):
            raise DataError(
                key,
                value,
                f"the {split} split of {where} has columns {columns}: expected 'image' and 'label'",
            )
        numpy_split = dataset[split].with_format("numpy")
        try:
            images = np.asarray(numpy_split["image"], dtype=np.uint8)
            labels = np.asarray(numpy_split["label"], dtype=np.int64)
        except (TypeError, ValueError) as err:
            raise DataError(
                key,
                value,
                f"the {split} split of {where} does not hold 28x28 grey images and integer labels ({err})",
            ) from None
        _check_split(f"the {split} split of {where}", images, labels, key, value)
        splits[split] = (images, labels)
    return splits


# --- Every client's rows, packed ----------------------------------------------------
# One int64 file holds every client's rows: [N, 2N+1 offsets, rows...], where client
# p's train rows lie between offsets 2p and 2p+1 and its validation rows between 2p+1
# and 2p+2. A lookup reads three numbers and a slice of a memory map, whatever N is.

RowsRecipe = Callable[[np.ndarray, Partitioning], dict[str, np.ndarray]]


def packed_rows_file(source: DataSource, partitioning: Partitioning, recipe: RowsRecipe) -> Path:
    """The file of every client's train/validation rows, computing them with
    `recipe(train_labels, partitioning)` (`train-<id>`, `val-<id>`) if needed."""
    _, train_labels = split_arrays(source, "train")  # a one-line error if there is no train split
    folder = decoded_folder(source)
    settings = [f"{name}={value!r}" for name, value in asdict(partitioning).items()]
    key = hashlib.sha256("\n".join([*settings, *library_versions()]).encode()).hexdigest()[:16]
    rows_file = folder / f"partitions-{key}.npy"
    if not rows_file.exists():
        rows = recipe(np.array(train_labels), partitioning)
        count = partitioning.num_partitions
        parts = [rows[f"{kind}-{p}"] for p in range(count) for kind in ("train", "val")]
        offsets = np.concatenate([[0], np.cumsum([len(part) for part in parts])])
        packed = np.concatenate([[count], offsets, *parts]).astype(np.int64)
        save_atomically(rows_file, lambda f: np.save(f, packed))
    return rows_file


@functools.lru_cache(maxsize=4)
def mapped_train_split(
    source: DataSource, partitioning: Partitioning, recipe: RowsRecipe
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The train images, labels and packed rows, memory-mapped once per process.

    A simulation worker handles message after message: it opens the files once. (Data
    files changed while a process runs are seen by the next process.)
    """
    rows = np.load(packed_rows_file(source, partitioning, recipe), mmap_mode="r")
    return *split_arrays(source, "train"), rows


def partition_slices(rows: np.ndarray, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Client `partition_id`'s train rows and validation rows, from the packed rows."""
    data_start = 2 + 2 * int(rows[0])
    train_start, val_start, val_end = (
        data_start + int(i) for i in rows[1 + 2 * partition_id : 4 + 2 * partition_id]
    )
    return rows[train_start:val_start], rows[val_start:val_end]


@functools.cache
def library_versions() -> tuple[str, ...]:
    """Their partitioning, shuffling and random numbers decide the rows too."""
    return tuple(f"{name}={version(name)}" for name in ("flwr-datasets", "datasets", "numpy"))
