"""The gate every client reply passes before the server uses it: its shape, then its size.

A SuperNode runs whatever code its operator gives it, on data the server knows nothing
of. So a reply is used only when it is exactly what this app's ClientApp sends (its
records, keys, types and ranges); anything else is left out with a warning naming the
node, and never raises. A reply that passes is then bounded by the round itself, so
that no one reply can move the global model far, however large the numbers it sends:
a train reply's update (reply minus the model sent) is cut to `update-norm-bound` x the
round's median update norm, and the row count that weighs a reply (a train reply's
under FedAvg, an evaluate reply's scores under every rule) to `update-weight-bound` x
the round's median.
"""

import math
import reprlib
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common.logger import log

from pytorch_example.config import FEDAVG, PRIVATE_HEAD, AppConfig, is_count, is_number
from pytorch_example.names import EVALUATE_METRIC_KEYS, ROWS_KEY, TRAIN_METRIC_KEYS
from pytorch_example.task import HEAD_KEYS

# The largest loss a reply may report: no cross-entropy this model reaches, and small
# enough that means over any number of replies stay finite (results.json is JSON).
MAX_LOSS = 1e30
# The most rows a reply may claim: no client holds a billion images, and sums of such
# counts stay exact. What a count may weigh is bounded by its round instead (`bound`):
# the server knows nothing of a member's data.
MAX_ROWS = 10**9
# What a SuperNode sent, as a warning shows it: escaped (a terminal's control codes print
# as `\x1b`) and short (8 names of 80 characters at most), whatever it sent.
SENT = reprlib.Repr()
SENT.maxstring = SENT.maxother = 80
SENT.maxlist = 8
# What the server weighs a reply by when the client's own word on its rows must not
# count: under the robust rules and DP, every reply weighs 1 (the gate stamps it).
EQUAL_WEIGHT_KEY = "equal-weight"


def weighs_replies_equally(config: AppConfig) -> bool:
    """Whether replies weigh 1 each instead of their rows: under a robust rule (a rule
    the client's own row count must not sway) and under DP (whose noise is scaled to a
    mean in which every client counts the same)."""
    return config.dp_on or config.aggregation != FEDAVG


def influence_bounds(config: AppConfig) -> tuple[float, float]:
    """The multiples of the round's median update norm and median row count that the
    gate cuts each train reply's update and weight to (0: not cut). No norm bound under
    DP, which clips to its own norm (fixed, or adapted from a noisy count): a bound taken
    from the other clients' updates would let one client's data change another's share,
    past DP's sensitivity. No weight bound where every reply weighs the same."""
    norm_bound = 0.0 if config.dp_on else config.update_norm_bound
    weight_bound = 0.0 if weighs_replies_equally(config) else config.update_weight_bound
    return norm_bound, weight_bound


@dataclass(frozen=True)
class Bounded:
    """What bounding did to a round's train replies: updates whose norm was cut
    (`clipped`), replies whose weight was cut (`capped`)."""

    clipped: int = 0
    capped: int = 0


