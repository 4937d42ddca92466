"""A client's own head on its own disk, where it outlives a restarted SuperNode and a
resumed run: `<head-dir>/<lineage>/partition-<id>-of-<n>.pt`, or for a node with its
own data `own-data-<its rows' hash>.pt`.

`head-dir` comes from the node config, else `<data-cache-dir>/heads` (the node's own
cache, for a node with its own data). The lineage (sent by the ServerApp) is the same
for a run and its resumptions, which must keep its data and personalisation settings;
with the partition (or the rows' hash), the name holds all that decides the client's rows.
So a resumed run finds its heads, a new run starts fresh, and no client loads a head
trained on other rows.
"""

import re
import sys
from logging import DEBUG, INFO
from pathlib import Path

import torch
from flwr.common.logger import log

from pytorch_example.config import ConfigError
from pytorch_example.files import save_atomically

# A lineage is a run id, `uuid.uuid4().hex`; it becomes a folder name, so nothing else passes.
LINEAGE_PATTERN = re.compile(r"[0-9a-f]{32}")


class HeadStore:
    """This client's head file; without a lineage (a ServerApp other than this app's)
    there is none, and the head lives in memory only."""

    def __init__(self, head_dir: Path, lineage, rows_name: str) -> None:
        self.path = None
        if lineage and not LINEAGE_PATTERN.fullmatch(str(lineage)):
            # It names a folder: anything but a plain run id could lead outside head-dir.
            raise ConfigError(f"message key 'lineage' = {lineage!r} is not a run id (32 hex digits)")
        if lineage:
            self.path = head_dir / str(lineage) / f"{rows_name}.pt"

    def load(self) -> dict[str, torch.Tensor] | None:
        """The head kept on disk, or None."""
        if self.path is None or not self.path.is_file():
            return None
        # A SuperNode's operator reads it in its own log; a simulation (ClientApps in
        # Ray's actors, which a SuperNode's ClientApp never imports) would print it for
        # every client into one stream, so there the ServerApp says once how many it keeps.
        level = DEBUG if "ray" in sys.modules else INFO
        log(level, "Restored this client's head from %s", self.path)
        return torch.load(self.path, weights_only=True)

    def save(self, head: dict[str, torch.Tensor]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        save_atomically(self.path, lambda file: torch.save(head, file))
