"""The app's strategies and the round loop that drives them.

The default strategy is the seed's: Flower's FedAvg with a learning-rate schedule sent
in each train message. `aggregation` swaps in one of Flower's robust rules, and
`dp-noise-multiplier` wraps the strategy in Flower's client-level DP with an accountant.
`RoundLoop` drives whichever results: a loop that waits less and overlaps central with
federated evaluation, leaves out train replies that would poison the model, keeps the
entries clients do not send, reports epsilon, and fails a run whose clients stop
training. Each finished round goes to `RunOutputs`, which records it.
"""

import random
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from logging import DEBUG, INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import (
    GaussianPrivacyEvent,
    Grid,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Result,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from pytorch_example.config import EQUAL_WEIGHT_KEY, FEDAVG, AppConfig, ConfigError
from pytorch_example.outputs import RunOutputs

# A speed-up: how often the ServerApp asks for replies. Flower's own `send_and_receive`
# waits 3 s between asks in a deployment (100 ms in simulation), which a round pays twice
# (benchmarks/README.md#round-cost-python--m-benchmarksround_cost).
REPLY_POLL_INTERVAL_S = 0.05
NODE_POLL_INTERVAL_S = 1.0
ROWS_KEY = "num-examples"  # what clients weigh their replies with: their rows

CentralEvaluation = Callable[[int, ArrayRecord], MetricRecord | None]


class RunFailed(RuntimeError):
    """The run cannot go on; the message is one line for the user."""


class AppRounds:
    """What this app adds to any FedAvg-family strategy of Flower's: the round's learning
    rate in train and evaluate messages, a bounded wait for SuperNodes, and how much the
    clients' own models beat the global one. Mixed in before the Flower class.

    Parameters
    ----------
    learning_rate_at : Callable[[int], float]
        Learning rate clients use in a given round (sent as `lr`).
    node_wait_s : float
        How long a round waits for enough SuperNodes before the run fails.
    **strategy_kwargs
        Passed to the Flower strategy (fractions, minimum node counts, ...).
    """

    def __init__(
        self,
        learning_rate_at: Callable[[int], float],
        node_wait_s: float,
        fixed_train_sample: int | None = None,
        **strategy_kwargs,
    ):
        super().__init__(**strategy_kwargs)
        self.learning_rate_at = learning_rate_at
        self.node_wait_s = node_wait_s
        # DP's noise is scaled to a fixed number of clients: sample exactly that many,
        # however many SuperNodes come and go.
        self.fixed_train_sample = fixed_train_sample
        if fixed_train_sample is not None:
            self.min_train_nodes = max(self.min_train_nodes, fixed_train_sample)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send this round's learning rate with the usual train messages."""
        lr = self.learning_rate_at(server_round)
        if server_round > 1 and lr != self.learning_rate_at(server_round - 1):
            log(DEBUG, "Learning rate is now %g", lr)
        config["lr"] = lr
        if self.fraction_train > 0:
            self._wait_for_nodes(grid, max(self.min_available_nodes, self.min_train_nodes))
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.fixed_train_sample is not None and len(messages) > self.fixed_train_sample:
            # A uniform subset of a uniform sample: still uniform.
            messages = random.sample(messages, self.fixed_train_sample)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The usual evaluate messages, with the round's learning rate (clients refit their
        heads with it), once enough SuperNodes are there (see `_wait_for_nodes`)."""
        config["lr"] = self.learning_rate_at(server_round)
        if self.fraction_evaluate > 0:
            self._wait_for_nodes(grid, max(self.min_available_nodes, self.min_evaluate_nodes))
        return super().configure_evaluate(server_round, arrays, config, grid)

    def _wait_for_nodes(self, grid: Grid, needed: int) -> None:
        """Wait up to `node_wait_s` for `needed` SuperNodes, then fail in one line.

        Flower's strategies would wait forever, e.g. for a second SuperNode that never comes.
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

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Means weighted by validation rows (`num-examples`, whatever train replies are
        weighted by), plus each client counted once: the spread of own-model accuracy
        (`eval_acc_{min,median,max,std}`), the share of clients whose own model beats the
        global one on their rows (`eval_gain_share`), and the gain in points
        (`eval_gain_points_{mean,min,max}`, 100 x own minus global accuracy)."""
        contents = [reply.content for reply in replies if reply.has_content()]
        if not contents:
            return None
        validate_message_reply_consistency(contents, ROWS_KEY, check_arrayrecord=False)
        metrics = self.evaluate_metrics_aggr_fn(contents, ROWS_KEY)
        scores = [
            content["metrics"]
            for content in contents
            if {"eval_acc", "eval_acc_global"} <= set(content["metrics"].keys())
        ]
        if not scores:
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


class CustomFedAvg(AppRounds, FedAvg):
    """The seed's strategy: FedAvg that decays the learning rate."""


