"""Trusting the clients less: the robust rules, client-level DP's mechanism, and what a
round's replies must number for each.

`aggregation` swaps `CustomFedAvg`'s weighted mean for one of Flower's robust rules:
each class below is `CustomFedAvg` composed with Flower's. `dp-noise-multiplier` wraps
the strategy in Flower's server-side fixed clipping; privacy.py accounts for the
mechanism as the app runs it (docs/trust.md).
"""

import dataclasses
import itertools
import random
from collections.abc import Iterable
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import (
    Grid,
)
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from pytorch_example.config import AppConfig, ConfigError
from pytorch_example.gate import (
    EQUAL_WEIGHT_KEY,
    influence_bounds,
    scaled_update,
    update_norm,
    weighs_replies_equally,
)
from pytorch_example.names import ROWS_KEY
from pytorch_example.privacy import Clipping
from pytorch_example.strategy import CustomFedAvg


class CustomFedTrimmedAvg(CustomFedAvg, FedTrimmedAvg):
    """Per weight, the mean of the replies left after cutting `beta` of them at each end."""


class CustomFedMedian(CustomFedAvg, FedMedian):
    """Per weight, the median of the replies."""


class CustomKrum(CustomFedAvg, Krum):
    """The one reply closest to its n - f - 2 nearest replies."""


class CustomMultiKrum(CustomFedAvg, MultiKrum):
    """The mean of the `keep` replies Krum scores best; `keep` 0: all but f of those that
    came, counted again each round."""

    def __init__(self, keep: int, **kwargs) -> None:
        super().__init__(num_nodes_to_select=keep or 1, **kwargs)
        self.keep = keep

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.num_nodes_to_select = self.keep or len(replies) - self.num_malicious_nodes
        return super().aggregate_train(server_round, replies)


class CustomBulyan(CustomFedAvg, Bulyan):
    """Multi-Krum's n - 2f best replies, then per weight the mean of the n - 4f closest
    to their median."""


