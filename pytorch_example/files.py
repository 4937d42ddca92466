"""Where the app's files lie (its project folder, its cache), and writing them all or
nothing: what a concurrent reader or a crash sees is whole."""

import functools
import json
import os
import uuid
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

DISTRIBUTION_NAME = "pytorchexample"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "pytorch-example"


@functools.cache  # where the app is installed does not change while a process runs
def project_dir() -> Path:
    """The folder this app was installed from with `pip install -e .`, else the cwd.

    A local SuperLink runs the ServerApp in whatever folder the SuperLink was started
    from, so relative paths in the run-config are anchored to the project instead.
    """
    try:
        direct_url = distribution(DISTRIBUTION_NAME).read_text("direct_url.json")
    except PackageNotFoundError:
        direct_url = None
    if direct_url:
        info = json.loads(direct_url)
        if info.get("dir_info", {}).get("editable") and info.get("url", "").startswith("file:"):
            return Path(unquote(urlparse(info["url"]).path))
    return Path.cwd()


def resolve_path(value: str) -> Path:
    """Absolute paths as given (with `~` expanded); relative ones under `project_dir()`."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else project_dir() / path


def save_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write to a private temporary file, then rename: readers see all or nothing, and
    the file is its user's only whatever the umask (models, heads and scores of a
    federation's members)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
            write(file)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_json_atomically(path: Path, content) -> None:
    """`content` as indented JSON, written all or nothing."""
    data = json.dumps(content, indent=4).encode()
    save_atomically(path, lambda file: file.write(data))
