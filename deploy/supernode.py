"""flower-supernode, started again while the SuperLink still counts its last session online.

A SuperNode that ends without signing off (SIGKILLed, its machine lost, the SuperLink
down when it stopped) stays online on the SuperLink for up to two of its heartbeats,
60 s, and meanwhile Flower refuses another SuperNode with the same key: it exits saying
"Exit Code: 305 ... Failed to activate SuperNode". This script runs flower-supernode
with the arguments it is given, passes on what it prints, and on that refusal alone
starts it again every 10 s for up to 2 minutes, which outlasts that window. Any other
end, and a stop you ask for (Ctrl-C, SIGTERM: passed on to flower-supernode), is final,
with flower-supernode's exit status.

    python deploy/supernode.py --root-certificates ca.pem --auth-supernode-private-key supernode-key \\
        --superlink superlink.example.org:9092 --node-config "partition-id=0 num-partitions=2"
"""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

# What flower-supernode prints when the SuperLink refuses its key (exit status 1 then).
ACTIVATION_REFUSED = b"Failed to activate SuperNode."
RETRY_EVERY_S = 10.0
RETRY_FOR_S = 120.0  # Flower: a SuperNode is online until 2 x its 30 s heartbeat interval


def main(argv: list[str]) -> int:
    command = [str(Path(sys.executable).parent / "flower-supernode"), *argv]
    stop = threading.Event()
    supernode: subprocess.Popen | None = None

    def pass_on(signum: int, _frame) -> None:
        stop.set()
        if supernode is not None and supernode.poll() is None:
            supernode.send_signal(signum)

    signal.signal(signal.SIGTERM, pass_on)
    signal.signal(signal.SIGINT, pass_on)
    give_up_at = None
    while True:
        # A session of its own: what it starts can be ended with it (below), and a
        # Ctrl-C reaches it once, from here.
        supernode = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        refused = threading.Event()
        printer = threading.Thread(target=pass_output, args=(supernode.stdout, refused))
        printer.start()
        code = supernode.wait()
        # A refused flower-supernode leaves its SuperExec running, retrying for good.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(supernode.pid, signal.SIGTERM)
        printer.join(timeout=10)
        if stop.is_set() or not refused.is_set():
            return code
        give_up_at = give_up_at or time.monotonic() + RETRY_FOR_S
        if time.monotonic() > give_up_at:
            print(
                f"supernode: the SuperLink still refuses this SuperNode after {RETRY_FOR_S:g}s: "
                "is its key registered (flwr supernode register)?",
                file=sys.stderr,
                flush=True,
            )
            return code
        print(
            "supernode: the SuperLink refused this SuperNode, as it does while it counts the "
            f"key's last session online (up to 60 s after it ended); starting it again in {RETRY_EVERY_S:g}s",
            file=sys.stderr,
            flush=True,
        )
        if stop.wait(RETRY_EVERY_S):
            return code


def pass_output(output, refused: threading.Event) -> None:
    """Print what flower-supernode prints, and note a refusal of its key."""
    for line in output:
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
        if ACTIVATION_REFUSED in line:
            refused.set()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
