"""Figures of a run, from its results.json, for new and older run folders."""

import json
import subprocess
import sys

import pytest
from matplotlib.legend import Legend

from harness.flower_processes import REPO
from pytorch_example.plots import personalisation_figure, plot_run, run_figures

# A run folder written before results.json carried the learning rate, the global-head
# scores and the spread: its figures must still be drawn from what it has.
OLDER_RESULTS = [
    {
        "round": server_round,
        "train_metrics_clientapp": {"train_loss": 2.0 / server_round},
        "evaluate_metrics_clientapp": {"eval_loss": 1.0, "eval_acc": 0.2 * server_round},
        "evaluate_metrics_serverapp": {"accuracy": 0.1 * server_round, "loss": 2.0},
    }
    for server_round in (1, 2, 3)
]

GAINS = {
    "eval_acc_global": 0.1,
    "eval_acc_min": 0.05,
    "eval_acc_median": 0.5,
    "eval_acc_max": 0.95,
    "eval_gain_share": 0.75,
    "eval_gain_points_mean": 15.0,
    "eval_gain_points_min": 0.0,
    "eval_gain_points_max": 30.0,
}


def with_gains(entry: dict) -> dict:
    return {**entry, "evaluate_metrics_clientapp": {**entry["evaluate_metrics_clientapp"], **GAINS}}


def dp_round(entry: dict) -> dict:
    """A round of today's app with DP on: learning rate, gains and the privacy spent."""
    epsilon = 0.5 * entry["round"]
    privacy = {"epsilon": epsilon, "delta": 1e-5, "releases": entry["round"]}
    return {**with_gains(entry), "learning_rate": 0.1, "privacy": privacy}


DP_RESULTS = [dp_round(entry) for entry in OLDER_RESULTS]
DP_CONFIG = {
    "num-server-rounds": 3,
    "personalisation": "refit-head",
    "aggregation": "fedavg",
    "dp-noise-multiplier": 1.5,
    "dp-clipping-norm": 0.1,
    "dp-max-epsilon": 4.0,
    "dirichlet-alpha": 0.3,
}


def write_run(run_dir, results: list[dict], run_config: dict | None = None) -> None:
    (run_dir / "results.json").write_text(json.dumps(results))
    if run_config is not None:
        (run_dir / "config.json").write_text(json.dumps(run_config))


def test_an_older_run_folder_gets_the_figures_its_numbers_allow(tmp_path):
    write_run(tmp_path, OLDER_RESULTS)
    drawn = plot_run(tmp_path)
    assert [path.name for path in drawn] == ["central.png", "personalisation.png"]
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in drawn)
    assert all(figure.get_suptitle() == "" for figure in run_figures(tmp_path).values())  # no config.json


def test_the_personalisation_figure_shows_the_gain_when_the_run_has_it():
    rounds = [with_gains(entry) for entry in OLDER_RESULTS]
    assert len(personalisation_figure(OLDER_RESULTS, {}).axes) == 1  # no gain figures: one panel
    accuracy, gain, share = personalisation_figure(rounds, {}).axes
    assert [line.get_label() for line in gain.get_lines()][0] == "mean gain in points"  # names.py's words
    assert list(gain.get_lines()[0].get_ydata()) == [15.0, 15.0, 15.0]
    assert list(share.get_lines()[0].get_ydata()) == [0.75, 0.75, 0.75]
    assert accuracy.get_ylabel() == "accuracy" and gain.get_ylabel() == "accuracy gain (points)"


def test_a_run_that_ended_before_central_evaluation_draws_what_it_has(tmp_path):
    entry = {
        "round": 1,
        "learning_rate": 0.1,
        "train_metrics_clientapp": {},
        "evaluate_metrics_clientapp": {},
        "evaluate_metrics_serverapp": {},
    }
    write_run(tmp_path, [entry])
    assert [path.name for path in plot_run(tmp_path)] == ["learning_rate.png"]


def test_a_dp_run_gets_an_epsilon_figure_with_its_delta(tmp_path):
    write_run(tmp_path, DP_RESULTS, DP_CONFIG)
    assert [path.name for path in plot_run(tmp_path)] == [
        "central.png",
        "personalisation.png",
        "learning_rate.png",
        "privacy.png",
    ]
    (axes,) = run_figures(tmp_path)["privacy.png"].axes
    epsilon, cap = axes.get_lines()
    assert list(epsilon.get_ydata()) == [0.5, 1.0, 1.5]
    assert epsilon.get_label() == "epsilon at delta=1e-05"
    assert list(cap.get_ydata()) == [4.0, 4.0] and axes.get_ylabel() == "epsilon"


def test_rounds_are_ticked_at_whole_numbers(tmp_path):
    write_run(tmp_path, DP_RESULTS, DP_CONFIG)
    for name, figure in run_figures(tmp_path).items():
        figure.draw_without_rendering()
        for axes in figure.axes:
            low, high = axes.get_xlim()
            ticks = [tick for tick in axes.get_xticks() if low <= tick <= high]
            assert ticks == [1, 2, 3], (name, ticks)