class CustomFedTrimmedAvg(AppRounds, FedTrimmedAvg):
    """Per weight, the mean of the replies left after cutting `beta` of them at each end."""


class CustomFedMedian(AppRounds, FedMedian):
    """Per weight, the median of the replies."""


class CustomKrum(AppRounds, Krum):
    """The one reply closest to its n - f - 2 nearest replies."""


class CustomMultiKrum(AppRounds, MultiKrum):
    """The mean of the `num_nodes_to_select` replies Krum scores best."""


class CustomBulyan(AppRounds, Bulyan):
    """Multi-Krum's n - 2f best replies, then per weight the mean of the n - 4f closest
    to their median."""


def check_federation(config: AppConfig, num_supernodes: int) -> None:
    """Refuse, in one line, settings that cannot work on a federation of this size."""
    if num_supernodes > 0:
        config.check_sample(num_supernodes)
    elif config.aggregation != FEDAVG:
        log(
            WARNING,
            "No SuperNode connected yet: whether '%s' suits the sample is not checked",
            config.aggregation,
        )
    if config.dp_on:
        dp_accountant(config, num_supernodes, releases=0)


def dp_accountant(config: AppConfig, num_supernodes: int, releases: int) -> RdpAccountant:
    """Flower's RDP accountant for this run, `releases` DP rounds in; `ConfigError` if the
    next round would already pass `dp-max-epsilon`, or the federation is too small."""
    if num_supernodes < 2:
        raise ConfigError(
            "run-config key 'dp-noise-multiplier' > 0 scales its noise to the clients a round samples, "
            f"fixed when the run starts, but {num_supernodes} SuperNode(s) are connected: start 2 or more"
        )
    num_sampled = config.train_sample_size(num_supernodes)
    try:
        accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=config.dp_delta,
                population_size=num_supernodes,
                # The only model Flower's fixed-clipping wrapper accounts for: no credit
                # is taken for sampling a fraction of the clients (README: Trust).
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
                max_epsilon=config.dp_max_epsilon or None,
            )
        )
    except ImportError:
        raise ConfigError(
            "run-config key 'dp-noise-multiplier' > 0 needs Flower's privacy accountant: "
            'pip install "flwr[dp]"'
        ) from None
    event = GaussianPrivacyEvent(config.dp_noise_multiplier, num_sampled, num_supernodes)
    if releases:
        accountant.compose(event, count=releases)
    if config.dp_max_epsilon and accountant.would_exceed(event):
        spent = accountant.get_epsilon(config.dp_delta) if releases else 0.0
        raise ConfigError(
            f"run-config key 'dp-max-epsilon' = {config.dp_max_epsilon:g} leaves no round to run: "
            f"epsilon is {spent:.3g} after {releases} round(s) and one more round would pass it "
            "(raise dp-max-epsilon or dp-noise-multiplier)"
        )
    return accountant