@dataclass(frozen=True)
class ReplyGate:
    """What a reply must be to be used, and how far it may move the model, for this
    run's settings.

    `arrays`: the entries a train reply carries, in the global model's order, with
    their shapes and dtypes. `equal_weights`: stamp every used train reply to weigh 1
    (`EQUAL_WEIGHT_KEY`), as the robust rules and DP need. `norm_bound`, `weight_bound`:
    the multiples of the round's median update norm and row count that a train reply's
    update and weight are cut to (0: not cut); `evaluate_weight_bound`: the same for the
    row counts that weigh evaluate replies' scores (under every rule).
    """

    arrays: dict[str, tuple[tuple[int, ...], str]]
    equal_weights: bool = False
    norm_bound: float = 0.0
    weight_bound: float = 0.0
    evaluate_weight_bound: float = 0.0

    @classmethod
    def for_run(cls, config: AppConfig, model: ArrayRecord) -> "ReplyGate":
        """The gate for a run of `config` whose global model is shaped as `model`."""
        sent = {
            key: (tuple(array.shape), array.dtype)
            for key, array in model.items()
            if not (config.personalisation == PRIVATE_HEAD and key in HEAD_KEYS)
        }
        norm_bound, weight_bound = influence_bounds(config)
        equal_weights = weighs_replies_equally(config)
        return cls(sent, equal_weights, norm_bound, weight_bound, config.update_weight_bound)

    def screen(self, phase: str, replies: list[Message], server_round: int) -> list[Message]:
        """The replies of `phase` ("train" or "evaluate") fit to use; the rest are
        logged (errors are Flower's failures, counted apart)."""
        usable = []
        for reply in replies:
            if reply.has_error():
                continue
            try:
                problem = self.train_problem(reply) if phase == "train" else self.evaluate_problem(reply)
            except Exception as err:  # noqa: BLE001 (whatever a reply holds, it must not end the run)
                problem = f"it cannot be read ({type(err).__name__})"
            if problem is None:
                usable.append(reply)
            else:
                log(WARNING, "Round %s: left out the %s reply of node %s: %s",
                    server_round, phase, reply.metadata.src_node_id, problem)  # fmt: skip
        if phase == "train" and self.equal_weights:
            for reply in usable:
                reply.content["metrics"][EQUAL_WEIGHT_KEY] = 1
        return usable

    def train_problem(self, reply: Message) -> str | None:
        """Why a train reply must not be used, or None."""
        if (problem := records_problem(reply, {"arrays": ArrayRecord, "metrics": MetricRecord})) is not None:
            return problem
        arrays = reply.content["arrays"]
        if list(arrays.keys()) != list(self.arrays):
            sent = SENT.repr(list(arrays.keys()))
            return f"its arrays {sent} are not the expected {list(self.arrays)}, in order"
        decoded = {}
        for key, array in arrays.items():
            shape, dtype = self.arrays[key]
            # An Array says its shape and dtype beside its bytes: check what the bytes hold.
            values = array.numpy() if array.stype == "numpy.ndarray" else None
            if values is None or values.shape != shape or values.dtype != np.dtype(dtype):
                held = "other bytes" if values is None else f"{values.dtype} {values.shape}"
                return f"'{key}' holds {held}, not the model's {dtype} {shape}"
            if not np.isfinite(values).all():
                return f"'{key}' holds NaN or Inf"
            decoded[key] = values
        if problem := metrics_problem(reply.content["metrics"], TRAIN_METRIC_KEYS):
            return problem
        # From here on the reply holds what was checked, whatever its Arrays declared.
        reply.content["arrays"] = ArrayRecord({key: Array(values) for key, values in decoded.items()})
        return None

    def evaluate_problem(self, reply: Message) -> str | None:
        """Why an evaluate reply must not be used, or None."""
        if (problem := records_problem(reply, {"metrics": MetricRecord})) is not None:
            return problem
        return metrics_problem(reply.content["metrics"], EVALUATE_METRIC_KEYS)

    def bound(self, replies: list[Message], sent: ArrayRecord, server_round: int) -> Bounded:
        """Cut, in place, the train replies that `screen` let through to the round's
        bounds: an update longer than `norm_bound` x the median update norm is scaled
        down to that length (its direction kept), and a row count above `weight_bound` x
        the median row count is lowered to it. The rest pass bit for bit.

        The medians are the lower ones (of 2 replies, the smaller), so attackers short of
        half the replies cannot raise the bounds. One reply then moves a weighted mean by
        at most its weight share times (`norm_bound` median norms plus the honest mean's
        step): with the others near the median row count, a share of at most
        `weight_bound` / (n - 1 + `weight_bound`). Half the replies or more can lower the
        norm bound, and so slow the round down; if they moved nothing at all (a bound of
        0), no update is cut this round rather than every one.
        """
        if not replies or not (self.norm_bound or self.weight_bound):
            return Bounded()
        cut: dict[int, list[str]] = {}  # reply index -> what was cut
        clipped = 0
        if self.norm_bound:
            model = {key: sent[key].numpy().astype(np.float64) for key in self.arrays}
            norms = [update_norm(reply.content["arrays"], model) for reply in replies]
            norm_limit = self.norm_bound * lower_median(norms)
            if norm_limit == 0:
                log(WARNING, "Round %s: half the train replies or more moved nothing, so no update norm is "
                    "cut this round", server_round)  # fmt: skip
            for index, (reply, norm) in enumerate(zip(replies, norms, strict=True)):
                if norm > norm_limit > 0:
                    reply.content["arrays"] = scaled_update(reply.content["arrays"], model, norm_limit / norm)
                    clipped += 1
                    cut.setdefault(index, []).append(f"update norm {norm:.3g} cut to {norm_limit:.3g}")
        capped = cap_rows(replies, self.weight_bound)
        for index, (count, row_cap) in capped.items():
            cut.setdefault(index, []).append(f"weighs {row_cap} of its {count} rows")
        if cut:
            notes = [
                f"node {replies[index].metadata.src_node_id}: {', '.join(what)}"
                for index, what in cut.items()
            ]
            log(INFO, "Round %s: bounded %d of %d train replies (update-norm-bound, update-weight-bound): %s",
                server_round, len(cut), len(replies), "; ".join(notes[:6]))  # fmt: skip
        return Bounded(clipped, len(capped))

    def bound_evaluate(self, replies: list[Message], server_round: int) -> int:
        """Cut, in place, the row counts that weigh the evaluate replies' scores to
        `evaluate_weight_bound` x the round's median; how many were cut."""
        capped = cap_rows(replies, self.evaluate_weight_bound)
        if capped:
            notes = [f"node {replies[index].metadata.src_node_id} weighs {cap} of its {count} validation rows"
                     for index, (count, cap) in capped.items()]  # fmt: skip
            log(INFO, "Round %s: bounded %d of %d evaluate replies (update-weight-bound): %s",
                server_round, len(capped), len(replies), "; ".join(notes[:6]))  # fmt: skip
        return len(capped)


