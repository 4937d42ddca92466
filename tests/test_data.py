"""The cached data path against the straightforward flwr-datasets path."""

import gzip
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import DirichletPartitioner

from harness.synthetic_fmnist import make_split, write_idx_dataset, write_parquet_dataset
from pytorch_example import data, data_cache
from pytorch_example.config import ConfigError, DataSource, Partitioning
from pytorch_example.data import load_partition, load_test_set
from pytorch_example.data_cache import DataError, has_split

NUM_TRAIN, NUM_TEST = 1500, 300


Settings = tuple[DataSource, Partitioning]


def settings_for(dataset_path: Path | None, cache_dir: Path, **changes) -> Settings:
    """The data source and partitioning of a test, with `changes` to either's fields."""
    source = DataSource("zalando-datasets/fashion_mnist", dataset_path, cache_dir)
    partitioning = Partitioning(num_partitions=5, dirichlet_alpha=1.0, partition_seed=42, val_fraction=0.2)
    return changed(source, partitioning, **changes)


def changed(source: DataSource, partitioning: Partitioning, **changes) -> Settings:
    source_fields = {key: value for key, value in changes.items() if hasattr(source, key)}
    partitioning_fields = {key: value for key, value in changes.items() if key not in source_fields}
    return replace(source, **source_fields), replace(partitioning, **partitioning_fields)


@pytest.fixture(scope="module")
def idx_folder(tmp_path_factory) -> Path:
    return write_idx_dataset(tmp_path_factory.mktemp("idx"), NUM_TRAIN, NUM_TEST)


@pytest.fixture(scope="module")
def parquet_folder(tmp_path_factory) -> Path:
    return write_parquet_dataset(tmp_path_factory.mktemp("parquet"), NUM_TRAIN, NUM_TEST)


def test_idx_files_decode_to_the_written_arrays(idx_folder, tmp_path):
    images, labels = make_split(NUM_TEST, seed=1)
    test_set = load_test_set(settings_for(idx_folder, tmp_path)[0])
    assert test_set.images.dtype.is_floating_point is False
    np.testing.assert_array_equal(test_set.images.numpy(), images)
    np.testing.assert_array_equal(test_set.labels.numpy(), labels)


@pytest.mark.parametrize("seed", [42, 7])
def test_partitions_match_federated_dataset_with_dirichlet_partitioner(parquet_folder, tmp_path, seed):
    """Same images per client as FederatedDataset + DirichletPartitioner + train_test_split."""
    settings = settings_for(parquet_folder, tmp_path, partition_seed=seed)
    reference = FederatedDataset(
        seed=seed,
        dataset="parquet",
        data_files={
            "train": str(parquet_folder / "train-00000-of-00001.parquet"),
            "test": str(parquet_folder / "test-00000-of-00001.parquet"),
        },
        partitioners={
            "train": DirichletPartitioner(
                num_partitions=settings[1].num_partitions, partition_by="label", alpha=1.0, seed=seed
            )
        },
    )
    for partition_id in range(settings[1].num_partitions):
        expected = reference.load_partition(partition_id).train_test_split(test_size=0.2, seed=seed)
        ours = load_partition(*settings, partition_id)
        for our_split, their_split in ((ours.train, expected["train"]), (ours.val, expected["test"])):
            their = their_split.with_format("numpy")
            assert sorted_rows(our_split.images.numpy(), our_split.labels.numpy()) == sorted_rows(
                np.asarray(their["image"]), np.asarray(their["label"])
            )


def sorted_rows(images: np.ndarray, labels: np.ndarray) -> list[bytes]:
    """A partition as an order-free multiset of (label, image) rows."""
    return sorted(bytes([label]) + image.tobytes() for image, label in zip(images, labels, strict=True))


def test_idx_and_parquet_sources_give_identical_partitions(idx_folder, parquet_folder, tmp_path):
    for partition_id in (0, 4):
        from_idx = load_partition(*settings_for(idx_folder, tmp_path / "a"), partition_id)
        from_parquet = load_partition(*settings_for(parquet_folder, tmp_path / "b"), partition_id)
        np.testing.assert_array_equal(from_idx.train.images.numpy(), from_parquet.train.images.numpy())
        np.testing.assert_array_equal(from_idx.val.labels.numpy(), from_parquet.val.labels.numpy())


