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

from harness.flower_processes import REPO, copy_app, free_port, isolated_env, trained_rounds, wait_until
from pytorch_example.files import project_dir

INSTALL_CPU_TORCH = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"
# The warnings docs/runs.md says Flower 1.42 (and its Ray) print on a run, unavoidably:
# the first two on every run, Ray's as it starts and stops its actors.
EXPECTED_WARNINGS = (
    "`options.` fields in the SuperLink connection configuration are deprecated",
    "default simulated SuperNodes changed from 10 to 2",
    "FutureWarning: Tip: In future versions of Ray",
    "warnings.warn(",  # the line Python prints under that FutureWarning
    "Manually terminating ClientAppActor",
)


def readme_commands(section: str) -> list[str]:
    """The command lines of one README section, comments cut, in order."""
    text = (REPO / "README.md").read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]
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
def test_the_quick_start_then_configure_and_resume_run_as_written_in_order(tmp_path):
    """README's commands in its order, each from where the one before left: a run stopped
    after round 1 (its folder keeps its figures), the local SuperLink ended, then the
    "Configure a run" command and the resume of the stopped run, which start it again."""
    install_cpu, install, generate, export, run, stop_run, stop_superlink = readme_commands("Quick start")
    configure, resume = readme_commands("Configure a run")
    assert "resume-from='outputs/<date>/<time>'" in resume
    # pip cannot reach an index here: the environment already holds what they install,
    # so check only that they say what README promises, CPU PyTorch first.
    assert (install_cpu, install) == (INSTALL_CPU_TORCH, "pip install -e .")
    assert generate.startswith("python -m harness.synthetic_fmnist ")
    assert export == "export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1"
    assert run.startswith("flwr run . --stream") and stop_run == "flwr stop <run-id>"

    project = copy_app(tmp_path / "project")
    shutil.copytree(REPO / "harness", project / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    env = isolated_env(tmp_path)  # a fresh Flower home and HOME, the Hub out of reach
    env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION")  # README's export sets it
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
    flwr_home = env["FLWR_HOME"]
    # Runs write where `pip install -e .` was run: the folders these runs name in their
    # logs are removed at the end, and nothing else there.
    outputs = project_dir() / "outputs"
    dates_before = set(outputs.glob("*"))
    logs: list[str] = []
    started = None

    def shell(command: str, **kwargs) -> subprocess.CompletedProcess:
        done = subprocess.run(
            ["bash", "-c", command], cwd=project, env=env, capture_output=True, text=True, **kwargs
        )
        logs.append(done.stdout + done.stderr)
        return done

    def completed(command: str, rounds: list[int]) -> Path:
        """Run `command` to its end; check its rounds and warnings; return its folder."""
        done = shell(command, timeout=900)
        log = logs[-1]
        assert done.returncode == 0, log[-3000:]
        assert [int(n) for n in re.findall(r"Round (\d+)/\d+:", log)] == rounds, log[-3000:]
        warnings = [line for line in log.splitlines() if "warning" in line.lower()]
        unexpected = [line for line in warnings if not any(known in line for known in EXPECTED_WARNINGS)]
        assert not unexpected, "\n".join(unexpected)
        assert all(any(known in line for line in warnings) for known in EXPECTED_WARNINGS[:2]), warnings
        [run_dir] = run_folders(log) or [Path(re.search(r"Resuming (\S+) after round", log).group(1))]
        return run_dir

    try:
        assert shell(generate, timeout=300).returncode == 0
        name, _, value = export.removeprefix("export ").partition("=")
        env[name] = value  # what `export` leaves for every later command of the shell

        # The quick start's run, ended with README's stop command once round 1 is done.
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
        run_started = re.search(r"Successfully started run (\d+)", "".join(streamed))
        assert run_started and "Round 1/10:" in "".join(streamed), "".join(streamed)[-3000:]
        run_id = run_started.group(1)
        stopped = shell(stop_run.replace("<run-id>", run_id), timeout=120)
        assert stopped.returncode == 0, logs[-1]
        started.wait(timeout=120)
        reader.join(timeout=10)
        logs.append("".join(streamed))
        [stopped_dir] = run_folders(logs[-1])
        assert stopped_dir.parent.parent == outputs
        listing = json.loads(shell("flwr ls --format json", timeout=120).stdout)
        [record] = [entry for entry in listing["runs"] if str(entry["run-id"]) == run_id]
        assert record["status"] == "finished:stopped"
        # A stopped run draws its figures as its process ends.
        wait_until(lambda: (stopped_dir / "central.png").exists(), 60)

        superlinks = local_superlinks(flwr_home)
        assert len(superlinks) == 1  # `flwr run .` left its SuperLink running, as README says
        assert shell(stop_superlink, timeout=60).returncode == 0
        psutil.wait_procs(superlinks, timeout=30)
        assert not local_superlinks(flwr_home)

        # "Configure a run", on the SuperLink it starts again: 5 rounds, half the clients.
        configured_dir = completed(configure, list(range(1, 6)))
        rounds = trained_rounds(configured_dir / "results.json")
        assert [entry["replies"]["train"]["expected"] for entry in rounds] == [25] * 5
        # It learns, and the generated set is as hard as docs' figures: not solved outright.
        assert 0.5 < rounds[-1]["evaluate_metrics_serverapp"]["accuracy"] < 0.99

        # The stopped run, resumed as README writes it, goes on after its last round.
        done_before = len(trained_rounds(stopped_dir / "results.json"))
        relative = stopped_dir.relative_to(project_dir())
        resumed_dir = completed(resume.replace("outputs/<date>/<time>", str(relative)),
                                list(range(done_before + 1, 11)))  # fmt: skip
        assert resumed_dir == stopped_dir
        rounds = json.loads((stopped_dir / "results.json").read_text())
        assert [entry["round"] for entry in rounds] == list(range(11))  # round 0: the initial model
        assert rounds[-1]["evaluate_metrics_serverapp"]["accuracy"] > 0.5
        assert {path.name for path in stopped_dir.glob("*.png")} >= {"central.png", "personalisation.png"}
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
