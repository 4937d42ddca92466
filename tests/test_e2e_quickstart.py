"""README's quick start, run as written: offline, from a fresh Flower home, on the local
SuperLink `flwr run .` starts by itself, stopped with README's own commands."""

import contextlib
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

import psutil
import pytest

from harness.flower_processes import REPO, copy_app, free_port, isolated_env, wait_until
from pytorch_example.config import project_dir

SECTION = "## Quick start"
INSTALL_CPU_TORCH = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"
# The warnings README says Flower 1.42 (and its Ray) print on a run, unavoidably: the
# first two on every run, Ray's as it starts and stops its actors.
EXPECTED_WARNINGS = (
    "`options.` fields in the SuperLink connection configuration are deprecated",
    "default simulated SuperNodes changed from 10 to 2",
    "FutureWarning: Tip: In future versions of Ray",
    "warnings.warn(",  # the line Python prints under that FutureWarning
    "Manually terminating ClientAppActor",
)


def quick_start_commands() -> list[str]:
    """The command lines of README's quick start, comments cut, in order."""
    section = (REPO / "README.md").read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    lines = [line for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.splitlines()]
    return [line.split("  #")[0].strip() for line in lines if line.strip()]


def run_folders(log: str) -> list[Path]:
    """The run folders a run's log says it writes into."""
    return [Path(folder) for folder in re.findall(r"Outputs of this run go to (\S+)", log)]


def local_superlinks(flwr_home) -> list[psutil.Process]:
    """The SuperLinks `flwr run .` started for this Flower home (their log is in it)."""
    found = []
    for process in psutil.process_iter(["cmdline"], ad_value=None):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "flower-superlink" in cmdline and f"{flwr_home}/local-superlink" in cmdline:
            found.append(process)
    return found


@pytest.mark.e2e
def test_the_quick_start_runs_stops_and_cleans_up_as_written(tmp_path):
    install_cpu, install, generate, run, stop_run, stop_superlink = quick_start_commands()
    # pip cannot reach an index here: the environment already holds what they install,
    # so check only that they say what README promises, CPU PyTorch first.
    assert (install_cpu, install) == (INSTALL_CPU_TORCH, "pip install -e .")
    assert generate.startswith("python -m harness.synthetic_fmnist ")
    assert run.startswith("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run . --stream")
    assert stop_run == "flwr stop <run-id>"

    project = copy_app(tmp_path / "project")
    shutil.copytree(REPO / "harness", project / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "deploy", project / "deploy", ignore=shutil.ignore_patterns("__pycache__", "*.md"))
    env = isolated_env(tmp_path)  # a fresh Flower home and HOME, the Hub out of reach
    env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION")  # README's command sets it
    env.update(
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
    )
    flwr_home = env["FLWR_HOME"]
    # Runs write where `pip install -e .` was run: the folders these two runs name in
    # their logs are removed at the end, and nothing else there.
    outputs = project_dir() / "outputs"
    dates_before = set(outputs.glob("*"))
    logs: list[str] = []
    started = None

    def shell(command: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-c", command], cwd=project, env=env, capture_output=True, text=True, **kwargs
        )

    try:
        assert shell(generate, timeout=300).returncode == 0

        finished = shell(run, timeout=900)
        log = finished.stdout + finished.stderr
        logs.append(log)
        assert finished.returncode == 0, log[-3000:]
        assert [int(n) for n in re.findall(r"Round (\d+)/10:", log)] == list(range(1, 11)), log[-3000:]
        warnings = [line for line in log.splitlines() if "warning" in line.lower()]
        unexpected = [line for line in warnings if not any(known in line for known in EXPECTED_WARNINGS)]
        assert not unexpected, "\n".join(unexpected)
        assert all(any(known in line for line in warnings) for known in EXPECTED_WARNINGS[:2]), warnings
        [run_dir] = run_folders(log)
        assert run_dir.parent.parent == outputs
        rounds = json.loads((run_dir / "results.json").read_text())
        assert [entry["round"] for entry in rounds] == list(range(1, 11))
        assert rounds[-1]["evaluate_metrics_serverapp"]["accuracy"] > 0.5  # it learns
        assert {path.name for path in run_dir.glob("*.png")} >= {"central.png", "personalisation.png"}

        # The same command again, ended with README's stop command once round 1 is done.
        started = subprocess.Popen(
            ["bash", "-c", run],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        streamed: list[str] = []
        reader = threading.Thread(target=lambda: streamed.extend(started.stdout), daemon=True)
        reader.start()
        wait_until(lambda: re.search(r"Round 1/10:", "".join(streamed)) or started.poll() is not None, 600)
        logs.append("".join(streamed))
        run_started = re.search(r"Successfully started run (\d+)", logs[-1])
        assert run_started and "Round 1/10:" in logs[-1], logs[-1][-3000:]
        run_id = run_started.group(1)
        stopped = shell(stop_run.replace("<run-id>", run_id), timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        started.wait(timeout=120)
        reader.join(timeout=10)
        logs[-1] = "".join(streamed)
        listing = json.loads(shell("flwr ls --format json", timeout=120).stdout)
        [record] = [entry for entry in listing["runs"] if str(entry["run-id"]) == run_id]
        assert record["status"] == "finished:stopped"

        superlinks = local_superlinks(flwr_home)
        assert len(superlinks) == 1  # `flwr run .` left its SuperLink running, as README says
        assert shell(stop_superlink, timeout=60).returncode == 0
        psutil.wait_procs(superlinks, timeout=30)
        assert not local_superlinks(flwr_home)
    finally:
        if started is not None and started.poll() is None:
            started.kill()
            started.wait()
        # Ours alone (their command line holds tmp_path), the runs they started with them.
        for superlink in local_superlinks(flwr_home):
            for process in [*superlink.children(recursive=True), superlink]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
        for run_dir in {folder for log in logs for folder in run_folders(log)}:
            shutil.rmtree(run_dir, ignore_errors=True)
        for date_dir in set(outputs.glob("*")) - dates_before:
            with contextlib.suppress(OSError):
                date_dir.rmdir()  # only if empty: another run's folder stays
