"""What a SuperNode's `--node-config` says of its client (`NodeConfig`: a simulation
partition, or a folder of its own data), and that folder: read by the SuperNode its
operator points at it, and written from simulation's partitions, one per SuperNode, by
the export.

    python -m pytorch_example.node_data export --num-partitions N --out DIR
        [--dataset-path FOLDER] [--dirichlet-alpha 1.0] [--partition-seed 42]
        [--val-fraction 0.2] [--data-cache-dir FOLDER]

A SuperNode started with `--node-config "dataset-path='<folder>'"` trains and evaluates
on that folder's rows and on nothing else. The folder is what Flower's examples load,
with an `image` column (28x28 grey) and a `label` column (0 to 9):
- a `datasets` folder written by `save_to_disk`: a `DatasetDict` with a `train` split and
  a `validation` (or `test`) split, as the export writes; or one `Dataset`, as
  `flwr-datasets create` writes, which the node splits by `val-fraction`, seeded by
  `partition-seed`, as simulation splits a partition;
- or parquet files: `train*.parquet` with `validation*` (or `test*`) beside them, or any
  `*.parquet`, split as one `Dataset` is.
The node decodes it once into its own cache folder, which every later ClientApp process
maps in milliseconds.
"""

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import UserConfig

from pytorch_example import data_cache
from pytorch_example.config import AppConfig, ConfigError, DataSource, Partitioning, is_count
from pytorch_example.data import ImageSet, Partition, load_partition
from pytorch_example.files import DEFAULT_CACHE_DIR, save_atomically

NODE_CONFIG_KEY = "dataset-path"  # where a SuperNode's --node-config names its folder
VALIDATION_SPLITS = ("validation", "test")
ROWS_KEY_FILE = "rows.sha256"  # beside the decoded arrays: a hash of the rows themselves


@dataclass(frozen=True)
class NodeConfig:
    """What a SuperNode's `--node-config` says of its client: either the simulation's
    partition it holds (`partition-id` of `num-partitions`, cut from the run's data), or
    its own data folder (`dataset-path`); where it keeps its head (`head-dir`; None: under
    its cache) and its cache (`data-cache-dir`; None: the run-config's for a partition,
    ~/.cache/pytorch-example on its own machine for its own data)."""

    partition_id: int | None
    num_partitions: int | None
    head_dir: Path | None
    dataset_path: Path | None = None
    cache_dir: Path | None = None

    @classmethod
    def from_node_config(cls, node_config: UserConfig) -> "NodeConfig":
        """Validate `node_config`; raise `ConfigError` in one line on bad input."""
        head_dir, dataset_path, cache_dir = (
            node_path(node_config, key) for key in ("head-dir", "dataset-path", "data-cache-dir")
        )
        if dataset_path is not None:
            if given := [key for key in ("partition-id", "num-partitions") if key in node_config]:
                raise ConfigError(
                    f"node config keys 'dataset-path' and '{given[0]}': a SuperNode holds its own data "
                    "folder or a simulation partition, not both: drop one"
                )
            return cls(None, None, head_dir, dataset_path, cache_dir)
        values = {}
        for key in ("partition-id", "num-partitions"):
            value = node_config.get(key)
            if not is_count(value) or value < 0:
                raise ConfigError(
                    f"node config key '{key}' is missing or not an integer >= 0: start the SuperNode with "
                    '--node-config "dataset-path=\'<its data folder>\'" (or "partition-id=<i> '
                    "num-partitions=<n>\" for a partition of the run's data)"
                )
            values[key] = value
        partition_id, num_partitions = values["partition-id"], values["num-partitions"]
        if partition_id >= num_partitions:
            raise ConfigError(
                f"node config partition-id={partition_id} num-partitions={num_partitions}: partition "
                f"{partition_id} does not exist: the train split is cut into {num_partitions} partitions, "
                f"0..{num_partitions - 1}"
            )
        return cls(partition_id, num_partitions, head_dir, cache_dir=cache_dir)


def node_path(node_config: UserConfig, key: str) -> Path | None:
    """Node config `key` as an absolute path, None when not set."""
    value = node_config.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"node config key '{key}' = {value!r} is invalid: expected a folder")
    return Path(value).expanduser().absolute()


def node_data_error(folder: Path, reason: str) -> ConfigError:
    return ConfigError(f"node config key '{NODE_CONFIG_KEY}' = '{folder}': {reason}")


