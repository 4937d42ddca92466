"""A SuperNode's own data folder, and the export that writes simulation's partitions as
such folders: image for image the rows simulation gives each partition."""

import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch

from pytorch_example.config import ConfigError, DataSource, Partitioning
from pytorch_example.data import load_partition
from pytorch_example.node_data import export, load_node_partition


@pytest.fixture
def source(idx_dataset, tmp_path) -> DataSource:
    return DataSource("zalando-datasets/fashion_mnist", idx_dataset, tmp_path / "server-cache")


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_an_exported_partition_holds_the_rows_simulation_gives_it_image_for_image(source, tmp_path, alpha):
    partitioning = Partitioning(num_partitions=4, dirichlet_alpha=alpha, partition_seed=7, val_fraction=0.2)
    folders = export(source, partitioning, tmp_path / "exported")
    assert [folder.name for folder in folders] == [f"partition-{i}" for i in range(4)]
    for partition_id, folder in enumerate(folders):
        simulated = load_partition(source, partitioning, partition_id)
        # The node reads it with its own cache and settings that, for an export, decide nothing.
        own, _ = load_node_partition(folder, tmp_path / "node-cache", val_fraction=0.5, partition_seed=0)
        for split in ("train", "val"):
            expected, got = getattr(simulated, split), getattr(own, split)
            assert len(got) > 0 and torch.equal(got.images, expected.images), (partition_id, split)
            assert torch.equal(got.labels, expected.labels), (partition_id, split)


def test_a_folder_of_one_dataset_is_split_as_simulation_splits_a_partition(tmp_path):
    """As `flwr-datasets create` writes it: one Dataset, split by val-fraction with the
    partition seed, as `train_test_split` splits a partition in simulation."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 50)
    rows = datasets.Dataset.from_dict({"image": list(images), "label": labels})
    rows.save_to_disk(str(tmp_path / "node"))
    # A node may not write into its data folder (root may anyway: the listing tells).
    (tmp_path / "node").chmod(0o555)
    listing = sorted(path.name for path in (tmp_path / "node").iterdir())
    own, _ = load_node_partition(tmp_path / "node", tmp_path / "cache", val_fraction=0.2, partition_seed=3)
    load_node_partition(tmp_path / "node", tmp_path / "cache", val_fraction=0.2, partition_seed=3)
    assert sorted(path.name for path in (tmp_path / "node").iterdir()) == listing
    assert len(list((tmp_path / "cache").glob("node-data-*"))) == 1  # decoded once, then mapped
    split = rows.train_test_split(test_size=0.2, seed=3).with_format("numpy")
    assert np.array_equal(own.train.images.numpy(), np.asarray(split["train"]["image"], dtype=np.uint8))
    assert np.array_equal(own.val.labels.numpy(), np.asarray(split["test"]["label"]))
    assert (len(own.train), len(own.val)) == (40, 10)


def test_parquet_files_named_by_split_are_read_as_those_splits(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "node"
    folder.mkdir()
    for name, count in (("train", 30), ("validation", 7)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        table = datasets.Dataset.from_dict(
            {"image": list(images), "label": rng.integers(0, 10, count)},
            features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
        )
        table.to_parquet(str(folder / f"{name}-00000.parquet"))
    own, _ = load_node_partition(folder, tmp_path / "cache", val_fraction=0.2, partition_seed=3)
    assert (len(own.train), len(own.val)) == (30, 7)


def test_a_second_load_maps_the_decoded_cache(tmp_path, source):
    partitioning = Partitioning(num_partitions=2, dirichlet_alpha=1.0, partition_seed=7, val_fraction=0.2)
    [folder, _] = export(source, partitioning, tmp_path / "exported")
    first, _ = load_node_partition(folder, tmp_path / "cache", 0.2, 7)
    [decoded] = (tmp_path / "cache").glob("node-data-*")
    before = {path.name: path.stat().st_mtime_ns for path in decoded.iterdir()}
    second, _ = load_node_partition(folder, tmp_path / "cache", 0.2, 7)
    assert {path.name: path.stat().st_mtime_ns for path in decoded.iterdir()} == before
    assert torch.equal(first.train.images, second.train.images)


def write_dataset(folder, columns: dict) -> None:
    datasets.Dataset.from_dict(columns).save_to_disk(str(folder))


def images_of(side: int, label: int) -> dict:
    return {"image": [np.zeros((side, side), np.uint8)] * 5, "label": [label] * 5}


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda folder: None, "is not a folder: point it at this SuperNode's own data folder"),
        (lambda folder: folder.mkdir(), "holds neither a datasets folder"),
        (
            lambda folder: write_dataset(folder, {"pixels": [[0] * 4] * 5, "label": [1] * 5}),
            "have columns ['pixels', 'label']: expected 'image' and 'label'",
        ),
        (
            lambda folder: write_dataset(
                folder, {"image": [np.zeros((5, 5), np.uint8)] * 5, "label": [1] * 5}
            ),
            "holds images of shape (5, 5): expected 28x28 grey images",
        ),
        (
            lambda folder: write_dataset(
                folder, {"image": [np.zeros((28, 28), np.uint8)] * 5, "label": [12] * 5}
            ),
            "expected one label in 0..9 per image",
        ),
    ],
)
def test_a_folder_the_node_cannot_use_is_refused_in_one_line_naming_the_key(tmp_path, make, said):
    folder = tmp_path / "node"
    make(folder)
    with pytest.raises(ConfigError) as refused:
        load_node_partition(folder, tmp_path / "cache", 0.2, 0)
    message = str(refused.value)
    assert message.startswith(f"node config key 'dataset-path' = '{folder}': ") and said in message
    assert "\n" not in message


def test_the_export_refuses_a_folder_that_holds_a_partition_and_leaves_it_as_it_was(source, tmp_path):
    partitioning = Partitioning(num_partitions=2, dirichlet_alpha=1.0, partition_seed=7, val_fraction=0.2)
    (tmp_path / "exported" / "partition-1").mkdir(parents=True)
    (tmp_path / "exported" / "partition-1" / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="already holds partition-1: choose another folder"):
        export(source, partitioning, tmp_path / "exported")
    assert sorted(path.name for path in (tmp_path / "exported").iterdir()) == ["partition-1"]
    assert (tmp_path / "exported" / "partition-1" / "mine.txt").read_text() == "keep"


def test_the_export_command_writes_every_partition_and_refuses_a_bad_flag_in_one_line(idx_dataset, tmp_path):
    command = [sys.executable, "-m", "pytorch_example.node_data", "export", "--out", str(tmp_path / "out")]
    done = subprocess.run(
        [
            *command,
            "--num-partitions",
            "3",
            "--dataset-path",
            str(idx_dataset),
            "--data-cache-dir",
            str(tmp_path / "cache"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [f"partition-{i}" for i in range(3)]
    refused = subprocess.run(
        [*command, "--num-partitions", "3", "--dirichlet-alpha", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 1
    assert refused.stderr.strip() == "error: --dirichlet-alpha 0: expected a number above 0"
