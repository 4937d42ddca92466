"""The round loop: train, evaluate, record, for as many rounds as the run has.

Every reply passes the gate (gate.py) before Flower's aggregation or the app's metrics
see it. The loop also waits a bounded time for SuperNodes, overlaps central with
federated evaluation, counts DP's releases, and fails a run whose clients stop training.
"""

import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from logging import DEBUG, INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from pytorch_example.config import AppConfig
from pytorch_example.gate import ReplyGate
from pytorch_example.names import CENTRAL_ACCURACY, CENTRAL_SECTION, CLIENTS_SECTION, OWN_ACCURACY, words
from pytorch_example.outputs import RunOutputs
from pytorch_example.privacy import PrivacyLedger
from pytorch_example.server_step import ServerStep
from pytorch_example.trust import too_few_replies

# A speed-up: how often the ServerApp asks for replies. Flower's own `send_and_receive`
# waits 3 s between asks in a deployment (100 ms in simulation), which a round pays twice
# (benchmarks/README.md#round-cost-python--m-benchmarksround_cost).
REPLY_POLL_INTERVAL_S = 0.05
NODE_POLL_INTERVAL_S = 1.0

CentralEvaluation = Callable[[int, ArrayRecord], MetricRecord | None]
# Per phase: messages sent, replies received, failed, dropped, and those whose weight
# the gate's bound cut (capped); for train also those whose update it cut (clipped).
Counts = dict[str, dict[str, int]]


class RunFailed(RuntimeError):
    """The run cannot go on; the message is one line for the user."""


class PrivacyBudgetReached(Exception):
    """This round would take epsilon past `dp-max-epsilon`: the run ends before it."""


