"""A process with a filesystem of its own, as on another machine: Linux mount namespaces.

`with_hidden(paths, command)` runs `command` in a mount namespace of its own (`unshare
--mount`, as root), where an empty tmpfs lies over each of `paths`: the process and all
it starts see those folders empty, while every other process sees them as they are.
Nothing is left behind: the namespace goes with its last process.
"""

import os
import shlex
import shutil
from pathlib import Path


def available() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None


def with_hidden(paths: list[Path], command: list[str]) -> list[str]:
    """`command`, run where each of `paths` (folders) is an empty tmpfs."""
    mounts = " && ".join(f"mount -t tmpfs -o size=1m tmpfs {shlex.quote(str(path))}" for path in paths)
    # The mounts are private to the namespace: nothing propagates back to this machine's.
    namespace = ["unshare", "--mount", "--propagation", "private"]
    return [*namespace, "sh", "-c", f'{mounts} && exec "$@"', "sh", *command]