def test_partitions_are_disjoint_and_cover_the_train_split(idx_folder, tmp_path):
    settings = settings_for(idx_folder, tmp_path)
    labels = make_split(NUM_TRAIN, seed=0)[1].astype(np.int64)
    rows = data.partition_rows(labels, settings[1])
    every_row = np.concatenate(list(rows.values()))
    assert len(every_row) == len(set(every_row.tolist())) == NUM_TRAIN
    for partition_id in range(settings[1].num_partitions):
        train, val = rows[f"train-{partition_id}"], rows[f"val-{partition_id}"]
        assert abs(len(val) - 0.2 * (len(train) + len(val))) <= 1


def test_partitions_are_deterministic_and_depend_on_the_seed(idx_folder, tmp_path):
    settings = settings_for(idx_folder, tmp_path)
    labels = make_split(NUM_TRAIN, seed=0)[1].astype(np.int64)
    first = data.partition_rows(labels, settings[1])
    again = data.partition_rows(labels, settings[1])
    other = data.partition_rows(labels, changed(*settings, partition_seed=7)[1])
    assert all(np.array_equal(first[key], again[key]) for key in first)
    assert not all(np.array_equal(first[key], other[key]) for key in first)


def test_warm_cache_never_decodes_again(idx_folder, tmp_path, monkeypatch):
    settings = settings_for(idx_folder, tmp_path)
    cold = load_partition(*settings, 2)

    def fail(*_):
        raise AssertionError("decoded or partitioned again despite a warm cache")

    monkeypatch.setattr(data_cache, "_decode_source", fail)
    monkeypatch.setattr(data, "partition_rows", fail)
    warm = load_partition(*settings, 2)
    np.testing.assert_array_equal(cold.train.images.numpy(), warm.train.images.numpy())
    assert not list(tmp_path.rglob(".*.tmp"))


def test_changed_partition_settings_never_reuse_a_stale_cache(idx_folder, tmp_path):
    settings = settings_for(idx_folder, tmp_path)
    load_partition(*settings, 0)
    for changed_settings in (
        changed(*settings, dirichlet_alpha=0.3),
        changed(*settings, num_partitions=6),
        changed(*settings, partition_seed=1),
        changed(*settings, val_fraction=0.5),
    ):
        labels = np.load(next(tmp_path.glob("fashion-mnist-*")) / "train-labels.npy")
        reference_rows = data.partition_rows(labels, changed_settings[1])
        partition = load_partition(*changed_settings, 0)
        np.testing.assert_array_equal(
            partition.train.labels.numpy(), labels[np.sort(reference_rows["train-0"])]
        )
        np.testing.assert_array_equal(partition.val.labels.numpy(), labels[np.sort(reference_rows["val-0"])])
    assert len(list(tmp_path.glob("fashion-mnist-*/partitions-*.npy"))) == 5


def test_changed_dataset_files_never_reuse_a_stale_cache(tmp_path):
    folder = write_idx_dataset(tmp_path / "data", NUM_TRAIN, NUM_TEST, seed=0)
    settings = settings_for(folder, tmp_path / "cache")
    before = load_test_set(settings[0]).images.numpy().copy()
    write_idx_dataset(folder, NUM_TRAIN, NUM_TEST, seed=10)  # same names, new content
    stat = (folder / "t10k-images-idx3-ubyte.gz").stat()
    os.utime(folder / "t10k-images-idx3-ubyte.gz", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = load_test_set(settings[0]).images.numpy()
    assert not np.array_equal(before, after)
    np.testing.assert_array_equal(after, make_split(NUM_TEST, seed=11)[0])


def test_folder_without_dataset_files_gives_one_clear_error(tmp_path):
    with pytest.raises(DataError, match=f"'{tmp_path}' holds neither the Fashion-MNIST files"):
        load_test_set(settings_for(tmp_path, tmp_path / "cache")[0])


def test_truncated_idx_file_is_reported(tmp_path):
    folder = write_idx_dataset(tmp_path / "data", 100, 50)
    raw = gzip.decompress((folder / "t10k-images-idx3-ubyte.gz").read_bytes())
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError, match="truncated"):
        load_test_set(settings_for(folder, tmp_path / "cache")[0])


