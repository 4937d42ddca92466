"""Synthetic data in Fashion-MNIST's exact file format, for tests and benchmarks.

The Hugging Face Hub is out of reach in CI, so tests write the four Zalando `.gz` IDX
files (or the Hub's parquet layout) themselves and feed them through the same
`dataset-path` code path users take. Each class is a fixed random pattern plus noise,
so a model can learn it and accuracies move. These images are not Fashion-MNIST.

    python -m harness.synthetic_fmnist OUT_DIR [--train 60000] [--test 10000] [--noise 200]
"""

import argparse
import gzip
import io
from pathlib import Path

import numpy as np

NUM_CLASSES = 10
IMAGE_SIDE = 28


def make_split(count: int, seed: int, noise: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """`count` uint8 images `[count, 28, 28]` and int labels, reproducible from `seed`.

    `noise` is the pixel noise's standard deviation: higher makes the classes harder.
    """
    # Coarse, mirror-symmetric class patterns survive the random crops and flips of
    # training augmentation, as the shapes of real clothes do.
    coarse = np.random.default_rng(12345).uniform(0, 255, (NUM_CLASSES, 4, 4))
    coarse = (coarse + coarse[:, :, ::-1]) / 2
    templates = np.kron(coarse, np.ones((IMAGE_SIDE // 4, IMAGE_SIDE // 4)))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, count)
    pixel_noise = rng.normal(0, noise, (count, IMAGE_SIDE, IMAGE_SIDE))
    images = np.clip(templates[labels] + pixel_noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.uint8)


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array (magic 0x0000 08 <ndim>, big-endian dims)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx_dataset(
    folder: Path, num_train: int, num_test: int, seed: int = 0, noise: float = 60.0
) -> Path:
    """Write the four Zalando `.gz` files into `folder`; return it."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count, split_seed in (("train", num_train, seed), ("t10k", num_test, seed + 1)):
        images, labels = make_split(count, split_seed, noise)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            (folder / f"{prefix}-{kind}-ubyte.gz").write_bytes(
                gzip.compress(idx_bytes(array), compresslevel=1)
            )
    return folder


def write_parquet_dataset(
    folder: Path, num_train: int, num_test: int, seed: int = 0, noise: float = 60.0
) -> Path:
    """Write the same images as PNG-in-parquet, the Hub's layout, into `folder`."""
    import datasets  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=NUM_CLASSES)}
    )
    for split, count, split_seed in (("train", num_train, seed), ("test", num_test, seed + 1)):
        images, labels = make_split(count, split_seed, noise)
        pngs = []
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            pngs.append({"bytes": buffer.getvalue(), "path": None})
        table = datasets.Dataset.from_dict({"image": pngs, "label": labels.tolist()}, features=features)
        table.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=60_000, help="train images (default 60000)")
    parser.add_argument("--test", type=int, default=10_000, help="test images (default 10000)")
    # 200 from the command line: as hard as the figures in docs/ and _static/ (the
    # tests' small sets keep 60, so that a few hundred rows learn).
    parser.add_argument(
        "--noise", type=float, default=200.0, help="pixel noise, higher is harder (default 200)"
    )
    args = parser.parse_args()
    print(write_idx_dataset(args.out_dir, args.train, args.test, noise=args.noise))
