"""A run under a burst of hostile requests, with and without nginx in front of the SuperLink.

    python -m benchmarks.public_port [--rounds 8] [--burst-after 3] [--requests 2000]

For each of two set-ups, `deploy/local_federation.py up` starts a TLS federation with
SuperNode authentication and 2 SuperNodes on this machine, and the app runs `--rounds`
rounds on a generated 60,000 + 10,000-image set (both SuperNodes train and evaluate
every round). Once `--burst-after` rounds have landed, `harness.burst` sends its
`--requests` hostile requests (and holds 200 stalled TLS handshakes) at the address
SuperNodes use:
- `superlink port`: the SuperLink's own port, as every federation was before nginx;
- `nginx`: `up --host 127.0.0.2`, nginx on 127.0.0.2 passing the Fleet API only.
It prints what each request got back, and the seconds per round before, during and
after the burst (a round is "during" if it overlaps the burst at all).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from deploy.local_federation import free_port
from harness.burst import burst
from harness.flower_processes import (
    REPO,
    VENV_BIN,
    RoundLandings,
    copy_app,
    isolated_env,
    pairs,
    started_run_id,
)
from harness.synthetic_fmnist import write_idx_dataset

SCRIPT = REPO / "deploy" / "local_federation.py"


def measure(work: Path, dataset: Path, public: bool, args: argparse.Namespace) -> dict:
    env = isolated_env(work)
    folder = work / "federation"

    def script(*options: str) -> str:
        done = subprocess.run(
            [sys.executable, str(SCRIPT), *options, "--dir", str(folder)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode:
            raise RuntimeError(done.stdout + done.stderr)
        return done.stdout

    port = free_port()
    host = "127.0.0.2" if public else "127.0.0.1"
    output_dir = work / "outputs"
    run_config = {
        "num-server-rounds": args.rounds,
        "fraction-train": 1.0,
        "fraction-evaluate": 1.0,
        "dataset-path": str(dataset),
        "data-cache-dir": str(work / "cache"),
        "output-dir": str(output_dir),
        "use-wandb": False,
    }
    script(
        "up",
        "--host",
        host,
        "--port",
        str(port),
        "--dataset-path",
        str(dataset),
        *(["--san", host] if public else []),
    )
    landings = RoundLandings(output_dir)
    landed = landings.landed
    try:
        submitted = subprocess.run(
            [str(VENV_BIN / "flwr"), "run", ".", "local-deployment", "--run-config", pairs(run_config)],
            cwd=copy_app(work / "app"),
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        run_id = started_run_id(submitted.stdout + submitted.stderr)

        status = [str(VENV_BIN / "flwr"), "ls", "local-deployment", "--run-id", run_id, "--format", "json"]

        def wait_for_rounds(count: int) -> None:
            while len(landed) < count:
                listing = subprocess.run(
                    status,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                [record] = json.loads(listing.stdout)["runs"]
                if record["status"].startswith("finished"):
                    time.sleep(1)  # the last entry may land a moment after the status
                    if len(landed) < count:
                        raise RuntimeError(f"the run ended {record['status']} after {len(landed)} rounds")
                time.sleep(0.5)

        wait_for_rounds(args.burst_after)
        burst_started = time.perf_counter()
        result = burst(f"{host}:{port}", str(folder / "ca.pem"), requests=args.requests)
        burst_ended = time.perf_counter()
        wait_for_rounds(args.rounds)
    finally:
        landings.stop()
        script("down")
    ends = [landed[r] for r in range(1, args.rounds + 1)]
    rounds = {"before": [], "during": [], "after": []}
    for start, end in zip(ends, ends[1:], strict=False):
        phase = "before" if end <= burst_started else "after" if start >= burst_ended else "during"
        rounds[phase].append(end - start)
    return {"burst": result, "burst_s": burst_ended - burst_started, "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--burst-after", type=int, default=3, help="rounds landed before the burst")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument(
        "--setups", nargs="+", default=["superlink port", "nginx"], choices=["superlink port", "nginx"]
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="public-port-") as tmp:
        work = Path(tmp)
        dataset = write_idx_dataset(work / "fmnist-idx", 60_000, 10_000, noise=200.0)
        for name in args.setups:
            public = name == "nginx"
            measured = measure(work / name.replace(" ", "-"), dataset, public, args)
            print(f"\n== {name}: {args.requests} requests in {measured['burst_s']:.1f} s")
            for kind, statuses in measured["burst"]["statuses"].items():
                print(f"  {kind:<16} {statuses}")
            print(f"  half-open TLS    {measured['burst']['half_open']}")
            for phase, seconds in measured["rounds"].items():
                if seconds:
                    print(
                        f"  rounds {phase:<7} {np.mean(seconds):6.1f} s/round "
                        f"({', '.join(f'{s:.1f}' for s in seconds)})"
                    )


if __name__ == "__main__":
    main()
