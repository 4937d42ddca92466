"""The names the ServerApp and the ClientApp share, and the one name each number of a
run goes by: the keys of the messages and their replies, the metrics a client reports,
results.json's sections, and where each number appears in W&B, the log and the figures.
"""

from dataclasses import dataclass

# The keys of train and evaluate messages, and of the replies a ClientApp sends.
LR_KEY = "lr"  # in train and evaluate messages: the round's learning rate
LINEAGE_KEY = "lineage"  # in every message: the run (and its resumptions) heads are kept for
ROWS_KEY = "num-examples"  # in every reply: the rows trained on or scored
TRAIN_LOSS = "train_loss"
OWN_LOSS, OWN_ACCURACY = "eval_loss", "eval_acc"  # the client's own model on its validation rows
GLOBAL_LOSS, GLOBAL_ACCURACY = "eval_loss_global", "eval_acc_global"  # the global model, the same rows
TRAIN_METRIC_KEYS = (TRAIN_LOSS, ROWS_KEY)
EVALUATE_METRIC_KEYS = (OWN_LOSS, OWN_ACCURACY, GLOBAL_LOSS, GLOBAL_ACCURACY, ROWS_KEY)

# The central evaluation's scores: the global model on the test set.
CENTRAL_ACCURACY, CENTRAL_LOSS = "accuracy", "loss"

# results.json's sections, named as the fields of Flower's `Result` that fill them.
TRAIN_SECTION = "train_metrics_clientapp"
CLIENTS_SECTION = "evaluate_metrics_clientapp"
CENTRAL_SECTION = "evaluate_metrics_serverapp"
RESULT_SECTIONS = (TRAIN_SECTION, CLIENTS_SECTION, CENTRAL_SECTION)
# The sections' names in the folders of versions before Flower's were taken.
LEGACY_SECTIONS = {"train_metrics": TRAIN_SECTION}


@dataclass(frozen=True)
class Number:
    """One number a run reports: results.json's `section` and `key` for it (the round's
    entry itself when `section` is None), W&B's name for its series (the published
    example's where it had one), and the words the log and the figures say it in."""

    section: str | None
    key: str
    wandb: str
    words: str


# Every number of a round, in one place: docs/outputs.md prints this table (a test keeps
# the two equal), and nothing else names a number anew.
_CENTRAL, _CLIENTS = CENTRAL_SECTION, CLIENTS_SECTION
NUMBERS = (
    Number(_CENTRAL, CENTRAL_ACCURACY, "centralized_accuracy", "central accuracy"),
    Number(_CENTRAL, CENTRAL_LOSS, "centralized_loss", "central loss"),
    Number(_CLIENTS, OWN_ACCURACY, "federated_evaluate_accuracy", "own-model accuracy"),
    Number(_CLIENTS, OWN_LOSS, "federated_evaluate_loss", "own-model loss"),
    Number(_CLIENTS, GLOBAL_ACCURACY, "federated_evaluate_accuracy_global_model", "federated accuracy"),
    Number(_CLIENTS, GLOBAL_LOSS, "federated_evaluate_loss_global_model", "federated loss"),
    Number(_CLIENTS, "eval_acc_min", "federated_evaluate_accuracy_min", "lowest own-model accuracy"),
    Number(_CLIENTS, "eval_acc_median", "federated_evaluate_accuracy_median", "median own-model accuracy"),
    Number(_CLIENTS, "eval_acc_max", "federated_evaluate_accuracy_max", "highest own-model accuracy"),
    Number(_CLIENTS, "eval_acc_std", "federated_evaluate_accuracy_std", "own-model accuracy's std"),
    Number(_CLIENTS, "eval_gain_share", "federated_evaluate_gain_share", "share of clients that gain"),
    Number(_CLIENTS, "eval_gain_points_mean", "federated_evaluate_gain_points_mean", "mean gain in points"),
    Number(_CLIENTS, "eval_gain_points_min", "federated_evaluate_gain_points_min", "lowest gain in points"),
    Number(_CLIENTS, "eval_gain_points_max", "federated_evaluate_gain_points_max", "highest gain in points"),
    Number(TRAIN_SECTION, TRAIN_LOSS, "train_loss", "train loss"),
    Number(None, "learning_rate", "learning_rate", "learning rate"),
    Number("privacy", "epsilon", "privacy_epsilon", "epsilon"),
    Number("privacy", "credited", "privacy_credited_rounds", "rounds with sampling credited"),
    Number("privacy", "clipping_norm", "privacy_clipping_norm", "DP clipping norm"),
)
_BY_PLACE = {(number.section, number.key): number for number in NUMBERS}


def number_at(section: str | None, key: str) -> Number:
    """The number results.json keeps at `section` and `key`."""
    return _BY_PLACE[(section, key)]


def words(section: str | None, key: str) -> str:
    """What the log and the figures call the number at `section` and `key`."""
    return number_at(section, key).words


def wandb_series(round_result: dict) -> dict:
    """A results.json round entry's numbers under their W&B names."""
    series = {}
    for each in NUMBERS:
        values = round_result if each.section is None else round_result.get(each.section, {})
        if each.key in values:
            series[each.wandb] = values[each.key]
    return series
