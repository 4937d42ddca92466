"""Real Flower processes on loopback for tests and benchmarks, and nothing left behind.

`LocalFederation` starts a SuperLink on free ports (with the Simulation Engine, or with
SuperNodes for the Deployment Engine), with `FLWR_HOME` and `HOME` in its own folder,
and `stop()` ends every process it started, by PID.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

from deploy import local_federation
from deploy.local_federation import free_port

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 1800


def default_run_config() -> dict:
    """The run-config defaults from pyproject.toml."""
    with open(REPO / "pyproject.toml", "rb") as file:
        return tomllib.load(file)["tool"]["flwr"]["app"]["config"]


def copy_app(destination: Path, client_app: str | None = None, extra_config: dict | None = None) -> Path:
    """A copy of the app to run: `flwr run` rewrites the pyproject.toml it is given.

    With `client_app` (`"module.path:object"`, a module of this repository such as
    `harness.attacks:app`), the copy ships that module too and runs it as its ClientApp.
    `extra_config` adds run-config keys, with their defaults, that such a module reads.
    """
    destination.mkdir(parents=True)
    shutil.copytree(
        REPO / "pytorch_example",
        destination / "pytorch_example",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    pyproject = (REPO / "pyproject.toml").read_text()
    if client_app:
        module = Path(*client_app.partition(":")[0].split(".")).with_suffix(".py")
        (destination / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / module, destination / module)
        own_app, own_include = 'clientapp = "pytorch_example.client_app:app"', '"pytorch_example/*.py"'
        assert own_app in pyproject and own_include in pyproject, "pyproject.toml no longer names them so"
        pyproject = pyproject.replace(own_app, f'clientapp = "{client_app}"')
        pyproject = pyproject.replace(own_include, f'{own_include}, "{module}"')
    if extra_config:
        section = "[tool.flwr.app.config]\n"
        assert section in pyproject, "pyproject.toml has no run-config section"
        keys = "".join(f"{key} = {toml_value(value)}\n" for key, value in extra_config.items())
        pyproject = pyproject.replace(section, section + keys)
    (destination / "pyproject.toml").write_text(pyproject)
    return destination


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def pairs(values: dict) -> str:
    """`{"a": 1, "b": "x"}` -> `a=1 b="x"`, the form of --run-config and --node-config."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())


def isolated_env(root: Path) -> dict:
    """This environment with its own Flower Config and home under `root`, no W&B
    credentials, and the Hub out of reach."""
    (root / "flwr-home").mkdir(parents=True)
    (root / "home").mkdir()
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("WANDB_") and key != "FLWR_HOME"
    }
    env.update(
        FLWR_HOME=str(root / "flwr-home"),
        HOME=str(root / "home"),
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def trained_rounds(results_file: Path) -> list[dict]:
    """A results.json's rounds, after round 0 (the initial central scores, when the run
    had them)."""
    return [entry for entry in json.loads(results_file.read_text()) if entry["round"] > 0]


class RoundLandings:
    """When each round's results.json entry first appeared under `output_dir` (by
    `time.perf_counter()`, looked for every `every_s` from a thread, until `stop()`), the
    entry as it landed, and any round whose entry changed after (a round run twice)."""

    def __init__(self, output_dir: Path, every_s: float = 0.05) -> None:
        self.output_dir = output_dir
        self.every_s = every_s
        self.landed: dict[int, float] = {}
        self.entries: dict[int, dict] = {}
        self.repeated: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.every_s):
            self.look()

    def look(self) -> None:
        for results in self.output_dir.glob("*/*/results.json"):
            try:
                entries = json.loads(results.read_text())
            except (OSError, ValueError):
                continue
            for entry in entries:
                if entry["round"] == 0:  # the initial central evaluation, before any round
                    continue
                first = self.entries.setdefault(entry["round"], entry)
                self.landed.setdefault(entry["round"], time.perf_counter())
                if first != entry:
                    self.repeated.add(entry["round"])

    def stop(self) -> dict[int, float]:
        self._stop.set()
        self._thread.join()
        return self.landed


def started_run_id(flwr_run_output: str) -> str:
    """The run id `flwr run` printed, or an error holding all it printed."""
    match = re.search(r"Successfully started run (\d+)", flwr_run_output)
    if not match:
        raise RuntimeError(f"flwr run did not start a run:\n{flwr_run_output}")
    return match.group(1)


def descendants(root_pids: list[int]) -> list[int]:
    """`root_pids` and every process below them."""
    return [*root_pids, *(pid for root in root_pids for pid in local_federation.descendants(root))]