def load_node_partition(
    folder: Path, cache_dir: Path, val_fraction: float, partition_seed: int
) -> tuple[Partition, str]:
    """This node's train and validation images, from `folder` (decoded into `cache_dir`
    the first time), and a hash of them: what names this node's rows, wherever they lie."""
    decoded = decoded_node_folder(folder, cache_dir, val_fraction, partition_seed)
    splits = {}
    for split in ("train", "val"):
        images = np.load(decoded / f"{split}-images.npy", mmap_mode="r")
        labels = np.load(decoded / f"{split}-labels.npy", mmap_mode="r")
        splits[split] = ImageSet(torch.from_numpy(np.array(images)), torch.from_numpy(np.array(labels)))
    return Partition(train=splits["train"], val=splits["val"]), (decoded / ROWS_KEY_FILE).read_text()


def decoded_node_folder(folder: Path, cache_dir: Path, val_fraction: float, partition_seed: int) -> Path:
    """The cache folder of `folder`'s decoded splits, decoding them if needed."""
    settings = [f"val-fraction={val_fraction!r}", f"partition-seed={partition_seed}"]
    decoded = cache_dir / f"node-data-{data_cache.files_key(settings, data_files(folder))}"
    data_cache.cached_splits(
        decoded, ("train", "val"), lambda: decode_node_folder(folder, val_fraction, partition_seed)
    )
    if not (decoded / ROWS_KEY_FILE).exists():
        digest = hashlib.sha256()
        for split in ("train", "val"):
            for kind in ("images", "labels"):
                digest.update(np.load(decoded / f"{split}-{kind}.npy").tobytes())
        save_atomically(decoded / ROWS_KEY_FILE, lambda file: file.write(digest.hexdigest().encode()))
    return decoded


def data_files(folder: Path) -> list[Path]:
    """The files whose contents decide the node's rows; a one-line error if `folder`
    holds none this module reads."""
    if not folder.is_dir():
        raise node_data_error(folder, "is not a folder: point it at this SuperNode's own data folder")
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        # Not the `cache-*.arrow` files that `datasets` may write beside a dataset.
        return [path for path in folder.rglob("*") if path.is_file() and not path.name.startswith("cache-")]
    if parquet := sorted(folder.rglob("*.parquet")):
        return parquet
    raise node_data_error(
        folder,
        "holds neither a datasets folder (save_to_disk: dataset_dict.json or state.json) nor parquet files",
    )


def decode_node_folder(folder: Path, val_fraction: float, partition_seed: int) -> dict:
    """`{"train": (images, labels), "val": (images, labels)}`, uint8 `[N, 28, 28]` and int64."""
    import datasets  # noqa: PLC0415 (a second to import; only a node's first process needs it)

    files = data_files(folder)
    try:
        if files[0].suffix == ".parquet":
            loaded = load_parquet(datasets, folder, files)
        else:
            # In memory: nothing is written into the node's data folder.
            loaded = datasets.load_from_disk(str(folder), keep_in_memory=True)
    except Exception as err:
        raise node_data_error(
            folder, f"cannot be read ({str(err).splitlines()[0] if str(err) else err!r})"
        ) from err
    if isinstance(loaded, datasets.DatasetDict):
        validation = next((name for name in VALIDATION_SPLITS if name in loaded), None)
        if "train" not in loaded or validation is None:
            if len(loaded) != 1:
                raise node_data_error(
                    folder, f"has the splits {sorted(loaded)}: expected 'train' and 'validation' (or 'test')"
                )
            loaded = next(iter(loaded.values()))
        else:
            loaded = {"train": loaded["train"], "val": loaded[validation]}
    if isinstance(loaded, datasets.Dataset):
        try:
            split = loaded.train_test_split(test_size=val_fraction, seed=partition_seed, keep_in_memory=True)
        except ValueError as err:
            raise node_data_error(
                folder, f"cannot be split by val-fraction={val_fraction:g} ({err})"
            ) from None
        loaded = {"train": split["train"], "val": split["test"]}
    return {name: decode_split(folder, name, dataset) for name, dataset in loaded.items()}


