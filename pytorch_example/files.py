"""Writing files all or nothing: what a concurrent reader or a crash sees is whole."""

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


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
