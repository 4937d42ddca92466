"""README's quick start, run as written: offline, from a fresh Flower home, on the local
SuperLink `flwr run .` starts by itself, stopped with README's own commands."""

import contextlib
import json
import math
import re
import shutil
import subprocess
import threading
import tomllib
from pathlib import Path

import psutil
import pytest
import torch

from harness.flower_processes import REPO, copy_app, free_port, isolated_env, trained_rounds, wait_until
from harness.wandb_offline import read_offline_run
from pytorch_example.files import project_dir
from pytorch_example.names import RESULT_SECTIONS
from pytorch_example.task import Net

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


# A round's sections in results.json, and the keys the clients' evaluation reports.
RESULT_KEYS = {"round", "learning_rate", "replies", *RESULT_SECTIONS}
CLIENT_SCORES = {"eval_loss", "eval_acc", "eval_loss_global", "eval_acc_global", "eval_acc_min",
                 "eval_acc_median", "eval_acc_max", "eval_acc_std", "eval_gain_share",
                 "eval_gain_points_mean", "eval_gain_points_min", "eval_gain_points_max"}  # fmt: skip


def assert_every_output(run_dir: Path, log: str, flwr_home: str, project: Path) -> None:
    """What a completed run of README's "Configure a run" (5 rounds, 25 of 50 clients,
    W&B on: offline here) leaves in its folder, its log and the Flower home."""
    assert "The federation has 50 SuperNodes connected" in log
    assert "Personalisation 'refit-head': clients train and send the whole model" in log
    assert (
        "Aggregation 'fedavg' (replies weigh their rows, at most 3 x the round's median "
        "(update-weight-bound); each update's norm at most 2 x the round's median "
        "(update-norm-bound)), DP off"
    ) in log
    initial, *results = json.loads((run_dir / "results.json").read_text())
    # Round 0: the initial model's central scores, near chance.
    assert initial["round"] == 0 and set(initial["evaluate_metrics_serverapp"]) == {"accuracy", "loss"}
    assert set(initial) == {"round", "evaluate_metrics_serverapp"}
    assert initial["evaluate_metrics_serverapp"]["accuracy"] < 0.3
    assert [entry["round"] for entry in results] == [1, 2, 3, 4, 5]
    for entry in results:
        assert set(entry) == RESULT_KEYS
        assert set(entry["train_metrics_clientapp"]) == {"train_loss"}
        assert set(entry["evaluate_metrics_clientapp"]) == CLIENT_SCORES
        assert set(entry["evaluate_metrics_serverapp"]) == {"accuracy", "loss"}
        for phase in ("train", "evaluate"):
            counts = entry["replies"][phase]
            assert (counts["expected"], counts["received"], counts["failed"], counts["dropped"]) == (
                25,
                25,
                0,
                0,
            )
        for section in RESULT_SECTIONS:
            assert all(math.isfinite(value) for value in entry[section].values())
    assert [entry["learning_rate"] for entry in results] == [0.02] * 4 + [0.01]  # halved at round 5
    for server_round in range(1, 6):
        assert re.search(
            rf"Round {server_round}/5: [\d.]+s, .* elapsed, ETA .* \| central accuracy [01]\.\d{{4}}", log
        )
    for figure in ("central.png", "personalisation.png", "learning_rate.png"):
        assert (run_dir / figure).read_bytes().startswith(b"\x89PNG")
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["num-server-rounds"], config["fraction-train"], config["learning-rate"]) == (5, 0.5, 0.02)

    best_accuracy = max(entry["evaluate_metrics_serverapp"]["accuracy"] for entry in results)
    checkpoints = sorted(
        run_dir.glob("best_model_round_*_acc_*.pt"), key=lambda path: int(path.name.split("_")[3])
    )
    assert checkpoints and checkpoints[-1].name.endswith(f"_acc_{best_accuracy:.4f}.pt")
    for model_file in [*checkpoints, run_dir / "final_model.pt"]:
        Net().load_state_dict(torch.load(model_file, weights_only=True))
    assert not list(run_dir.rglob(".*.tmp"))

    # No W&B credentials in the fresh HOME: the run is logged offline, next to the rest.
    [wandb_run] = (run_dir / "wandb").glob("offline-run-*")
    logged = read_offline_run(wandb_run)
    assert logged.exit_code == 0 and [step["_step"] for step in logged.history] == [0, 1, 2, 3, 4, 5]
    # Step 0: the initial model's central scores, as results.json's round 0.
    assert logged.history[0]["centralized_accuracy"] == initial["evaluate_metrics_serverapp"]["accuracy"]

    # `flwr run .` moved both federations into the Flower Config as SuperLink connections.
    with open(Path(flwr_home) / "config.toml", "rb") as file:
        connections = tomllib.load(file)["superlink"]
    assert connections["default"] == "local-simulation"
    assert connections["local-simulation"]["options"]["num-supernodes"] == 50
    gpu = connections["local-sim-gpu"]
    assert gpu["options"]["num-supernodes"] == 50
    assert gpu["options"]["backend"]["client-resources"]["num-gpus"] == 0.25
    assert "# [tool.flwr.federations]" in (project / "pyproject.toml").read_text()


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
        # It learns, and the generated set is as hard as docs' figures: not solved outright.
        assert 0.5 < rounds[-1]["evaluate_metrics_serverapp"]["accuracy"] < 0.99
        assert_every_output(configured_dir, logs[-1], flwr_home, project)

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
