"""deploy/local_federation.py run for real, as its user would, for tests and benchmarks:
its own folder and Flower Config, optionally on a network host of harness/netns.py, and
SuperNodes started beside it as on other machines. `close()` brings down what it brought
up and fails if anything it started is still running."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from deploy import local_federation
from harness import mountns, netns
from harness.flower_processes import REPO, VENV_BIN, descendants, free_port, isolated_env

SCRIPT = REPO / "deploy" / "local_federation.py"


class Deployment:
    """The script with its own folder and Flower Config; `up` exports its SuperNodes' own
    data from `dataset` (the Fashion-MNIST files), as README's user passes --dataset-path."""

    def __init__(self, root: Path, namespace: str | None = None, dataset: Path | None = None) -> None:
        self.root = root
        self.dataset = dataset
        self.folder = root / "federation"
        self.env = isolated_env(root)
        self.namespace = namespace  # the host it runs on (see harness/netns.py); None: this one
        self.strangers: list[subprocess.Popen] = []
        self.seen: dict[int, str | None] = {}  # PID: start time, of every process `up` started

    def on_host(self, command: list[str], namespace: str | None = None) -> list[str]:
        namespace = namespace or self.namespace
        return netns.in_namespace(namespace, command) if namespace else command

    def script(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        command, *options = args
        if command == "up" and self.dataset and not {"--data", "--dataset-path"} & set(options):
            options = [*options, "--dataset-path", str(self.dataset)]
        done = subprocess.run(
            self.on_host([sys.executable, str(SCRIPT), command, "--dir", str(self.folder), *options]),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if command == "up" and (self.folder / "federation.json").exists():
            self.seen.update({pid: local_federation.start_time(pid) for pid in self.pids()})
        return done

    def up(self, *options: str) -> str:
        done = self.script("up", *options)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def state(self) -> dict:
        return json.loads((self.folder / "federation.json").read_text())

    def pids(self) -> list[int]:
        """What `up` started and everything below it, now."""
        return descendants([record["pid"] for record in self.state()["processes"]])

    def connection(self, name: str = "local-deployment") -> dict:
        with open(self.root / "flwr-home" / "config.toml", "rb") as file:
            return tomllib.load(file)["superlink"][name]

    def flwr(
        self,
        *args: str,
        cwd: Path | None = None,
        timeout: float = 600,
        env: dict | None = None,
        namespace: str | None = None,
    ) -> subprocess.CompletedProcess:
        """`flwr *args` as the SuperLink's operator, or as whoever `env` (their Flower
        Config and home) and `namespace` (their host) make it."""
        return subprocess.run(
            self.on_host([str(VENV_BIN / "flwr"), *args], namespace),
            cwd=cwd or self.root,
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def supernodes(self) -> list[dict]:
        listing = self.flwr("supernode", "list", "local-deployment", "--format", "json", timeout=60)
        return json.loads(listing.stdout)["nodes"]

    def start_stranger(
        self,
        name: str,
        *security: str,
        superlink: str | None = None,
        node_config: str = "partition-id=0 num-partitions=2",
        namespace: str | None = None,
        env: dict | None = None,
        supervised: bool = False,
        hidden: list[Path] | None = None,
    ) -> subprocess.Popen:
        """A SuperNode started by the caller, not by the script; `env` adds to its
        environment, and `hidden` folders it sees empty (harness/mountns.py)."""
        # As deploy/README.md starts one on another machine: through deploy/supernode.py.
        supernode = [sys.executable, str(REPO / "deploy" / "supernode.py")] if supervised else []
        command = [
            *(supernode or [str(VENV_BIN / "flower-supernode")]),
            *security,
            "--superlink",
            superlink or self.state()["address"],
            "--port",
            str(free_port()),
            "--node-config",
            node_config,
        ]
        if hidden:
            command = mountns.with_hidden(hidden, command)
        with open(self.root / f"{name}.log", "wb") as log:
            process = subprocess.Popen(
                self.on_host(command, namespace),
                env={**self.env, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.strangers.append(process)
        return process

    def enrol(self, machine: Path, name: str) -> Path:
        """README's steps for a SuperNode on machine folder `machine` (made here): its key
        pair made there, the public key registered here as `name`, `ca.pem` copied there.
        Returns the private key's path."""
        machine.mkdir()
        # The key pair is made on the SuperNode's machine; only the public key leaves it.
        key = machine / "supernode-key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key)], check=True)
        shutil.copy(key.with_suffix(".pub"), self.root / f"{name}.pub")
        registered = self.flwr("supernode", "register", f"{name}.pub", "local-deployment")
        assert registered.returncode == 0, registered.stdout + registered.stderr
        shutil.copy(self.folder / "ca.pem", machine / "ca.pem")
        return key

    def wait_until_connected(self, count: int, timeout_s: float = 120) -> None:
        """Until `status` counts `count` SuperNodes connected."""
        deadline = time.monotonic() + timeout_s
        while len(local_federation.connected(nodes := self.supernodes(), self.state()["since"])) < count:
            assert time.monotonic() < deadline, f"fewer than {count} SuperNodes connected: {nodes}"
            time.sleep(0.5)

    def crash(self) -> list[int]:
        """SIGKILL what `up` started and all below it (SuperLink, ServerApp, nginx, and any
        SuperNodes `up` started), as a power cut on its machine would; return their PIDs."""
        doomed = descendants(
            [record["pid"] for record in self.state()["processes"] if local_federation.alive(record)]
        )
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return doomed

    def close(self) -> None:
        try:
            for stranger in self.strangers:
                if stranger.poll() is not None:
                    continue  # ended and reaped: its PID may be another process's by now
                for pid in descendants([stranger.pid]):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                stranger.wait()
            if (self.folder / "federation.json").exists():
                self.script("down")
        finally:
            left = [
                pid
                for pid, started in self.seen.items()
                if started and local_federation.start_time(pid) == started
            ]
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left running after `down`: {left}"
