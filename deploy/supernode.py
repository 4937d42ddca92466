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
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

# What flower-supernode prints when the SuperLink refuses its key ("Exit Code: 305"
# above it; its exit status is then 1).
ACTIVATION_REFUSED = b"Failed to activate SuperNode."
RETRY_EVERY_S = 10.0
RETRY_FOR_S = 120.0  # Flower: a SuperNode is online until 2 x its 30 s heartbeat interval
GRACE_S = 5.0


def main(argv: list[str]) -> int:
    beside_python = Path(sys.executable).parent / "flower-supernode"
    command = [str(beside_python) if beside_python.exists() else shutil.which("flower-supernode"), *argv]
    if command[0] is None:
        print("supernode: flower-supernode not found: install the app (pip install -e .)", file=sys.stderr)
        return 1
    asked_to_stop: list[int] = []  # the signal, once one came (a handler only notes it)
    supernode: subprocess.Popen | None = None

    def pass_on(signum: int, _frame) -> None:
        asked_to_stop.append(signum)
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
        if asked_to_stop:  # a stop that came while it was being started
            supernode.send_signal(asked_to_stop[0])
        refused = threading.Event()
        printer = threading.Thread(target=pass_output, args=(supernode.stdout, refused), daemon=True)
        printer.start()
        code = supernode.wait()
        # A refused flower-supernode leaves its SuperExec running, retrying for good.
        end_session(supernode.pid)
        printer.join(timeout=GRACE_S)
        if asked_to_stop or not refused.is_set():
            return code if code >= 0 else 128 - code  # as a shell reports a signal
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
        retry_at = time.monotonic() + RETRY_EVERY_S
        while time.monotonic() < retry_at and not asked_to_stop:
            time.sleep(0.1)
        if asked_to_stop:
            return code


def end_session(session: int) -> None:
    """SIGTERM what is left of flower-supernode's session, then SIGKILL it after a grace."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(session, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline:
            os.killpg(session, 0)  # ProcessLookupError once none is left
            time.sleep(0.1)
        os.killpg(session, signal.SIGKILL)


def pass_output(output, refused: threading.Event) -> None:
    """Print what flower-supernode prints, and note a refusal of its key."""
    for line in output:
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
        if ACTIVATION_REFUSED in line:
            refused.set()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