class FixedSampleFedAvg(CustomFedAvg):
    """`CustomFedAvg` that samples exactly `sample_size` clients to train, however many
    SuperNodes come and go: DP's noise is scaled to that number."""

    def __init__(self, sample_size: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sample_size = sample_size
        self.min_train_nodes = max(self.min_train_nodes, sample_size)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        # A uniform subset of a uniform sample: still uniform.
        return random.sample(messages, min(len(messages), self.sample_size))


class ClippedNoisyMean(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping and noise, as the sum of the sampled clients'
    clipped updates over their number n, plus noise. A sampled client whose reply is
    missing or left out adds a zero update, so one client cannot stop DP rounds, and no
    client's share is ever more than C / n. C is `clipping`'s (privacy.py): fixed, or
    adapted after each round to the updates' norms.

    The clipping is done here: Flower's divides by the update's norm, so one client that
    sends the model back unchanged would end the run; and Flower's adaptive wrapper, in
    1.42, moves its norm away from its target and scales a round's noise to the next
    round's norm (docs/trust.md).
    """

    def __init__(self, strategy: Strategy, clipping: Clipping) -> None:
        super().__init__(strategy, clipping.noise_multiplier, clipping.norm, clipping.sample_size)
        self.clipping = clipping

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.clipping_norm = self.clipping.norm  # this round's, for the clipping and the noise
        # Paired by name: the model sent and each reply (the gate checked their names).
        sent = {key: array.numpy() for key, array in self.current_arrays.items()}
        model = {key: values.astype(np.float64) for key, values in sent.items()}
        clipped = 0
        for reply in replies:
            norm = update_norm(reply.content["arrays"], model)
            if norm > self.clipping_norm:
                clipped += 1
                reply.content["arrays"] = scaled_update(
                    reply.content["arrays"], model, self.clipping_norm / norm
                )
        mean, metrics = self.strategy.aggregate_train(server_round, replies)
        if mean is None:
            return None, metrics
        # The mean of the replies that came, as the sum over all n sampled.
        share = len(replies) / self.num_sampled_clients
        summed = {key: Array(sent[key] + share * (new.numpy() - sent[key])) for key, new in mean.items()}
        self.clipping.clipped(within=self.num_sampled_clients - clipped)
        return self._add_noise_to_aggregated_arrays(ArrayRecord(summed)), metrics


def build_strategy(config: AppConfig, num_supernodes: int, clipping: Clipping | None = None) -> Strategy:
    """The strategy `config` asks for, for a federation of `num_supernodes` that
    `check_federation` accepted; with DP, clipping at `clipping`'s norm (by default, as a
    new run's: privacy.py)."""
    num_sampled = config.train_sample_size(num_supernodes)
    common = {
        "learning_rate_at": config.learning_rate_at,
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
    }
    equal_weights = weighs_replies_equally(config)
    if equal_weights:
        common["weighted_by_key"] = EQUAL_WEIGHT_KEY
        common["train_metrics_aggr_fn"] = mean_but_rows
    norm_bound, weight_bound = influence_bounds(config)
    weights = "every reply weighs the same" if equal_weights else "replies weigh their rows"
    if weight_bound:
        weights += f", at most {weight_bound:g} x the round's median (update-weight-bound)"
    if norm_bound:
        weights += f"; each update's norm at most {norm_bound:g} x the round's median (update-norm-bound)"
    elif not config.dp_on:
        weights += "; update norms unbounded (update-norm-bound=0)"
    if config.dp_on:
        clipping = clipping or Clipping(config, num_sampled)
    norm = f"clipping norm {config.dp_clipping_norm:g}"
    if config.dp_clipping_quantile:
        norm = (f"clipping norm from {config.dp_clipping_norm:g} toward the updates' "
                f"{config.dp_clipping_quantile:g} quantile, so the updates' noise multiplier "
                f"{clipping.noise_multiplier:.3g}")  # fmt: skip
    privacy = (
        f"client-level DP on (noise multiplier {config.dp_noise_multiplier:g}, {norm}, "
        f"{num_sampled} clients a round, delta {config.dp_delta:g}; the "
        "epsilon each round reports is all this run has spent, and smaller is more private; Flower's "
        "wrapper logs the noise as 'central DP', for the server adds it)"
        if config.dp_on
        else "DP off"
    )
    log(INFO, "Aggregation '%s' (%s), %s", config.aggregation, weights, privacy)
    f = config.num_malicious
    if config.dp_on:
        return ClippedNoisyMean(FixedSampleFedAvg(sample_size=num_sampled, **common), clipping)
    if config.aggregation == "trimmed-mean":
        return CustomFedTrimmedAvg(**common, beta=config.trim_fraction)
    if config.aggregation == "median":
        return CustomFedMedian(**common)
    if config.aggregation == "krum":
        return CustomKrum(**common, num_malicious_nodes=f)
    if config.aggregation == "multi-krum":
        return CustomMultiKrum(keep=config.multi_krum_keep, **common, num_malicious_nodes=f)
    if config.aggregation == "bulyan":
        return CustomBulyan(**common, num_malicious_nodes=f)
    return CustomFedAvg(**common)


def mean_but_rows(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Flower's mean of the train metrics, less the row count: with every reply weighing
    the same, a mean of counts (900.25) counts nothing. (FedAvg's weighs by the count, and
    Flower leaves the key it weighs by out, so no rule records one.)"""
    metrics = aggregate_metricrecords(records, weighting_key)
    metrics.pop(ROWS_KEY, None)
    return metrics


def min_replies(config: AppConfig) -> int:
    """The replies that passed the gate a round needs for `aggregation` with f =
    `num-malicious`: a majority honest for the per-weight rules (`median`,
    `trimmed-mean`: 2f + 1), Krum's and Multi-Krum's 2f + 3, Bulyan's 4f + 3; FedAvg's, 1."""
    f = config.num_malicious
    return {
        "median": 2 * f + 1,
        "trimmed-mean": 2 * f + 1,
        "krum": 2 * f + 3,
        "multi-krum": 2 * f + 3,
        "bulyan": 4 * f + 3,
    }.get(config.aggregation, 1)


def min_trimmed(config: AppConfig) -> int:
    """The replies `trimmed-mean` must cut at each end: f = `num-malicious`, at least one."""
    return max(config.num_malicious, 1)


def too_few_replies(config: AppConfig, num_usable: int) -> str | None:
    """Why `num_usable` replies that passed the gate cannot serve this round's rule, or
    None. Checked every round: a rule sized for the sample can fail on the replies that
    came. (DP needs no floor: a missing reply adds a zero update, see `ClippedNoisyMean`.)"""
    needed = min_replies(config)
    if config.aggregation == "multi-krum" and config.multi_krum_keep:
        needed = max(needed, config.multi_krum_keep + config.num_malicious)
    if num_usable < needed:
        rule = f"'{config.aggregation}' with num-malicious={config.num_malicious}"
        return f"{rule} needs {needed} replies, {num_usable} were usable"
    trimmed = int(config.trim_fraction * num_usable)
    if config.aggregation == "trimmed-mean" and trimmed < min_trimmed(config):
        return (
            f"trim-fraction={config.trim_fraction:g} cuts {trimmed} of {num_usable} usable replies at each "
            f"end, fewer than {min_trimmed(config)} (num-malicious={config.num_malicious}, and at least one)"
        )
    return None


def check_sample(config: AppConfig, num_supernodes: int) -> None:
    """Refuse, in one line with a fix that passes this same check, an `aggregation` that
    can never work on the replies a round of a federation of `num_supernodes` samples."""
    problem = sample_problem(config, num_supernodes)
    if problem is None:
        return
    key, why = problem
    if key == "multi-krum-keep":
        raise ConfigError(f"{why}: lower it, or 0 for all of them")
    if key == "trim-fraction" and (trim := first_fix(config, num_supernodes, "trim_fraction", TRIMS)):
        raise ConfigError(f"{why}: raise it to {trim:g}")
    if fraction := first_fix(config, num_supernodes, "fraction_train", FRACTIONS):
        fix = f"fraction-train={fraction:g}"
    else:
        more = next(n for n in itertools.count(num_supernodes + 1) if sample_problem(config, n) is None)
        fix = f"at least {more} SuperNodes"
    if key == "aggregation" and config.num_malicious:
        raise ConfigError(f"{why}: lower num-malicious, or use {fix}")
    raise ConfigError(f"{why}: use {fix}")


# The values a fix may suggest: steps a user would type.
TRIMS = [step / 1000 for step in range(1, 500)]
FRACTIONS = [step / 100 for step in range(1, 101)]


def first_fix(config: AppConfig, num_supernodes: int, field: str, values: list[float]) -> float | None:
    """The first of `values` for `field` under which `check_sample` passes, or None."""
    for value in values:
        if sample_problem(dataclasses.replace(config, **{field: value}), num_supernodes) is None:
            return value
    return None


def sample_problem(config: AppConfig, num_supernodes: int) -> tuple[str, str] | None:
    """The key at fault and why, if no round of a federation of `num_supernodes` can
    serve the rule; None if a round that gets every reply it samples can."""
    num_sampled, f = config.train_sample_size(num_supernodes), config.num_malicious
    needed = min_replies(config)
    if num_sampled < needed:
        return "aggregation", (
            f"run-config key 'aggregation' = '{config.aggregation}' with num-malicious={f} needs at "
            f"least {needed} replies a round, but a round samples {num_sampled} of {num_supernodes} "
            "SuperNodes"
        )
    trimmed, cut = int(config.trim_fraction * num_sampled), min_trimmed(config)
    if config.aggregation == "trimmed-mean" and trimmed < cut:
        return "trim-fraction", (
            f"run-config key 'trim-fraction' = {config.trim_fraction:g} cuts {trimmed} of the {num_sampled} "
            f"replies a round gets at each end, fewer than {cut} (num-malicious={f}, and at least one)"
        )
    if config.aggregation == "multi-krum" and config.multi_krum_keep > num_sampled - f:
        return "multi-krum-keep", (
            f"run-config key 'multi-krum-keep' = {config.multi_krum_keep} exceeds the {num_sampled - f} "
            f"replies Multi-Krum may keep ({num_sampled} sampled minus num-malicious={f})"
        )
    return None


def check_federation(config: AppConfig, num_supernodes: int) -> None:
    """Refuse, in one line, settings that cannot work on a federation of this size (DP's
    budget is checked with its account, privacy.py)."""
    if num_supernodes > 0:
        check_sample(config, num_supernodes)
    if config.dp_on and num_supernodes < 2:
        raise ConfigError(
            "run-config key 'dp-noise-multiplier' > 0 scales its noise to the clients a round "
            f"samples, fixed when the run starts, but {num_supernodes} SuperNode(s) are connected: "
            "start 2 or more"
        )