def test_unreachable_hub_names_the_dataset(tmp_path):
    settings = settings_for(None, tmp_path / "cache", dataset_name="zalando-datasets/fashion_mnist")
    with pytest.raises(
        DataError, match="'zalando-datasets/fashion_mnist' from the Hugging Face Hub"
    ) as caught:
        load_test_set(settings[0])
    assert caught.value.key == "dataset-name"


def test_out_of_range_partition_id_is_rejected(idx_folder, tmp_path):
    with pytest.raises(ConfigError, match="partition 5 does not exist: .* 5 partitions, 0..4"):
        load_partition(*settings_for(idx_folder, tmp_path), 5)


def test_a_file_that_is_not_gzip_gives_one_line_naming_it(tmp_path):
    folder = write_idx_dataset(tmp_path / "data", 100, 50)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(b"not a gzip file at all")
    with pytest.raises(DataError) as caught:
        load_test_set(settings_for(folder, tmp_path / "cache")[0])
    message = str(caught.value)
    assert "train-labels-idx1-ubyte.gz' cannot be read as a gzipped IDX file" in message
    assert "\n" not in message and caught.value.key == "dataset-path"


def test_idx_images_of_the_wrong_shape_are_refused(tmp_path):
    folder = write_idx_dataset(tmp_path / "data", 100, 50)
    header = bytes([0, 0, 0x08, 3]) + b"".join(n.to_bytes(4, "big") for n in (50, 32, 32))
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + bytes(50 * 32 * 32)))
    with pytest.raises(DataError, match="shape \\(32, 32\\): expected 28x28 grey images"):
        load_test_set(settings_for(folder, tmp_path / "cache")[0])


def test_parquet_files_without_image_and_label_columns_give_one_line(tmp_path):
    import pyarrow as pa  # noqa: PLC0415 (a test extra, only this test needs it)
    import pyarrow.parquet as pq  # noqa: PLC0415

    folder = tmp_path / "parquet"
    folder.mkdir()
    for split in ("train", "test"):
        pq.write_table(pa.table({"pixels": [1, 2], "target": [0, 1]}), folder / f"{split}-0.parquet")
    with pytest.raises(DataError) as caught:
        load_test_set(settings_for(folder, tmp_path / "cache")[0])
    message = str(caught.value)
    assert f"the parquet files in '{folder}'" in message
    assert "expected 'image' and 'label'" in message and "\n" not in message


def test_an_alpha_the_partitioner_cannot_satisfy_names_one_that_works(tmp_path):
    labels = np.repeat(np.arange(10), 600)
    settings = settings_for(None, tmp_path, num_partitions=50, dirichlet_alpha=0.05)
    with pytest.raises(DataError, match="alpha 0.05 leaves some of the 50 partitions") as caught:
        data.partition_rows(labels, settings[1])
    assert caught.value.key == "dirichlet-alpha"
    suggested = float(str(caught.value).split("use ")[1].split(" or more")[0])
    rows = data.partition_rows(labels, changed(*settings, dirichlet_alpha=suggested)[1])
    # It works: 50 partitions, each at the partitioner's minimum or more, every row once.
    sizes = [len(rows[f"train-{i}"]) + len(rows[f"val-{i}"]) for i in range(50)]
    assert len(rows) == 100 and min(sizes) >= data.MIN_PARTITION_SIZE
    assert np.array_equal(np.sort(np.concatenate(list(rows.values()))), np.arange(len(labels)))


def test_too_many_partitions_for_the_data_is_said_at_once(tmp_path):
    labels = np.repeat(np.arange(10), 60)
    settings = settings_for(None, tmp_path, num_partitions=100)
    with pytest.raises(DataError, match="whatever alpha: use at most 60 partitions"):
        data.partition_rows(labels, settings[1])


def test_a_folder_with_the_test_split_alone_serves_central_evaluation_and_says_what_it_lacks(tmp_path):
    """A ServerApp whose SuperNodes bring their own data needs the test images only."""
    folder = write_idx_dataset(tmp_path / "data", 100, 50)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (folder / name).unlink()
    source = settings_for(folder, tmp_path / "cache")[0]
    assert not has_split(source, "train") and has_split(source, "test")
    assert len(load_test_set(source)) == 50
    with pytest.raises(DataError, match="holds no train split: expected train-images-idx3-ubyte.gz"):
        load_partition(source, Partitioning(2, 1.0, 42, 0.2), 0)