class LocalFederation:
    """A SuperLink and, in deployment, one SuperNode per entry of `node_configs`.

    With `node_configs=None` the SuperLink runs the Simulation Engine, as the one
    `flwr run .` starts, but on free ports and in our own `FLWR_HOME`.
    """

    def __init__(
        self, root: Path, node_configs: list[dict] | None = None, superexec_poll_s: float = 0.1
    ) -> None:
        self.root = root
        # As deploy/local_federation.py's `up` sets it: SuperExec checks for work every
        # second by default, and a round pays that twice (benchmarks/round_cost).
        self.superexec_poll_s = superexec_poll_s
        self.flwr_home = root / "flwr-home"
        self.env = isolated_env(root)
        self.simulation = node_configs is None
        self.port = free_port()
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self.processes: list[subprocess.Popen] = []
        self.logs = []
        try:
            self._start(
                "superlink",
                [
                    "flower-superlink",
                    "--insecure",
                    *(["--simulation"] if self.simulation else []),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--control-api-address",
                    f"127.0.0.1:{free_port()}",
                    "--database",
                    str(root / "state.db"),
                ],
            )
            self._wait_for_port(self.port)
            # SuperNodes sharing this machine share its cores: more torch threads than
            # cores make every ClientApp many times slower (measured: 20x on 2 cores).
            self.threads_per_node = str(max(1, (os.cpu_count() or 1) // max(1, len(node_configs or []))))
            self.node_configs = node_configs or []
            self.supernodes: dict[int, subprocess.Popen] = {}
            for index in range(len(self.node_configs)):
                self.start_supernode(index)
        except BaseException:
            self.stop()
            raise

    def start_supernode(self, index: int, name: str | None = None) -> None:
        """Start SuperNode `index` with its node config (again, after `kill_supernode`)."""
        self._start(
            name or f"supernode-{index}",
            [
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--port",
                str(free_port()),
                "--node-config",
                pairs(self.node_configs[index]),
            ],
            extra_env={
                "OMP_NUM_THREADS": self.threads_per_node,
                "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(self.superexec_poll_s),
            },
        )
        self.supernodes[index] = self.processes[-1]

    def kill_supernode(self, index: int) -> None:
        """SIGKILL SuperNode `index` and its ClientApps, as a machine failure would."""
        for pid in descendants([self.supernodes[index].pid]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.supernodes[index].wait()

    def status(self, run_id: str) -> dict:
        listing = self.flwr("ls", "test", "--format", "json", cwd=self.root, timeout=60)
        return next(run for run in json.loads(listing.stdout)["runs"] if run["run-id"] == run_id)

    def _start(self, name: str, command: list[str], extra_env: dict | None = None) -> None:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 (closed by stop())
        self.logs.append(log)
        self.processes.append(
            subprocess.Popen(
                [str(VENV_BIN / command[0]), *command[1:]],
                env={**self.env, **(extra_env or {})},
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def _wait_for_port(self, port: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.processes[0].poll() is not None:
                raise RuntimeError(f"flower-superlink exited: see {self.root / 'superlink.log'}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError("flower-superlink did not open its port in time")

    def flwr(self, *args: str, cwd: Path, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(VENV_BIN / "flwr"), *args],
            cwd=cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def run(self, app_dir: Path, run_config: dict, federation_config: dict | None = None) -> tuple[str, dict]:
        """`flwr run` the app to completion; return its streamed log and its run record.

        `federation_config` (simulation only) is e.g. `{"num-supernodes": 4}`.
        """
        federation = []
        if federation_config:
            federation = ["--federation-config", pairs(federation_config)]
        done = self.flwr(
            "run", ".", "test", "--run-config", pairs(run_config), *federation, "--stream", cwd=app_dir
        )
        output = done.stdout + done.stderr
        run_id = started_run_id(output)
        listing = self.flwr("ls", "test", "--format", "json", cwd=app_dir, timeout=60)
        runs = json.loads(listing.stdout)["runs"]
        record = next(run for run in runs if run["run-id"] == run_id)
        return output, record

    def submit(self, app_dir: Path, run_config: dict, federation_config: dict | None = None) -> str:
        """`flwr run` without waiting for the run to end; return its run id."""
        federation = ["--federation-config", pairs(federation_config)] if federation_config else []
        done = self.flwr("run", ".", "test", "--run-config", pairs(run_config), *federation, cwd=app_dir)
        return started_run_id(done.stdout + done.stderr)

    def kill(self) -> None:
        """SIGKILL every process started here and all they started, as a crash would."""
        # Found first: the simulation process is the SuperLink's child but not in its
        # process group, and once the SuperLink is gone it is nobody's child.
        doomed = descendants(self.pids())
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for log in self.logs:
            log.close()

    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def stop(self) -> None:
        """End every process started here, SuperNodes first, then the SuperLink, and
        whatever they started (simulation, Ray, ClientApps)."""
        # Found first: once their parent is gone, Ray's agents are nobody's children.
        started_below = descendants(self.pids())
        for process in reversed(self.processes):
            terminate(process)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        for pid in started_below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for log in self.logs:
            log.close()


def terminate(process: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM `process` if it still runs, and SIGKILL it if it is not gone within `grace_s`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until(condition, timeout_s: float = 600) -> None:
    """Poll `condition` until it holds; `TimeoutError` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the federation did not get there in time")
        time.sleep(0.2)