class RoundLoop:
    """Runs rounds of a Flower `Strategy` and hands each finished one to `outputs`.

    Parameters
    ----------
    config : AppConfig
        The run's settings: the learning rate recorded per round, `max-failed-rounds`,
        `round-timeout` and what a round's replies must number (trust.py).
    strategy : Strategy
        Configures each phase's messages and aggregates its replies.
    grid : Grid
        The SuperLink's: sends the messages and brings back the replies.
    outputs : RunOutputs
        Records each finished round (results.json, checkpoints, W&B).
    gate : ReplyGate
        What a reply must be to be used, and how far a train reply may move the model.
    privacy : PrivacyLedger | None
        With DP on: epsilon so far; a round that would pass `dp-max-epsilon` is not run.
    server_step : ServerStep | None
        How far the model moves toward each round's aggregate; by default all the way.
    """

    def __init__(
        self,
        config: AppConfig,
        strategy: Strategy,
        grid: Grid,
        outputs: RunOutputs,
        gate: ReplyGate,
        privacy: PrivacyLedger | None = None,
        server_step: ServerStep | None = None,
    ) -> None:
        self.config = config
        self.strategy = strategy
        self.grid = grid
        self.outputs = outputs
        self.gate = gate
        self.privacy = privacy
        self.server_step = server_step or ServerStep(config)

    def run(
        self,
        initial_arrays: ArrayRecord,
        client_config: ConfigRecord | None = None,
        evaluate_fn: CentralEvaluation | None = None,
        first_round: int = 1,
    ) -> Result:
        """Run rounds `first_round`..`num-server-rounds`, recording each.

        `first_round` > 1 continues a run whose earlier rounds gave `initial_arrays`;
        `client_config` goes to the clients with every message. Returns the `Result`;
        raises `RunFailed` when the clients stopped training (`max-failed-rounds`).
        """
        num_rounds = self.config.num_server_rounds
        self.strategy.summary()
        result = Result(arrays=initial_arrays)
        if first_round == 1 and evaluate_fn and (initial := evaluate_fn(0, initial_arrays)) is not None:
            log(INFO, "Initial central evaluation: %s", initial)
            result.evaluate_metrics_serverapp[0] = initial
            self.outputs.record_initial_evaluation(dict(initial))

        client_config = client_config or ConfigRecord()
        started = time.monotonic()
        failed_rounds: list[str] = []  # why each failed round in a row trained nothing
        # One background thread: central evaluation overlaps the clients' evaluation.
        with ThreadPoolExecutor(max_workers=1) as background:
            for server_round in range(first_round, num_rounds + 1):
                round_started = time.monotonic()
                log(DEBUG, "[ROUND %s/%s]", server_round, num_rounds)
                counts: Counts = {}
                try:
                    why_untrained = self._train(server_round, result, client_config, counts)
                except PrivacyBudgetReached:
                    limit = self.config.dp_max_epsilon
                    log(WARNING, "Round %d not run, so the run ends here: one more DP round would take "
                        "epsilon past dp-max-epsilon = %g", server_round, limit)  # fmt: skip
                    break
                # The clients' evaluation is mostly waiting on messages, so the ServerApp's
                # cores are free for the central evaluation meanwhile.
                central = background.submit(evaluate_fn, server_round, result.arrays) if evaluate_fn else None
                self._evaluate(server_round, result, client_config, counts)
                if central is not None and (central_metrics := central.result()) is not None:
                    result.evaluate_metrics_serverapp[server_round] = central_metrics
                round_result = self.outputs.record_round(
                    server_round,
                    result,
                    self.config.learning_rate_at(server_round),
                    counts,
                    self.privacy.spent() if self.privacy is not None else None,
                    self.server_step.velocity,
                )
                finished = time.monotonic()
                rounds_here = server_round - first_round + 1
                log_progress(
                    round_result, num_rounds, finished - round_started, finished - started, rounds_here
                )
                failed_rounds = [*failed_rounds, why_untrained] if why_untrained is not None else []
                if len(failed_rounds) >= min(self.config.max_failed_rounds, num_rounds - first_round + 1):
                    raise RunFailed(
                        f"{len(failed_rounds)} round(s) in a row trained nothing, the first because of "
                        f"{failed_rounds[0]}"
                    )
        self.outputs.save_final_model(result.arrays)
        return result

    def _train(self, server_round: int, result: Result, config: ConfigRecord, counts: Counts) -> str | None:
        """Train and aggregate into `result`, count the replies into `counts`; say why,
        if the round trained nothing (the model then stays as it was)."""
        messages, replies, usable = self._exchange("train", server_round, result.arrays, config, counts)
        bounded = self.gate.bound(usable, result.arrays, server_round)
        counts["train"] |= {"clipped": bounded.clipped, "capped": bounded.capped}
        why_untrained = self._untrained(messages, replies, usable)
        if why_untrained is None:
            arrays, train_metrics = self.strategy.aggregate_train(server_round, usable)
            if arrays is not None:
                arrays = self.server_step(result.arrays, arrays)
            if arrays is None:
                why_untrained = f"the strategy aggregated none of the {len(usable)} usable replies"
            elif not all(np.isfinite(array.numpy()).all() for array in arrays.values()):
                # Finite replies can still overflow a mean, or the server's step (float32
                # tops out at 3.4e38).
                why_untrained = "the new model from the usable replies holds NaN or Inf"
            else:
                result.arrays = arrays
                if train_metrics is not None:
                    result.train_metrics_clientapp[server_round] = train_metrics
                if (privacy := self.privacy) is not None:
                    privacy.release()
                    # Saved before the noisy model goes out to be evaluated: a run killed
                    # later in this round still counts this release when resumed.
                    self.outputs.save_privacy_releases(
                        privacy.releases, privacy.credited, privacy.clipping.norm
                    )
        if why_untrained is not None and messages:
            log(WARNING, "Round %s trained nothing (%s): the global model stays as it was",
                server_round, why_untrained)  # fmt: skip
        return why_untrained if messages else None

    def _untrained(
        self, messages: list[Message], replies: list[Message], usable: list[Message]
    ) -> str | None:
        """Why the round's usable replies cannot be aggregated, or None."""
        if usable:
            return too_few_replies(self.config, len(usable))
        if errors := [reply.error.reason for reply in replies if reply.has_error()]:
            return f"client error: {last_line(errors[0])}"
        if replies:
            return f"every train reply was left out ({len(replies)}), see the warnings above"
        return f"no reply from {len(messages)} sampled node(s) within {self.config.round_timeout:g}s"

    def _evaluate(self, server_round: int, result: Result, config: ConfigRecord, counts: Counts) -> None:
        """Federated evaluation of the round's global model, aggregated into `result`."""
        _, _, usable = self._exchange("evaluate", server_round, result.arrays, config, counts)
        counts["evaluate"]["capped"] = self.gate.bound_evaluate(usable, server_round)
        metrics = self.strategy.aggregate_evaluate(server_round, usable) if usable else None
        if metrics is not None:
            result.evaluate_metrics_clientapp[server_round] = metrics

    def _exchange(
        self, phase: str, server_round: int, arrays: ArrayRecord, client_config: ConfigRecord, counts: Counts
    ) -> tuple[list[Message], list[Message], list[Message]]:
        """One phase's messages ("train" or "evaluate"), sent once enough SuperNodes are
        there; its replies, and those the gate lets through (counted into `counts`)."""
        flower = flower_strategy(self.strategy)
        if getattr(flower, f"fraction_{phase}") > 0:
            self._wait_for_nodes(max(flower.min_available_nodes, getattr(flower, f"min_{phase}_nodes")))
        configure = self.strategy.configure_train if phase == "train" else self.strategy.configure_evaluate
        accounted = phase == "train" and self.privacy is not None
        connected = len(list(self.grid.get_node_ids())) if accounted else 0
        # A copy each time: the strategy adds the round's own entries to it.
        messages = list(configure(server_round, arrays, ConfigRecord(dict(client_config)), self.grid))
        if accounted:
            # How the sample was drawn decides how the round is accounted: checked before
            # anything is sent, so a round that would pass dp-max-epsilon never runs.
            self.privacy.draw(connected, len(list(self.grid.get_node_ids())))
            if self.privacy.next_round_would_exceed():
                raise PrivacyBudgetReached
        replies = send_and_receive(self.grid, messages, self.config.round_timeout)
        usable = self.gate.screen(phase, replies, server_round)
        counts[phase] = reply_counts(messages, replies, usable)
        return messages, replies, usable

    def _wait_for_nodes(self, needed: int) -> None:
        """Wait up to `round-timeout` for `needed` SuperNodes, then fail in one line.

        Flower's strategies would wait forever, e.g. for a second SuperNode that never comes.
        """
        timeout = self.config.round_timeout
        deadline = time.monotonic() + timeout
        connected = len(list(self.grid.get_node_ids()))
        if connected < needed:
            log(INFO, "Waiting for SuperNodes: %d connected, %d needed", connected, needed)
        while connected < needed:
            if time.monotonic() > deadline:
                raise RunFailed(
                    f"{connected} SuperNode(s) connected but {needed} needed to sample a round, still "
                    f"after {timeout:g}s (round-timeout): start more SuperNodes, or resume later"
                )
            time.sleep(NODE_POLL_INTERVAL_S)
            connected = len(list(self.grid.get_node_ids()))