def build_strategy(config: AppConfig, num_supernodes: int, privacy_releases: int = 0) -> Strategy:
    """The strategy `config` asks for, for a federation of `num_supernodes` that
    `check_federation` accepted.

    `privacy_releases`: DP rounds a resumed run has already released, which its
    epsilon goes on from.
    """
    num_sampled = config.train_sample_size(num_supernodes)
    common = {
        "learning_rate_at": config.learning_rate_at,
        "node_wait_s": config.round_timeout,
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
    }
    if config.dp_on:
        common |= {"weighted_by_key": EQUAL_WEIGHT_KEY, "fixed_train_sample": num_sampled}
    f = config.num_malicious
    strategy = {
        "fedavg": lambda: CustomFedAvg(**common),
        "trimmed-mean": lambda: CustomFedTrimmedAvg(**common, beta=config.trim_fraction),
        "median": lambda: CustomFedMedian(**common),
        "krum": lambda: CustomKrum(**common, num_malicious_nodes=f),
        "multi-krum": lambda: CustomMultiKrum(
            **common, num_malicious_nodes=f, num_nodes_to_select=config.multi_krum_keep or num_sampled - f
        ),
        "bulyan": lambda: CustomBulyan(**common, num_malicious_nodes=f),
    }[config.aggregation]()
    if not config.dp_on:
        return strategy
    accountant = dp_accountant(config, num_supernodes, privacy_releases)
    return DifferentialPrivacyServerSideFixedClipping(
        strategy,
        noise_multiplier=config.dp_noise_multiplier,
        clipping_norm=config.dp_clipping_norm,
        num_sampled_clients=num_sampled,
        accountant=accountant,
    )


