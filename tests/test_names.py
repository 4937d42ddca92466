"""One name per number: names.py's table is the one docs/outputs.md prints, and every
number a round records is in it, under the name the log and W&B use."""

import json
import logging
import re
from pathlib import Path

from pytorch_example.names import NUMBERS, number_at, wandb_series, words
from pytorch_example.rounds import log_progress
from tests.scripted import ScriptedGrid, config_for, honest, run_rounds

DOCS = Path(__file__).parent.parent / "docs" / "outputs.md"


def test_docs_print_the_table_of_names_as_names_py_holds_it():
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)` \| ([^|]+) \|$", DOCS.read_text(), re.MULTILINE)
    held = [
        (f"{each.section}.{each.key}" if each.section else each.key, each.wandb, each.words)
        for each in NUMBERS
    ]
    assert [(place, wandb, shown.strip()) for place, wandb, shown in rows] == held


def test_names_are_one_to_one():
    places = [(each.section, each.key) for each in NUMBERS]
    for name in (places, [each.wandb for each in NUMBERS], [each.words for each in NUMBERS]):
        assert len(set(name)) == len(name)


def test_every_number_a_round_records_has_a_name_and_reaches_wandb_under_it(tmp_path):
    config = config_for(num_server_rounds=1, fraction_evaluate=1.0, dp_noise_multiplier=1.0)
    run_rounds(tmp_path, config, ScriptedGrid(4, honest))
    [entry] = json.loads((tmp_path / "results.json").read_text())
    recorded = [
        (section, key)
        for section, values in entry.items()
        if isinstance(values, dict) and section != "replies"
        for key in values
        if section != "privacy" or key not in ("delta", "releases")  # the account's terms, not series
    ] + [(None, "learning_rate")]
    assert all(number_at(section, key) for section, key in recorded)  # KeyError names the stray one
    series = wandb_series(entry)
    assert len(series) == len(recorded)
    assert series["privacy_epsilon"] == entry["privacy"]["epsilon"]
    assert series["privacy_clipping_norm"] == entry["privacy"]["clipping_norm"] == 0.1
    assert series["federated_evaluate_accuracy"] == entry["evaluate_metrics_clientapp"]["eval_acc"]


def test_the_round_line_says_the_accuracies_in_the_tables_words(caplog):
    entry = {
        "round": 2,
        "evaluate_metrics_serverapp": {"accuracy": 0.5},
        "evaluate_metrics_clientapp": {"eval_acc": 0.75},
    }
    with caplog.at_level(logging.INFO, logger="flwr"):
        log_progress(entry, 4, 1.0, 2.0, 2)
    central = words("evaluate_metrics_serverapp", "accuracy")
    own = words("evaluate_metrics_clientapp", "eval_acc")
    assert f"| {central} 0.5000 | {own} 0.7500" in caplog.text
