"""Shared fixtures: generated Fashion-MNIST-format data and a real local SuperLink.

Every Flower process a test needs is started here, on free loopback ports, with
`FLWR_HOME` in a temporary folder, and stopped by its PID at the end of the session.
"""

import json
import os
import tempfile
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

# The Hub is out of reach here; say so before `datasets` is imported, and give it an
# empty cache so that no copy left on this machine answers for the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
HF_HOME = tempfile.mkdtemp(prefix="pytorch-example-hf-")
os.environ["HF_HOME"] = HF_HOME

import pytest  # noqa: E402

from tests.synthetic_fmnist import write_idx_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 600


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(HF_HOME, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_run_config() -> dict:
    """The run-config defaults from pyproject.toml."""
    with open(REPO / "pyproject.toml", "rb") as file:
        return tomllib.load(file)["tool"]["flwr"]["app"]["config"]


def copy_app(destination: Path) -> Path:
    """A copy of the app to run: `flwr run` rewrites the pyproject.toml it is given."""
    destination.mkdir(parents=True)
    shutil.copy(REPO / "pyproject.toml", destination)
    shutil.copytree(
        REPO / "pytorch_example",
        destination / "pytorch_example",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return destination


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


class LocalSuperLink:
    """A simulation SuperLink on free ports, as `flwr run .` would start, but ours."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.flwr_home = root / "flwr-home"
        self.home = root / "home"  # no W&B credentials in here
        self.flwr_home.mkdir(parents=True)
        self.home.mkdir()
        self.port = free_port()
        control_port = free_port()
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("WANDB_") and key != "FLWR_HOME"
        }
        self.env.update(
            FLWR_HOME=str(self.flwr_home),
            HOME=str(self.home),
            PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
        )
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self.log = open(root / "superlink.log", "wb")
        self.process = subprocess.Popen(
            [
                str(VENV_BIN / "flower-superlink"),
                "--insecure",
                "--simulation",
                "--host", "127.0.0.1",
                "--port", str(self.port),
                "--control-api-address", f"127.0.0.1:{control_port}",
                "--database", str(root / "state.db"),
            ],
            env=self.env,
            cwd=root,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_until_up()

    def _wait_until_up(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"flower-superlink exited: see {self.root / 'superlink.log'}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        self.stop()
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

    def run(self, app_dir: Path, run_config: dict, num_supernodes: int) -> tuple[str, dict]:
        """`flwr run` the app to completion; return its streamed log and its run record."""
        overrides = " ".join(f"{key}={toml_value(value)}" for key, value in run_config.items())
        done = self.flwr(
            "run", ".", "test",
            "--run-config", overrides,
            "--federation-config", f"num-supernodes={num_supernodes}",
            "--stream",
            cwd=app_dir,
        )
        output = done.stdout + done.stderr
        match = re.search(r"Successfully started run (\d+)", output)
        assert match, f"flwr run did not start a run:\n{output}"
        listing = self.flwr("ls", "test", "--format", "json", cwd=app_dir, timeout=60)
        runs = json.loads(listing.stdout)["runs"]
        record = next(run for run in runs if run["run-id"] == match.group(1))
        return output, record

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # Whatever the SuperLink started (simulation, Ray) is in its process group.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()


@pytest.fixture(scope="session")
def idx_dataset(tmp_path_factory) -> Path:
    """A small data set in the four Zalando .gz files."""
    return write_idx_dataset(tmp_path_factory.mktemp("fmnist-idx"), num_train=3000, num_test=1000)


@pytest.fixture(scope="session")
def superlink(tmp_path_factory):
    link = LocalSuperLink(tmp_path_factory.mktemp("superlink"))
    yield link
    link.stop()


@pytest.fixture(scope="session")
def app_dir(tmp_path_factory) -> Path:
    return copy_app(tmp_path_factory.mktemp("app") / "pytorch-example")