class RoundLoop:
    """Runs rounds of any Flower `Strategy` and hands each finished one to `outputs`.

    Parameters
    ----------
    outputs : RunOutputs
        Records each finished round (results.json, checkpoints, W&B).
    learning_rate_at : Callable[[int], float]
        The round's learning rate, as recorded (the strategy sends it).
    max_failed_rounds : int
        The run fails after this many rounds in a row without a valid train reply
        (after all of its rounds, if it has fewer).
    frozen_keys : tuple[str, ...]
        Entries of the model that clients do not send back and the global model keeps
        as they are (the head, with `personalisation = "private-head"`).
    equal_weights : bool
        Train replies must weigh 1 (`equal-weight`), as DP's mean needs.
    """

    def __init__(
        self,
        outputs: RunOutputs,
        learning_rate_at: Callable[[int], float],
        max_failed_rounds: int,
        frozen_keys: tuple[str, ...] = (),
        equal_weights: bool = False,
    ) -> None:
        self.outputs = outputs
        self.learning_rate_at = learning_rate_at
        self.max_failed_rounds = max_failed_rounds
        self.frozen_keys = frozen_keys
        self.equal_weights = equal_weights

    def run(
        self,
        strategy: Strategy,
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
        `RunFailed` when the clients stopped training (see `max_failed_rounds`). A round
        that would take epsilon past `dp-max-epsilon` is not run: the run ends there.
        """
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        strategy.summary()

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
                try:
                    train_error = self._train(
                        strategy, grid, server_round, result, train_config, timeout, replies
                    )
                    if (spent := privacy_spent(strategy)) is not None:
                        # Saved before the noisy model goes out to be evaluated: a run killed
                        # later in this round still counts this release when resumed.
                        self.outputs.save_privacy_releases(spent["releases"])
                except PrivacyBudgetExhausted as exhausted:
                    log(
                        WARNING,
                        "Round %d not run, so the run ends here (dp-max-epsilon): %s",
                        server_round,
                        exhausted,
                    )
                    break
                # The clients' evaluation is mostly waiting on messages, so the ServerApp's
                # cores are free for the central evaluation meanwhile.
                central = background.submit(evaluate_fn, server_round, result.arrays) if evaluate_fn else None
                self._evaluate(strategy, grid, server_round, result, evaluate_config, timeout, replies)
                if central is not None and (central_metrics := central.result()) is not None:
                    result.evaluate_metrics_serverapp[server_round] = central_metrics
                round_result = self.outputs.record_round(
                    server_round,
                    result,
                    self.learning_rate_at(server_round),
                    replies,
                    privacy_spent(strategy),
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
        strategy: Strategy,
        grid: Grid,
        server_round: int,
        result: Result,
        train_config: ConfigRecord,
        timeout: float,
        counts: dict[str, dict[str, int]],
    ) -> str | None:
        """Train and aggregate into `result`, count the replies into `counts`; say why,
        if the round trained nothing."""
        messages = list(strategy.configure_train(server_round, result.arrays, train_config, grid))
        replies = send_and_receive(grid, messages, timeout)
        shapes = {
            key: tuple(array.shape) for key, array in result.arrays.items() if key not in self.frozen_keys
        }
        usable = []
        for reply in replies:
            problem = (
                None if reply.has_error() else train_reply_problem(reply.content, shapes, self.equal_weights)
            )
            if problem is None:
                usable.append(reply)
            else:
                log(WARNING, "Round %s: left out the train reply of node %s: %s",
                    server_round, reply.metadata.src_node_id, problem)  # fmt: skip
        counts["train"] = reply_counts(messages, replies, dropped=len(replies) - len(usable))
        arrays, train_metrics = strategy.aggregate_train(server_round, usable)
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
        if valid := sum(1 for reply in usable if not reply.has_error()):
            # E.g. Bulyan short of 4f + 3 replies, or DP missing one of its sampled clients.
            return f"the strategy aggregated none of the {valid} valid train replies (its warning says why)"
        if replies:
            return f"every train reply was left out ({len(replies)}), see the warnings above"
        return f"no reply from {len(messages)} sampled node(s) within {timeout:g}s"

    def _evaluate(
        self,
        strategy: Strategy,
        grid: Grid,
        server_round: int,
        result: Result,
        evaluate_config: ConfigRecord,
        timeout: float,
        counts: dict[str, dict[str, int]],
    ) -> None:
        """Federated evaluation of the round's global model, aggregated into `result`."""
        messages = list(strategy.configure_evaluate(server_round, result.arrays, evaluate_config, grid))
        replies = send_and_receive(grid, messages, timeout)
        counts["evaluate"] = reply_counts(messages, replies, dropped=0)
        if (evaluate_metrics := strategy.aggregate_evaluate(server_round, replies)) is not None:
            result.evaluate_metrics_clientapp[server_round] = evaluate_metrics


def privacy_spent(strategy: Strategy) -> dict | None:
    """Epsilon so far at the run's delta, and the private rounds it counts; None without DP."""
    spent = strategy.privacy_spent() if hasattr(strategy, "privacy_spent") else None
    if spent is None:
        return None
    return {"epsilon": spent.epsilon, "delta": spent.delta, "releases": spent.num_releases}


def train_reply_problem(
    content: RecordDict, shapes: dict[str, tuple[int, ...]], equal_weights: bool = False
) -> str | None:
    """Why a train reply must not be averaged into the global model, or None.

    `shapes`: the entries clients send, in the global model's order (DP's clipping pairs
    arrays by position). `equal_weights`: the reply must weigh 1 (`equal-weight`).
    """
    if list(content.keys()) != ["arrays", "metrics"]:
        return f"it holds the records {sorted(content.keys())}, not 'arrays' and 'metrics'"
    arrays, metrics = content["arrays"], content["metrics"]
    if not isinstance(arrays, ArrayRecord) or not isinstance(metrics, MetricRecord):
        return "its 'arrays' or 'metrics' record is of the wrong kind"
    if list(arrays.keys()) != list(shapes):
        return f"its arrays {list(arrays.keys())} are not the expected {list(shapes)}, in that order"
    for key, array in arrays.items():
        if tuple(array.shape) != shapes[key]:
            return f"'{key}' has shape {tuple(array.shape)}, the global model's {shapes[key]}"
        if not np.isfinite(array.numpy()).all():
            return f"'{key}' holds NaN or Inf"
    num_examples = metrics.get(ROWS_KEY)
    is_count = isinstance(num_examples, int | float) and not isinstance(num_examples, bool)
    if not (is_count and num_examples > 0 and float(num_examples).is_integer()):
        return f"num-examples = {num_examples!r} is not a positive integer"
    if equal_weights and metrics.get(EQUAL_WEIGHT_KEY) != 1:
        return f"{EQUAL_WEIGHT_KEY} = {metrics.get(EQUAL_WEIGHT_KEY)!r}, not 1 as DP's mean needs"
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
    privacy = round_result.get("privacy")
    log(
        INFO,
        "Round %d/%d: %.1fs, %s elapsed, ETA %s | central accuracy %s | personalised accuracy %s%s",
        server_round,
        num_rounds,
        round_s,
        clock(elapsed_s),
        clock(eta_s),
        "-" if central is None else f"{central:.4f}",
        "-" if personal is None else f"{personal:.4f}",
        "" if privacy is None else f" | epsilon {privacy['epsilon']:.2f} (delta {privacy['delta']:g})",
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