def flower_strategy(strategy: Strategy) -> Strategy:
    """The FedAvg-family strategy inside a wrapper (DP's), or `strategy` itself."""
    return getattr(strategy, "strategy", strategy)


def reply_counts(messages: list[Message], replies: list[Message], usable: list[Message]) -> dict[str, int]:
    """Messages sent, replies received, error replies, and replies left out by the gate."""
    failed = sum(1 for reply in replies if reply.has_error())
    return {
        "expected": len(messages),
        "received": len(replies),
        "failed": failed,
        "dropped": len(replies) - failed - len(usable),
    }


def log_progress(
    round_result: dict, num_rounds: int, round_s: float, elapsed_s: float, rounds_done: int
) -> None:
    """The one line per round a user watches: time, time left, the two accuracies.

    `elapsed_s` and `rounds_done` count this process's rounds (a resumed run's own).
    """
    server_round = round_result["round"]
    eta_s = elapsed_s / rounds_done * (num_rounds - server_round)
    central = round_result[CENTRAL_SECTION].get(CENTRAL_ACCURACY)
    own = round_result[CLIENTS_SECTION].get(OWN_ACCURACY)
    privacy = round_result.get("privacy")
    log(
        INFO,
        "Round %d/%d: %.1fs, %s elapsed, ETA %s | %s %s | %s %s%s",
        server_round,
        num_rounds,
        round_s,
        clock(elapsed_s),
        clock(eta_s),
        words(CENTRAL_SECTION, CENTRAL_ACCURACY),
        "-" if central is None else f"{central:.4f}",
        words(CLIENTS_SECTION, OWN_ACCURACY),
        "-" if own is None else f"{own:.4f}",
        "" if privacy is None else f" | epsilon {privacy['epsilon']:.2f} ({epsilon_terms(privacy)})",
    )


def epsilon_terms(privacy: dict) -> str:
    """`delta 1e-05`, and how many of the rounds so far had their sampling credited."""
    credited, releases = privacy.get("credited", 0), privacy["releases"]
    credit = "sampling credited" if credited == releases else f"sampling credited in {credited} of {releases}"
    return f"delta {privacy['delta']:g}" + (f", {credit}" if credited else "")


def clock(seconds: float) -> str:
    """`3725` -> `1:02:05`, `65` -> `1:05`."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def last_line(text: str) -> str:
    """The last non-empty line of a client's error (a traceback ends with its message), as
    the log shows a SuperNode's words: 300 characters at most, control codes escaped."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[-1] if lines else str(text)
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in line[:300])[:300]


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """`Grid.send_and_receive`, checking for replies every `REPLY_POLL_INTERVAL_S`."""
    # A message the SuperLink did not accept has no ID and will never get a reply.
    pending = {message_id for message_id in grid.push_messages(messages) if message_id}
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in list(grid.pull_messages(list(pending))):
            if reply.metadata.reply_to_message_id in pending:  # each message's first reply only
                replies.append(reply)
                pending.discard(reply.metadata.reply_to_message_id)
        if pending:
            time.sleep(REPLY_POLL_INTERVAL_S)
    return replies