def load_parquet(datasets, folder: Path, files: list[Path]):
    """Parquet files as a DatasetDict by their names' first word, or one Dataset."""
    named = {
        split: [str(path) for path in files if path.name.startswith(split)]
        for split in ("train", *VALIDATION_SPLITS)
    }
    named = {split: paths for split, paths in named.items() if paths}
    if "train" in named and len(named) > 1:
        return datasets.load_dataset("parquet", data_files=named)
    return datasets.load_dataset("parquet", data_files=[str(path) for path in files], split="train")


def decode_split(folder: Path, name: str, dataset) -> tuple[np.ndarray, np.ndarray]:
    if not {"image", "label"} <= set(dataset.column_names):
        raise node_data_error(
            folder, f"its {name} rows have columns {dataset.column_names}: expected 'image' and 'label'"
        )
    if len(dataset) == 0:
        raise node_data_error(folder, f"has no {name} rows")
    numpy_split = dataset.with_format("numpy")
    try:
        images = np.asarray(numpy_split["image"], dtype=np.uint8)
        labels = np.asarray(numpy_split["label"], dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise node_data_error(
            folder, f"its {name} rows are not 28x28 grey images with integer labels ({err})"
        ) from None
    if (problem := data_cache.split_problem(f"its {name} rows", images, labels)) is not None:
        raise node_data_error(folder, problem)
    return images, labels


def export(source: DataSource, partitioning: Partitioning, out: Path) -> list[Path]:
    """Write partition i of simulation's (the same rows, image for image) as a datasets
    folder `out/partition-<i>`, for i in 0..N-1. Refuses a folder that already holds any."""
    import datasets  # noqa: PLC0415 (only the export writes datasets folders)

    folders = [out / f"partition-{partition_id}" for partition_id in range(partitioning.num_partitions)]
    if taken := [folder for folder in folders if folder.exists()]:
        raise ConfigError(f"--out '{out}' already holds {taken[0].name}: choose another folder, or remove it")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    out.mkdir(parents=True, exist_ok=True)
    for partition_id, folder in enumerate(folders):
        partition = load_partition(source, partitioning, partition_id)
        splits = {
            name: datasets.Dataset.from_dict(
                {"image": list(rows.images.numpy()), "label": rows.labels.numpy()}, features=features
            )
            for name, rows in (("train", partition.train), ("validation", partition.val))
        }
        # Written beside, then renamed: a folder that exists is whole.
        partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=out))
        try:
            datasets.DatasetDict(splits).save_to_disk(str(partial / "data"))
            os.replace(partial / "data", folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return folders


def main() -> None:
    """Export simulation's partitions, one folder each, for SuperNodes to be started with
    `--node-config "dataset-path='<out>/partition-<i>'"`."""
    defaults = AppConfig()
    parser = argparse.ArgumentParser(prog="python -m pytorch_example.node_data", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("export", help=export.__doc__.splitlines()[0])
    command.add_argument("--num-partitions", type=int, required=True)
    command.add_argument("--out", type=Path, required=True)
    command.add_argument("--dataset-path", type=Path, help="the Fashion-MNIST files (default: the Hub)")
    command.add_argument("--dataset-name", default=defaults.dataset_name)
    command.add_argument("--dirichlet-alpha", type=float, default=defaults.dirichlet_alpha)
    command.add_argument("--partition-seed", type=int, default=defaults.partition_seed)
    command.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    command.add_argument("--data-cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = parser.parse_args()
    try:
        if args.num_partitions < 1:
            raise ConfigError(f"--num-partitions {args.num_partitions}: expected 1 or more")
        if not args.dirichlet_alpha > 0:
            raise ConfigError(f"--dirichlet-alpha {args.dirichlet_alpha:g}: expected a number above 0")
        if not 0 < args.val_fraction < 1:
            raise ConfigError(f"--val-fraction {args.val_fraction:g}: expected a number in (0, 1)")
        if args.dataset_path is not None and not args.dataset_path.is_dir():
            raise ConfigError(f"--dataset-path '{args.dataset_path}' is not a folder")
        source = DataSource(args.dataset_name, args.dataset_path, args.data_cache_dir)
        partitioning = Partitioning(
            args.num_partitions, args.dirichlet_alpha, args.partition_seed, args.val_fraction
        )
        folders = export(source, partitioning, args.out)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    print(f"Wrote {len(folders)} partitions: {folders[0]} .. {folders[-1]}")


if __name__ == "__main__":
    main()
