"""Figures of a run, drawn from its results.json and config.json: every run gets them at
its end, and

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
from matplotlib.ticker import MaxNLocator

from pytorch_example.files import save_atomically
from pytorch_example.names import (
    CENTRAL_ACCURACY,
    CENTRAL_LOSS,
    CENTRAL_SECTION,
    CLIENTS_SECTION,
    GLOBAL_ACCURACY,
    OWN_ACCURACY,
    words,
)

FIGURE_SIZE = (6.4, 4.2)
WIDE = 1.6  # a two-panel figure, in figure widths
DPI = 120
CHANCE = 0.1  # the accuracy of guessing among Fashion-MNIST's 10 classes


def plot_run(run_dir: Path) -> list[Path]:
    """Draw the figures of `run_dir` next to its results.json; return their paths."""
    return [_save(figure, run_dir / name) for name, figure in run_figures(run_dir).items()]


def run_figures(run_dir: Path) -> dict[str, Figure]:
    """The figures of `run_dir` by file name: those its results.json has the numbers for."""
    results_file = run_dir / "results.json"
    if not results_file.is_file():
        return {}
    rounds = json.loads(results_file.read_text())
    run_config = _read_run_config(run_dir)
    drawn = {
        "central.png": central_figure(rounds, run_config),
        "personalisation.png": personalisation_figure(rounds, run_config),
        "learning_rate.png": learning_rate_figure(rounds, run_config),
        "privacy.png": privacy_figure(rounds, run_config),
    }
    return {name: figure for name, figure in drawn.items() if figure is not None}


def _read_run_config(run_dir: Path) -> dict:
    """config.json as written, or {}: a figure is worth drawing without its title."""
    try:
        run_config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return run_config if isinstance(run_config, dict) else {}


def settings_title(run_config: dict) -> str:
    """The settings runs are compared by, as far as `run_config` names them (an older
    folder's config.json lacks those added since): one line, then DP on a second."""
    shown = ("personalisation", "aggregation", "dirichlet-alpha")
    lines = [", ".join(f"{key}={run_config[key]}" for key in shown if key in run_config)]
    noise = run_config.get("dp-noise-multiplier")
    if isinstance(noise, int | float):
        dp_keys = ("dp-noise-multiplier", "dp-clipping-norm", "dp-clipping-quantile")
        dp = [f"{key}={run_config[key]}" for key in dp_keys if key in run_config]
        lines.append(f"DP on: {', '.join(dp)}" if noise > 0 else "DP off")
    return "\n".join(line for line in lines if line)


def _figure(width: float, run_config: dict) -> Figure:
    # Constrained layout keeps the settings title and the legends below the panels clear of them.
    figure = Figure(figsize=(FIGURE_SIZE[0] * width, FIGURE_SIZE[1]), layout="constrained")
    if title := settings_title(run_config):
        figure.suptitle(title, fontsize="medium")
    return figure


def _per_round(axes) -> None:
    """Rounds on the x-axis, ticked at whole rounds only (3 rounds would get 1.25, 1.5, ...)."""
    axes.set_xlabel("round")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend_below(panel) -> None:
    """The legend of `panel` (a figure or subfigure), below its axes, where it hides no data."""
    panel.legend(loc="outside lower center", ncols=2, fontsize="small")


def _series(rounds: list[dict], section: str, name: str) -> list[float]:
    """One metric per round, NaN where a round lacks it (matplotlib leaves a gap)."""
    return [entry.get(section, {}).get(name, math.nan) for entry in rounds]


def _has(values: list[float]) -> bool:
    return any(not math.isnan(value) for value in values)


def central_figure(rounds: list[dict], run_config: dict) -> Figure | None:
    """The global model's accuracy and loss on the test set."""
    numbers = [entry["round"] for entry in rounds]
    accuracy = _series(rounds, CENTRAL_SECTION, CENTRAL_ACCURACY)
    loss = _series(rounds, CENTRAL_SECTION, CENTRAL_LOSS)
    if not _has(accuracy):
        return None
    figure = _figure(WIDE, run_config)
    accuracy_axes, loss_axes = figure.subplots(1, 2)
    accuracy_axes.plot(numbers, accuracy, marker="o", label="global model")
    _chance(accuracy_axes)
    title = f"{words(CENTRAL_SECTION, CENTRAL_ACCURACY).capitalize()} (global model, test set)"
    accuracy_axes.set(title=title, ylabel="accuracy", ylim=(0, 1))
    loss_axes.plot(numbers, loss, marker="o", color="tab:red")
    loss_axes.set(
        title=f"{words(CENTRAL_SECTION, CENTRAL_LOSS).capitalize()} (global model, test set)", ylabel="loss"
    )
    _per_round(accuracy_axes)
    _per_round(loss_axes)
    _legend_below(figure)
    return figure


def _chance(axes) -> None:
    """A line at chance level: a model at 0.10 to 0.14 has learned nothing, however an
    auto-scaled axis draws it."""
    axes.axhline(CHANCE, color="grey", ls="--", lw=0.8, label="chance (1 in 10 classes)")


def personalisation_figure(rounds: list[dict], run_config: dict) -> Figure | None:
    """Own model against global model on the clients' rows; with gain figures, a second
    panel: what the own model adds, in points, and the share of clients it helps."""
    numbers = [entry["round"] for entry in rounds]
    personal = _series(rounds, CLIENTS_SECTION, OWN_ACCURACY)
    if not _has(personal):
        return None
    with_gain = _has(_series(rounds, CLIENTS_SECTION, "eval_gain_points_mean"))
    figure = _figure(WIDE if with_gain else 1, run_config)
    # A subfigure per panel, so that each gets its own legend below it.
    accuracy_panel, *gain_panel = figure.subfigures(1, 2 if with_gain else 1, squeeze=False)[0]
    axes = accuracy_panel.subplots()
    low, high = (
        _series(rounds, CLIENTS_SECTION, "eval_acc_min"),
        _series(rounds, CLIENTS_SECTION, "eval_acc_max"),
    )
    own, shared = "tab:blue", "tab:orange"
    if _has(low):
        band = f"{words(CLIENTS_SECTION, OWN_ACCURACY)}: lowest to highest client"
        axes.fill_between(numbers, low, high, color=own, alpha=0.15, label=band)
        median = _series(rounds, CLIENTS_SECTION, "eval_acc_median")
        axes.plot(numbers, median, color=own, ls=":", label=words(CLIENTS_SECTION, "eval_acc_median"))
    axes.plot(numbers, personal, color=own, marker="o", label=words(CLIENTS_SECTION, OWN_ACCURACY))
    global_model = _series(rounds, CLIENTS_SECTION, GLOBAL_ACCURACY)
    if _has(global_model):
        # With private-head the global model keeps the initial model's head all run.
        initial_head = run_config.get("personalisation") == "private-head"
        label = words(CLIENTS_SECTION, GLOBAL_ACCURACY) + " (global model"
        label += ", the initial model's head)" if initial_head else ")"
        axes.plot(numbers, global_model, color=shared, marker="s", label=label)
    _chance(axes)
    axes.set(title="Clients' validation accuracy (weighted mean)", ylabel="accuracy", ylim=(0, 1))
    _per_round(axes)
    _legend_below(accuracy_panel)
    if gain_panel:
        _gain(gain_panel[0], numbers, rounds)
    return figure


def _gain(panel, numbers: list[int], rounds: list[dict]) -> None:
    """Own minus global accuracy per client, in points: mean, min to max, share above 0."""
    axes = panel.subplots()
    low = _series(rounds, CLIENTS_SECTION, "eval_gain_points_min")
    high = _series(rounds, CLIENTS_SECTION, "eval_gain_points_max")
    if _has(low):
        band = "gain in points: lowest to highest client"
        axes.fill_between(numbers, low, high, color="tab:green", alpha=0.15, label=band)
    mean = _series(rounds, CLIENTS_SECTION, "eval_gain_points_mean")
    axes.plot(
        numbers, mean, color="tab:green", marker="o", label=words(CLIENTS_SECTION, "eval_gain_points_mean")
    )
    axes.axhline(0, color="grey", lw=0.8)
    axes.set(title="Own model minus global model", ylabel="accuracy gain (points)")
    _per_round(axes)
    share = _series(rounds, CLIENTS_SECTION, "eval_gain_share")
    if _has(share):
        share_axes = axes.twinx()
        share_name = words(CLIENTS_SECTION, "eval_gain_share")
        share_axes.plot(numbers, share, color="black", ls="--", lw=1, label=share_name)
        share_axes.set(ylabel=share_name, yticks=[0, 0.25, 0.5, 0.75, 1])
        _share_zero(axes, share_axes, top=1.05)
    _legend_below(panel)


def _share_zero(axes, share_axes, top: float) -> None:
    """Put `share_axes`' 0 (its top at `top`) level with `axes`' 0: a share is never below
    zero, yet on a twin axis with its own zero it would look so."""
    low, high = axes.get_ylim()
    low, high = min(low, 0.0), max(high, 0.0)
    if high == low:
        high = low + 1.0
    axes.set_ylim(low, high)
    zero_at = -low / (high - low)  # the height of 0 on `axes`, as a fraction
    share_axes.set_ylim(-top * zero_at / (1 - zero_at) if zero_at < 1 else -top, top)


def learning_rate_figure(rounds: list[dict], run_config: dict) -> Figure | None:
    """The learning rate the clients were sent, per round."""
    numbers = [entry["round"] for entry in rounds]
    rates = [entry.get("learning_rate", math.nan) for entry in rounds]
    if not _has(rates):
        return None
    figure = _figure(1, run_config)
    axes = figure.subplots()
    axes.step(numbers, rates, where="post", marker="o")
    axes.set(title="Clients' learning rate", ylabel=words(None, "learning_rate"), ylim=(0, None))
    _per_round(axes)
    return figure


def privacy_figure(rounds: list[dict], run_config: dict) -> Figure | None:
    """Epsilon spent so far, per round, for a run with DP on; with dp-max-epsilon, the cap."""
    spent = [entry["privacy"] for entry in rounds if "privacy" in entry]
    if not spent:
        return None
    figure = _figure(1, run_config)
    axes = figure.subplots()
    epsilon = [entry.get("privacy", {}).get("epsilon", math.nan) for entry in rounds]
    label = f"epsilon at delta={spent[-1]['delta']:g}"
    if "credited" in spent[-1]:  # how it was accounted (privacy.py), in folders that say
        credited, releases = spent[-1]["credited"], spent[-1]["releases"]
        label += (
            f", sampling credited in {credited} of {releases} rounds" if credited else ", no sampling credit"
        )
    axes.plot([entry["round"] for entry in rounds], epsilon, color="tab:purple", marker="o", label=label)
    cap = run_config.get("dp-max-epsilon")
    if isinstance(cap, int | float) and cap > 0:
        label = f"dp-max-epsilon={cap}: the run ends before passing it"
        axes.axhline(cap, color="grey", ls="--", lw=1, label=label)
    axes.set(title="Privacy spent (client-level DP)", ylabel="epsilon", ylim=(0, None))
    _per_round(axes)
    _legend_below(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
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
            if (run_dir / "config.json").is_file():  # a run folder whose run ended before round 1 did
                parser.exit(1, f"{run_dir}: its run recorded no round, so there is nothing to draw: "
                            "why it ended is in its log (flwr log <run-id>)\n")  # fmt: skip
            parser.exit(1, f"{run_dir}: no results.json here: expected a run folder, outputs/<date>/<time>\n")
        for path in plot_run(run_dir):
            print(path)


if __name__ == "__main__":
    main()
