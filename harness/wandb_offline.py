"""Read an offline W&B run back from its `.wandb` file, to check what a run logged.

The file is a LevelDB-style log (32 KiB blocks of chunks, each with a 7-byte header)
of `wandb_internal_pb2.Record` messages; wandb ships the message types but, since its
Go core, no reader.
"""

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2

FILE_HEADER_BYTES = 7  # ":W&B", a 2-byte magic and a version byte
BLOCK_BYTES = 32 * 1024
CHUNK_HEADER_BYTES = 7  # CRC-32, length, chunk type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What one offline run recorded."""

    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    artifacts: list[dict] = field(default_factory=list)
    exit_code: int | None = None


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    position, chunks, found = FILE_HEADER_BYTES, b"", []
    while position + CHUNK_HEADER_BYTES <= len(data):
        left_in_block = BLOCK_BYTES - position % BLOCK_BYTES
        if left_in_block < CHUNK_HEADER_BYTES:
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + CHUNK_HEADER_BYTES])
        if kind == 0:  # padding to the end of the block
            position += left_in_block
            continue
        if position + CHUNK_HEADER_BYTES + length > len(data):
            break  # still being written
        chunk = data[position + CHUNK_HEADER_BYTES : position + CHUNK_HEADER_BYTES + length]
        position += CHUNK_HEADER_BYTES + length
        chunks = chunk if kind in (FULL, FIRST) else chunks + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            found.append(record)
    return found


def read_offline_run(run_folder: Path, timeout_s: float = 30) -> OfflineRun:
    """Config, history rows, summary and exit code of `wandb/offline-run-*`.

    wandb's core process may still be writing when `finish()` returns: wait up to
    `timeout_s` for the run's exit record before reading what is there.
    """
    [path] = run_folder.glob("run-*.wandb")
    deadline = time.monotonic() + timeout_s
    while not any(record.WhichOneof("record_type") == "exit" for record in records(path)):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    run = OfflineRun()
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            run.config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            run.history.append(
                {
                    (item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "artifact":
            artifact = record.artifact
            run.artifacts.append(
                {
                    "name": artifact.name,
                    "type": artifact.type,
                    "aliases": list(artifact.aliases),
                    "metadata": json.loads(artifact.metadata or "{}"),
                    "files": [entry.path for entry in artifact.manifest.contents],
                }
            )
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run
