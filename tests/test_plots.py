"""Figures of a run, from its results.json, for new and older run folders."""

import json
import subprocess
import sys

from harness.flower_processes import REPO
from pytorch_example.plots import personalisation_figure, plot_run

# A run folder written before results.json carried the learning rate, the global-head
# scores and the spread: its figures must still be drawn from what it has.
OLDER_RESULTS = [
    {
        "round": server_round,
        "train_metrics": {"train_loss": 2.0 / server_round},
        "evaluate_metrics_clientapp": {"eval_loss": 1.0, "eval_acc": 0.2 * server_round},
        "evaluate_metrics_serverapp": {"accuracy": 0.1 * server_round, "loss": 2.0},
    }
    for server_round in (1, 2, 3)
]


def test_an_older_run_folder_gets_the_figures_its_numbers_allow(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(OLDER_RESULTS))
    drawn = plot_run(tmp_path)
    assert [path.name for path in drawn] == ["central.png", "personalisation.png"]
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in drawn)


def test_the_personalisation_figure_shows_the_gain_when_the_run_has_it():
    gains = {
        "eval_acc_global": 0.1,
        "eval_gain_share": 0.75,
        "eval_gain_points_mean": 15.0,
        "eval_gain_points_min": 0.0,
        "eval_gain_points_max": 30.0,
    }
    rounds = [{**entry, "evaluate_metrics_clientapp": {**entry["evaluate_metrics_clientapp"], **gains}}
              for entry in OLDER_RESULTS]  # fmt: skip
    assert len(personalisation_figure(OLDER_RESULTS).axes) == 1  # no gain figures: one panel
    accuracy, gain, share = personalisation_figure(rounds).axes
    assert [line.get_label() for line in gain.get_lines()][0] == "mean over clients"
    assert list(gain.get_lines()[0].get_ydata()) == [15.0, 15.0, 15.0]
    assert list(share.get_lines()[0].get_ydata()) == [0.75, 0.75, 0.75]
    assert accuracy.get_ylabel() == "accuracy" and gain.get_ylabel() == "accuracy gain (points)"


def test_a_run_that_ended_before_central_evaluation_draws_what_it_has(tmp_path):
    entry = {
        "round": 1,
        "learning_rate": 0.1,
        "train_metrics": {},
        "evaluate_metrics_clientapp": {},
        "evaluate_metrics_serverapp": {},
    }
    (tmp_path / "results.json").write_text(json.dumps([entry]))
    assert [path.name for path in plot_run(tmp_path)] == ["learning_rate.png"]


def redraw(*run_dirs) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pytorch_example.plots", *map(str, run_dirs)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)


def test_the_command_redraws_a_folder_and_refuses_one_without_results(tmp_path):
    run_dir = tmp_path / "2026-01-01" / "10-00-00"
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(OLDER_RESULTS))
    done = redraw(run_dir)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(run_dir / "central.png"), str(run_dir / "personalisation.png")]

    refused = redraw(tmp_path)
    assert refused.returncode == 1
    expected = f"{tmp_path}: no results.json here: expected a run folder, outputs/<date>/<time>"
    assert refused.stderr.strip() == expected
