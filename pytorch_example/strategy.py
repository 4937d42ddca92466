"""Flower's FedAvg with what this app adds: a learning-rate schedule, a round loop that
waits less and overlaps central with federated evaluation, train replies that would
poison the model left out, entries clients do not send kept as they are, how much the
clients' own models beat the global one, and a run that fails when its clients stop
training. Each finished round goes to `RunOutputs`, which records it.
"""

import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from logging import DEBUG, INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from pytorch_example.outputs import RunOutputs

# A speed-up: how often the ServerApp asks for replies. Flower's own `send_and_receive`
# waits 3 s between asks in a deployment (100 ms in simulation), which a round pays twice
# (benchmarks/README.md#round-cost-python--m-benchmarksround_cost).
REPLY_POLL_INTERVAL_S = 0.05
NODE_POLL_INTERVAL_S = 1.0

CentralEvaluation = Callable[[int, ArrayRecord], MetricRecord | None]


class RunFailed(RuntimeError):
    """The run cannot go on; the message is one line for the user."""


class CustomFedAvg(FedAvg):
    """FedAvg that decays the learning rate and hands every round to `outputs`.

    Parameters
    ----------
    outputs : RunOutputs
        Records each finished round (results.json, checkpoints, W&B).
    learning_rate_at : Callable[[int], float]
        Learning rate clients use in a given round (sent as `lr`).
    max_failed_rounds : int
        The run fails after this many rounds in a row without a valid train reply
        (after all of its rounds, if it has fewer).
    frozen_keys : tuple[str, ...]
        Entries of the model that clients do not send back and the global model keeps
        as they are (the head, with `personalisation = "private-head"`).
    **fedavg_kwargs
        Passed to `FedAvg` (fractions, minimum node counts, ...).
    """

    def __init__(
        self,
        outputs: RunOutputs,
        learning_rate_at: Callable[[int], float],
        max_failed_rounds: int,
        frozen_keys: tuple[str, ...] = (),
        **fedavg_kwargs,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        self.outputs = outputs
        self.learning_rate_at = learning_rate_at
        self.max_failed_rounds = max_failed_rounds
        self.frozen_keys = frozen_keys
        self.node_wait_s = 3600.0  # how long to wait for enough SuperNodes; `start` sets it

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send this round's learning rate with the usual FedAvg train messages."""
        lr = self.learning_rate_at(server_round)
        if server_round > 1 and lr != self.learning_rate_at(server_round - 1):
            log(DEBUG, "Learning rate is now %g", lr)
        config["lr"] = lr
        if self.fraction_train > 0:
            self._wait_for_nodes(grid, max(self.min_available_nodes, self.min_train_nodes))
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's evaluate messages, with the round's learning rate (clients refit their
        heads with it), once enough SuperNodes are there (see `_wait_for_nodes`)."""
        config["lr"] = self.learning_rate_at(server_round)
        if self.fraction_evaluate > 0:
            self._wait_for_nodes(grid, max(self.min_available_nodes, self.min_evaluate_nodes))
        return super().configure_evaluate(server_round, arrays, config, grid)

    def _wait_for_nodes(self, grid: Grid, needed: int) -> None:
        """Wait up to `node_wait_s` for `needed` SuperNodes, then fail in one line.

        FedAvg itself would wait forever, e.g. for a second SuperNode that never comes.
        """
        deadline = time.monotonic() + self.node_wait_s
        connected = len(list(grid.get_node_ids()))
        if connected < needed:
            log(INFO, "Waiting for SuperNodes: %d connected, %d needed", connected, needed)
        while connected < needed:
            if time.monotonic() > deadline:
                raise RunFailed(
                    f"{connected} SuperNode(s) connected but {needed} needed to sample a round, still "
                    f"after {self.node_wait_s:g}s (round-timeout): start more SuperNodes, or resume later"
                )
            time.sleep(NODE_POLL_INTERVAL_S)
            connected = len(list(grid.get_node_ids()))

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: CentralEvaluation | None = None,
        first_round: int = 1,
    ) -> Result:
        """Run rounds `first_round`..`num_rounds` as `FedAvg.start` does, recording each.

        `first_round` > 1 continues a run whose earlier rounds gave `initial_arrays`.
        Returns the `Result` with the final model and every round's metrics; raises
        `RunFailed` when the clients stopped training (see `max_failed_rounds`).
        """
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        self.node_wait_s = timeout
        self.summary()

        result = Result(arrays=initial_arrays)
        if first_round == 1 and evaluate_fn and (initial := evaluate_fn(0, initial_arrays)) is not None:
            log(INFO, "Initial central evaluation: %s", initial)
            result.evaluate_metrics_serverapp[0] = initial

        started = time.monotonic()
        failed_rounds: list[str] = []  # the first client error of each failed round in a row
        # One background thread: central evaluation overlaps the clients' evaluation.
        with ThreadPoolExecutor(max_workers=1) as background:
            for server_round in range(first_round, num_rounds + 1):
                round_started = time.monotonic()
                log(DEBUG, "[ROUND %s/%s]", server_round, num_rounds)
                replies: dict[str, dict[str, int]] = {}
                train_error = self._train(grid, server_round, result, train_config, timeout, replies)
                # The clients' evaluation is mostly waiting on messages, so the ServerApp's
                # cores are free for the central evaluation meanwhile.
                central = background.submit(evaluate_fn, server_round, result.arrays) if evaluate_fn else None
                self._evaluate(grid, server_round, result, evaluate_config, timeout, replies)
                if central is not None and (central_metrics := central.result()) is not None:
                    result.evaluate_metrics_serverapp[server_round] = central_metrics
                round_result = self.outputs.record_round(
                    server_round, result, self.learning_rate_at(server_round), replies
                )
                finished = time.monotonic()
                rounds_here = server_round - first_round + 1
                log_progress(
                    round_result, num_rounds, finished - round_started, finished - started, rounds_here
                )
                failed_rounds = [*failed_rounds, train_error] if train_error is not None else []
                if len(failed_rounds) >= min(self.max_failed_rounds, num_rounds - first_round + 1):
                    raise RunFailed(
                        f"{len(failed_rounds)} round(s) in a row got no valid train reply, so nothing "
                        f"was trained; the first client error: {failed_rounds[0]}"
                    )
        self.outputs.save_final_model(result.arrays)
        return result

    def _train(
        self,
        grid: Grid,
        server_round: int,
        result: Result,
        train_config: ConfigRecord,
        timeout: float,
        counts: dict[str, dict[str, int]],
    ) -> str | None:
        """Train and aggregate into `result`, count the replies into `counts`; say why,
        if no valid train reply came."""
        messages = list(self.configure_train(server_round, result.arrays, train_config, grid))
        replies = send_and_receive(grid, messages, timeout)
        shapes = {
            key: tuple(array.shape) for key, array in result.arrays.items() if key not in self.frozen_keys
        }
        usable = []
        for reply in replies:
            problem = None if reply.has_error() else train_reply_problem(reply.content, shapes)
            if problem is None:
                usable.append(reply)
            else:
                log(WARNING, "Round %s: left out the train reply of node %s: %s",
                    server_round, reply.metadata.src_node_id, problem)  # fmt: skip
        counts["train"] = reply_counts(messages, replies, dropped=len(replies) - len(usable))
        arrays, train_metrics = self.aggregate_train(server_round, usable)
        if arrays is not None:
            result.arrays = ArrayRecord({**result.arrays, **arrays})  # frozen entries stay
        if train_metrics is not None:
            result.train_metrics_clientapp[server_round] = train_metrics
        if not messages or arrays is not None:
            return None
        errors = [reply.error.reason for reply in replies if reply.has_error()]
        log(WARNING, "Round %s trained nothing: the global model stays as it was", server_round)
        if errors:
            return last_line(errors[0])
        if replies:
            return f"every train reply was left out ({len(replies)}), see the warnings above"
        return f"no reply from {len(messages)} sampled node(s) within {timeout:g}s"

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """FedAvg's weighted means, plus each client counted once: the spread of own-model
        accuracy (`eval_acc_{min,median,max,std}`), the share of clients whose own model
        beats the global one on their rows (`eval_gain_share`), and the gain in points
        (`eval_gain_points_{mean,min,max}`, 100 x own minus global accuracy)."""
        replies = list(replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        scores = [
            reply.content["metrics"]
            for reply in replies
            if reply.has_content() and {"eval_acc", "eval_acc_global"} <= set(reply.content["metrics"].keys())
        ]
        if metrics is None or not scores:
            return metrics
        own = np.array([float(score["eval_acc"]) for score in scores])
        gains = 100 * (own - np.array([float(score["eval_acc_global"]) for score in scores]))
        metrics["eval_acc_min"] = float(np.min(own))
        metrics["eval_acc_median"] = float(np.median(own))
        metrics["eval_acc_max"] = float(np.max(own))
        metrics["eval_acc_std"] = float(np.std(own))
        metrics["eval_gain_share"] = float(np.mean(gains > 0))
        metrics["eval_gain_points_mean"] = float(np.mean(gains))
        metrics["eval_gain_points_min"] = float(np.min(gains))
        metrics["eval_gain_points_max"] = float(np.max(gains))
        return metrics

    def _evaluate(
        self,
        grid: Grid,
        server_round: int,
        result: Result,
        evaluate_config: ConfigRecord,
        timeout: float,
        counts: dict[str, dict[str, int]],
    ) -> None:
        """Federated evaluation of the round's global model, aggregated into `result`."""
        messages = list(self.configure_evaluate(server_round, result.arrays, evaluate_config, grid))
        replies = send_and_receive(grid, messages, timeout)
        counts["evaluate"] = reply_counts(messages, replies, dropped=0)
        if (evaluate_metrics := self.aggregate_evaluate(server_round, replies)) is not None:
            result.evaluate_metrics_clientapp[server_round] = evaluate_metrics


def train_reply_problem(content: RecordDict, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why a train reply must not be averaged into the global model, or None."""
    arrays, metrics = content.get("arrays"), content.get("metrics")
    if not isinstance(arrays, ArrayRecord) or not isinstance(metrics, MetricRecord):
        return "it has no 'arrays' or no 'metrics' record"
    if set(arrays.keys()) != set(shapes):
        return f"its arrays {sorted(arrays.keys())} are not the expected {sorted(shapes)}"
    for key, array in arrays.items():
        if tuple(array.shape) != shapes[key]:
            return f"'{key}' has shape {tuple(array.shape)}, the global model's {shapes[key]}"
        if not np.isfinite(array.numpy()).all():
            return f"'{key}' holds NaN or Inf"
    num_examples = metrics.get("num-examples")
    is_count = isinstance(num_examples, int | float) and not isinstance(num_examples, bool)
    if not (is_count and num_examples > 0 and float(num_examples).is_integer()):
        return f"num-examples = {num_examples!r} is not a positive integer"
    return None


def reply_counts(messages: list[Message], replies: list[Message], dropped: int) -> dict[str, int]:
    """Messages sent, replies received, error replies, and replies left out."""
    return {
        "expected": len(messages),
        "received": len(replies),
        "failed": sum(1 for reply in replies if reply.has_error()),
        "dropped": dropped,
    }


def log_progress(
    round_result: dict, num_rounds: int, round_s: float, elapsed_s: float, rounds_done: int
) -> None:
    """The one line per round a user watches: time, time left, the two accuracies.

    `elapsed_s` and `rounds_done` count this process's rounds (a resumed run's own).
    """
    server_round = round_result["round"]
    eta_s = elapsed_s / rounds_done * (num_rounds - server_round)
    central = round_result["evaluate_metrics_serverapp"].get("accuracy")
    personal = round_result["evaluate_metrics_clientapp"].get("eval_acc")
    log(
        INFO,
        "Round %d/%d: %.1fs, %s elapsed, ETA %s | central accuracy %s | personalised accuracy %s",
        server_round,
        num_rounds,
        round_s,
        clock(elapsed_s),
        clock(eta_s),
        "-" if central is None else f"{central:.4f}",
        "-" if personal is None else f"{personal:.4f}",
    )


def clock(seconds: float) -> str:
    """`3725` -> `1:02:05`, `65` -> `1:05`."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def last_line(text: str) -> str:
    """The last non-empty line of a client's error (a traceback ends with its message)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else text


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """`Grid.send_and_receive`, checking for replies every `REPLY_POLL_INTERVAL_S`."""
    # A message the SuperLink did not accept has no ID and will never get a reply.
    pending = {message_id for message_id in grid.push_messages(messages) if message_id}
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        arrived = list(grid.pull_messages(pending))
        replies.extend(arrived)
        pending -= {reply.metadata.reply_to_message_id for reply in arrived}
        if pending:
            time.sleep(REPLY_POLL_INTERVAL_S)
    return replies
