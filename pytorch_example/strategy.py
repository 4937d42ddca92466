"""The strategy: Flower's FedAvg with four of its hooks overridden.

- `configure_train` / `configure_evaluate` send the round's learning rate (a step
  schedule) with the usual messages.
- `aggregate_train` keeps the model entries clients do not send (the head, with
  `personalisation = "private-head"`) as the server sent them.
- `aggregate_evaluate` adds how far the clients' own models beat the global one.

The robust rules and DP build on this class in trust.py; rounds.py runs the rounds.
"""

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from pytorch_example.names import GLOBAL_ACCURACY, LR_KEY, OWN_ACCURACY, ROWS_KEY


class CustomFedAvg(FedAvg):
    """FedAvg with a learning-rate schedule and own-versus-global evaluation metrics.

    Parameters
    ----------
    learning_rate_at : Callable[[int], float]
        The learning rate clients use in a given round.
    **fedavg_kwargs
        Passed to FedAvg (fractions, minimum node counts, ...).
    """

    def __init__(self, learning_rate_at: Callable[[int], float], **fedavg_kwargs) -> None:
        super().__init__(**fedavg_kwargs)
        self.learning_rate_at = learning_rate_at
        self.sent_arrays = ArrayRecord()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The usual train messages, with this round's learning rate."""
        config[LR_KEY] = self.learning_rate_at(server_round)
        self.sent_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's mean of the replies, completed with the entries they do not carry."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            arrays = ArrayRecord({**self.sent_arrays, **arrays})  # same order as the model's
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The usual evaluate messages, with this round's learning rate: clients refit
        their own heads with it."""
        config[LR_KEY] = self.learning_rate_at(server_round)
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Means weighted by validation rows, plus each client counted once: the spread
        of own-model accuracy (`eval_acc_{min,median,max,std}`), the share of clients
        whose own model beats the global one on their rows (`eval_gain_share`), and the
        gain in points (`eval_gain_points_{mean,min,max}`, 100 x own minus global)."""
        contents = [reply.content for reply in replies if reply.has_content()]
        if not contents:
            return None
        metrics = self.evaluate_metrics_aggr_fn(contents, ROWS_KEY)
        own = np.array([float(content["metrics"][OWN_ACCURACY]) for content in contents])
        gains = 100 * (own - np.array([float(content["metrics"][GLOBAL_ACCURACY]) for content in contents]))
        metrics["eval_acc_min"] = float(np.min(own))
        metrics["eval_acc_median"] = float(np.median(own))
        metrics["eval_acc_max"] = float(np.max(own))
        metrics["eval_acc_std"] = float(np.std(own))
        metrics["eval_gain_share"] = float(np.mean(gains > 0))
        metrics["eval_gain_points_mean"] = float(np.mean(gains))
        metrics["eval_gain_points_min"] = float(np.min(gains))
        metrics["eval_gain_points_max"] = float(np.max(gains))
        return metrics
