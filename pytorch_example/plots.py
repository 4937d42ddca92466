"""Figures of a run, drawn from its results.json: every run gets them at its end, and

    python -m pytorch_example.plots outputs/<date>/<time> [...]

draws them again for any run folder, including runs that ended early and folders from
older versions of this app (a figure whose numbers the folder lacks is left out).
"""

import argparse
import io
import json
import math
from pathlib import Path

from matplotlib.figure import Figure

from pytorch_example.files import save_atomically

FIGURE_SIZE = (6.4, 3.6)
DPI = 120


def plot_run(run_dir: Path) -> list[Path]:
    """Draw the figures of `run_dir` next to its results.json; return their paths."""
    results_file = run_dir / "results.json"
    if not results_file.is_file():
        return []
    rounds = json.loads(results_file.read_text())
    drawn = [
        _central(rounds, run_dir / "central.png"),
        _save(personalisation_figure(rounds), run_dir / "personalisation.png"),
        _learning_rate(rounds, run_dir / "learning_rate.png"),
    ]
    return [path for path in drawn if path is not None]


def _series(rounds: list[dict], section: str, name: str) -> list[float]:
    """One metric per round, NaN where a round lacks it (matplotlib leaves a gap)."""
    return [entry.get(section, {}).get(name, math.nan) for entry in rounds]


def _has(values: list[float]) -> bool:
    return any(not math.isnan(value) for value in values)


def _central(rounds: list[dict], path: Path) -> Path | None:
    numbers = [entry["round"] for entry in rounds]
    accuracy = _series(rounds, "evaluate_metrics_serverapp", "accuracy")
    loss = _series(rounds, "evaluate_metrics_serverapp", "loss")
    if not _has(accuracy):
        return None
    figure = Figure(figsize=(FIGURE_SIZE[0] * 1.6, FIGURE_SIZE[1]))
    accuracy_axes, loss_axes = figure.subplots(1, 2)
    accuracy_axes.plot(numbers, accuracy, marker="o")
    accuracy_axes.set(title="Central accuracy (global model, test set)", xlabel="round", ylabel="accuracy")
    loss_axes.plot(numbers, loss, marker="o", color="tab:red")
    loss_axes.set(title="Central loss (global model, test set)", xlabel="round", ylabel="loss")
    return _save(figure, path)


def personalisation_figure(rounds: list[dict]) -> Figure | None:
    """Own model against global model on the clients' rows; with gain figures, a second
    panel: what the own model adds, in points, and the share of clients it helps."""
    numbers = [entry["round"] for entry in rounds]
    section = "evaluate_metrics_clientapp"
    personal = _series(rounds, section, "eval_acc")
    if not _has(personal):
        return None
    gain = _series(rounds, section, "eval_gain_points_mean")
    figure = Figure(figsize=(FIGURE_SIZE[0] * (1.6 if _has(gain) else 1), FIGURE_SIZE[1]))
    axes, *gain_axes = figure.subplots(1, 2 if _has(gain) else 1, squeeze=False)[0]
    low, high = _series(rounds, section, "eval_acc_min"), _series(rounds, section, "eval_acc_max")
    own, shared = "tab:blue", "tab:orange"
    if _has(low):
        band = "own model: min to max over clients"
        axes.fill_between(numbers, low, high, color=own, alpha=0.15, label=band)
        median = _series(rounds, section, "eval_acc_median")
        axes.plot(numbers, median, color=own, ls=":", label="own model: median client")
    axes.plot(numbers, personal, color=own, marker="o", label="own model (personalised)")
    global_model = _series(rounds, section, "eval_acc_global")
    if _has(global_model):
        axes.plot(numbers, global_model, color=shared, marker="s", label="global model")
    axes.set(
        title="Clients' validation accuracy (weighted mean)",
        xlabel="round",
        ylabel="accuracy",
        ylim=(0, 1),
    )
    axes.legend(loc="lower right", fontsize="small")
    if gain_axes:
        _gain(gain_axes[0], numbers, rounds, section)
    return figure


def _gain(axes, numbers: list[int], rounds: list[dict], section: str) -> None:
    """Own minus global accuracy per client, in points: mean, min to max, share above 0."""
    low, high = (
        _series(rounds, section, "eval_gain_points_min"),
        _series(rounds, section, "eval_gain_points_max"),
    )
    if _has(low):
        axes.fill_between(numbers, low, high, color="tab:green", alpha=0.15, label="min to max over clients")
    axes.plot(numbers, _series(rounds, section, "eval_gain_points_mean"), color="tab:green", marker="o",
              label="mean over clients")  # fmt: skip
    axes.axhline(0, color="grey", lw=0.8)
    axes.set(title="Own model minus global model", xlabel="round", ylabel="accuracy gain (points)")
    # Headroom above the curves for the two legends.
    bottom, top = axes.get_ylim()
    axes.set_ylim(bottom, top + 0.35 * (top - bottom))
    axes.legend(loc="upper left", fontsize="small")
    share = _series(rounds, section, "eval_gain_share")
    if _has(share):
        share_axes = axes.twinx()
        share_axes.plot(numbers, share, color="black", ls="--", lw=1, label="share of clients that gain")
        share_axes.set(ylabel="share of clients that gain", ylim=(0, 1.4), yticks=[0, 0.25, 0.5, 0.75, 1])
        share_axes.legend(loc="upper right", fontsize="small")


def _learning_rate(rounds: list[dict], path: Path) -> Path | None:
    numbers = [entry["round"] for entry in rounds]
    rates = [entry.get("learning_rate", math.nan) for entry in rounds]
    if not _has(rates):
        return None
    figure = Figure(figsize=FIGURE_SIZE)
    axes = figure.subplots()
    axes.step(numbers, rates, where="post", marker="o")
    axes.set(title="Clients' learning rate", xlabel="round", ylabel="learning rate", ylim=(0, None))
    return _save(figure, path)


def _save(figure: Figure | None, path: Path) -> Path | None:
    if figure is None:
        return None
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    save_atomically(path, lambda file: file.write(buffer.getvalue()))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dirs", type=Path, nargs="+", help="run folders holding a results.json")
    for run_dir in parser.parse_args().run_dirs:
        if not (run_dir / "results.json").is_file():
            parser.exit(1, f"{run_dir}: no results.json here: expected a run folder, outputs/<date>/<time>\n")
        for path in plot_run(run_dir):
            print(path)


if __name__ == "__main__":
    main()