def test_no_legend_covers_a_panel(tmp_path):
    write_run(tmp_path, DP_RESULTS, DP_CONFIG)
    legends = 0
    for name, figure in run_figures(tmp_path).items():
        figure.draw_without_rendering()
        panels = [axes.get_window_extent() for axes in figure.axes]
        for legend in figure.findobj(Legend):
            legends += 1
            extent = legend.get_window_extent()
            assert not any(extent.overlaps(panel) for panel in panels), name
    assert legends == 4  # central, own vs global, gain, epsilon: each panel that has one


def test_every_accuracy_axis_shows_chance_level_from_0_to_1(tmp_path):
    write_run(tmp_path, DP_RESULTS, DP_CONFIG)
    figures = run_figures(tmp_path)
    accuracy_axes = [
        axes for figure in figures.values() for axes in figure.axes if axes.get_ylabel() == "accuracy"
    ]
    assert len(accuracy_axes) == 2  # central, and the clients' own vs global
    for axes in accuracy_axes:
        assert axes.get_ylim() == (0, 1)
        chance = [line for line in axes.get_lines() if line.get_label().startswith("chance")]
        assert [list(line.get_ydata()) for line in chance] == [[0.1, 0.1]]


@pytest.mark.parametrize(
    ("personalisation", "label"),
    [
        ("private-head", "federated accuracy (global model, the initial model's head)"),
        ("refit-head", "federated accuracy (global model)"),
    ],
)
def test_a_private_head_figure_says_its_global_head_is_the_initial_one(tmp_path, personalisation, label):
    write_run(tmp_path, DP_RESULTS, {**DP_CONFIG, "personalisation": personalisation})
    axes = run_figures(tmp_path)["personalisation.png"].axes[0]
    assert label in [line.get_label() for line in axes.get_lines()]


@pytest.mark.parametrize(
    ("run_config", "title"),
    [
        (
            DP_CONFIG,
            "personalisation=refit-head, aggregation=fedavg, dirichlet-alpha=0.3\n"
            "DP on: dp-noise-multiplier=1.5, dp-clipping-norm=0.1",
        ),
        (
            {**DP_CONFIG, "aggregation": "krum", "dp-noise-multiplier": 0.0},
            "personalisation=refit-head, aggregation=krum, dirichlet-alpha=0.3\nDP off",
        ),
        # A folder from before personalisation, robust rules and DP were settings.
        ({"num-server-rounds": 3, "dirichlet-alpha": 1.0}, "dirichlet-alpha=1.0"),
    ],
    ids=["dp-on", "dp-off", "older-folder"],
)
def test_each_figure_names_the_settings_of_the_run(tmp_path, run_config, title):
    write_run(tmp_path, DP_RESULTS, run_config)
    figures = run_figures(tmp_path)
    assert [figure.get_suptitle() for figure in figures.values()] == [title] * len(figures)


def redraw(*run_dirs) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pytorch_example.plots", *map(str, run_dirs)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)


def test_the_command_redraws_a_folder_and_refuses_one_without_results(tmp_path):
    run_dir = tmp_path / "2026-01-01" / "10-00-00"
    run_dir.mkdir(parents=True)
    write_run(run_dir, OLDER_RESULTS)
    done = redraw(run_dir)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(run_dir / "central.png"), str(run_dir / "personalisation.png")]

    refused = redraw(tmp_path)
    assert refused.returncode == 1
    expected = f"{tmp_path}: no results.json here: expected a run folder, outputs/<date>/<time>"
    assert refused.stderr.strip() == expected

    (run_dir / "results.json").unlink()  # a run that ended before its first round did
    (run_dir / "config.json").write_text(json.dumps(DP_CONFIG))
    unrecorded = redraw(run_dir)
    assert unrecorded.returncode == 1
    assert unrecorded.stderr.strip() == (
        f"{run_dir}: its run recorded no round, so there is nothing to draw: why it ended is in its log "
        "(flwr log <run-id>)"
    )


@pytest.mark.parametrize("gain_low", [-20.0, 0.0, 5.0])
def test_the_gain_and_its_share_draw_their_zero_at_one_height(gain_low):
    """The share of clients that gain (0 to 1) sits on a twin of the gain's axis (points,
    below zero when the own model loses): a share drawn below the gain's zero would read
    as negative."""
    rounds = [
        {
            **entry,
            "evaluate_metrics_clientapp": {
                **entry["evaluate_metrics_clientapp"],
                **GAINS,
                "eval_gain_points_min": gain_low,
            },
        }  # fmt: skip
        for entry in OLDER_RESULTS
    ]
    _, gain, share = personalisation_figure(rounds, {}).axes
    zero_heights = [axes.transData.transform((1, 0))[1] for axes in (gain, share)]
    assert zero_heights[0] == pytest.approx(zero_heights[1], abs=1e-6)
    assert share.get_ylim()[1] == pytest.approx(1.05)
    assert gain.get_ylim()[0] <= min(gain_low, 0.0)