def cap_rows(replies: list[Message], factor: float) -> dict[int, tuple[int, int]]:
    """Lower, in place, every row count above `factor` x the replies' lower median to that
    (none with a factor of 0); by reply index, the count each had and the cap."""
    if not replies or not factor:
        return {}
    rows = [reply.content["metrics"][ROWS_KEY] for reply in replies]
    row_cap = max(1, math.floor(factor * lower_median(rows)))
    capped = {}
    for index, (reply, count) in enumerate(zip(replies, rows, strict=True)):
        if count > row_cap:
            reply.content["metrics"][ROWS_KEY] = row_cap
            capped[index] = (count, row_cap)
    return capped


def update_norm(arrays: ArrayRecord, model: dict[str, np.ndarray]) -> float:
    """The L2 norm of `arrays` minus `model`, in float64 (a float32 square overflows)."""
    total = 0.0
    for key, base in model.items():
        total += float(np.square(arrays[key].numpy().astype(np.float64) - base).sum())
    return math.sqrt(total)


def scaled_update(arrays: ArrayRecord, model: dict[str, np.ndarray], scale: float) -> ArrayRecord:
    """`model` plus `scale` x (`arrays` - `model`), in each entry's own dtype."""
    scaled = {}
    for key, base in model.items():
        values = arrays[key].numpy()
        scaled[key] = Array((base + scale * (values.astype(np.float64) - base)).astype(values.dtype))
    return ArrayRecord(scaled)


def lower_median(values: list[float]) -> float:
    """The middle value, the lower of the two middle ones for an even count."""
    return sorted(values)[(len(values) - 1) // 2]


def records_problem(reply: Message, expected: dict[str, type]) -> str | None:
    """Why a reply's records are not exactly `expected` (names and kinds), or None."""
    if not reply.has_content() or sorted(reply.content.keys()) != sorted(expected):
        names = sorted(reply.content.keys()) if reply.has_content() else []
        return f"it holds the records {SENT.repr(names)}, not {sorted(expected)}"
    for name, kind in expected.items():
        if not isinstance(reply.content[name], kind):
            return f"its '{name}' record is not a {kind.__name__}"
    return None


def metrics_problem(metrics: MetricRecord, keys: tuple[str, ...]) -> str | None:
    """Why a reply's metrics are not exactly `keys`, each a number in its range, or None:
    scores (`*_acc*`) in [0, 1], losses from 0 to `MAX_LOSS`, the row count an integer
    in 1..`MAX_ROWS`."""
    if sorted(metrics.keys()) != sorted(keys):
        return f"its metrics {SENT.repr(sorted(metrics.keys()))} are not {sorted(keys)}"
    for key in keys:
        value = metrics[key]
        if key == ROWS_KEY:
            if not is_count(value) or not 1 <= value <= MAX_ROWS:
                return f"{key} = {SENT.repr(value)} is not an integer from 1 to {MAX_ROWS:,}"
        elif not is_number(value) or not math.isfinite(value):
            return f"{key} = {SENT.repr(value)} is not a finite number"
        elif "_acc" in key and not 0 <= value <= 1:
            return f"{key} = {SENT.repr(value)} is not a score in [0, 1]"
        elif not 0 <= value <= MAX_LOSS:
            return f"{key} = {SENT.repr(value)} is not a loss (0 to {MAX_LOSS:g})"
    return None
