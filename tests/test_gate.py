"""Property-based: whatever a modified ClientApp sends, the run goes on.

Generated replies, mixed with honest ones, go through the real server path: the gate,
the strategy's aggregation (every rule, and DP), evaluate aggregation and results.json.
No exception escapes, the global model stays finite, every bad reply is counted as
dropped, every honest one is used, and recorded scores stay in [0, 1].
"""

import json
import logging
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pytorch_example.config import AGGREGATIONS, PRIVATE_HEAD
from pytorch_example.gate import EQUAL_WEIGHT_KEY, MAX_ROWS, Bounded, ReplyGate
from pytorch_example.names import EVALUATE_METRIC_KEYS, ROWS_KEY, TRAIN_METRIC_KEYS
from pytorch_example.rounds import RunFailed
from pytorch_example.task import HEAD_KEYS, Net
from pytorch_example.trust import build_strategy, too_few_replies
from tests.scripted import MAX_TRAIN_ROWS, MAX_VAL_ROWS, ScriptedGrid, config_for, is_train, run_rounds

NUM_NODES = 7  # enough for Bulyan with num-malicious=1 (4f + 3)
MODEL_SHAPES = {key: tuple(value.shape) for key, value in Net().state_dict().items()}
FUZZ = settings(
    max_examples=25,
    derandomize=True,  # the same replies in every run: a failure here repeats
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

names = st.text(min_size=1, max_size=12)
# Wrong for every metric: not finite, negative, or not a number.
bad_numbers = st.one_of(
    st.sampled_from([float("nan"), float("inf"), float("-inf"), -1.0, -(10**18), -1e300]),
    st.lists(st.floats(allow_nan=False), min_size=0, max_size=3),
    st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=3),
)


def honest_metrics(phase: str, draw) -> dict:
    """Values this app's ClientApp could send: random, but in range."""
    if phase == "train":
        return {"train_loss": draw(st.floats(0, 50)), ROWS_KEY: draw(st.integers(1, MAX_TRAIN_ROWS))}
    scores = {key: draw(st.floats(0, 1)) for key in EVALUATE_METRIC_KEYS if "_acc" in key}
    losses = {key: draw(st.floats(0, 50)) for key in EVALUATE_METRIC_KEYS if "_loss" in key}
    return {**scores, **losses, ROWS_KEY: draw(st.integers(1, MAX_VAL_ROWS))}


def bad_value_for(key: str, draw):
    """A value `key` must never hold."""
    if key == ROWS_KEY:
        too_many = st.integers(min_value=MAX_ROWS + 1)
        return draw(
            st.one_of(st.integers(max_value=0), too_many, bad_numbers, st.just(float(MAX_TRAIN_ROWS)))
        )
    if "_acc" in key:
        return draw(st.one_of(bad_numbers, st.floats(1.0001, 1e300), st.integers(2, 10**18)))
    return draw(bad_numbers)


@st.composite
def mutation(draw, phase: str):
    """A function that turns an honest reply's content into a bad one, always."""
    keys = TRAIN_METRIC_KEYS if phase == "train" else EVALUATE_METRIC_KEYS
    kinds = ["extra-record", "missing-record", "extra-metric", "missing-metric", "bad-value"]
    if phase == "train":
        kinds += ["array-shape", "array-dtype", "array-extra", "array-missing", "array-nan", "array-order"]
        kinds += ["array-bytes"]  # the model's dtype and shape declared, other bytes held
    kind = draw(st.sampled_from(kinds))
    if kind == "extra-record":
        name = draw(names.filter(lambda name: name not in ("arrays", "metrics")))
        record = draw(st.sampled_from([MetricRecord({"x": 1.0}), ConfigRecord({"x": "y"}), ArrayRecord()]))
        return lambda content: content.__setitem__(name, record)
    if kind == "missing-record":
        name = draw(st.sampled_from(["metrics", "arrays"] if phase == "train" else ["metrics"]))
        return lambda content: content.pop(name)
    if kind == "extra-metric":
        name = draw(names.filter(lambda name: name not in keys))
        value = draw(st.one_of(st.floats(0, 1), bad_numbers))
        return lambda content: content["metrics"].__setitem__(name, value)
    if kind == "missing-metric":
        name = draw(st.sampled_from(keys))
        return lambda content: content["metrics"].pop(name)
    if kind == "bad-value":
        name = draw(st.sampled_from(keys))
        value = bad_value_for(name, draw)
        return lambda content: content["metrics"].__setitem__(name, value)
    key = draw(st.sampled_from(list(MODEL_SHAPES)))
    shape = MODEL_SHAPES[key]

    def with_array(change):
        def apply(content):
            arrays = dict(content["arrays"].items())
            change(arrays)
            content["arrays"] = ArrayRecord(arrays)

        return apply

    if kind == "array-shape":
        other = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3).filter(lambda s: tuple(s) != shape))
        return with_array(lambda arrays: arrays.__setitem__(key, Array(np.zeros(other, np.float32))))
    if kind == "array-dtype":
        dtype = draw(st.sampled_from([np.float64, np.float16, np.int32, np.uint8, np.bool_]))
        return with_array(lambda arrays: arrays.__setitem__(key, Array(np.zeros(shape, dtype))))
    if kind == "array-extra":
        name = draw(names.filter(lambda name: name not in MODEL_SHAPES))
        return with_array(lambda arrays: arrays.__setitem__(name, Array(np.zeros(3, np.float32))))
    if kind == "array-bytes":
        held = draw(
            st.sampled_from([np.zeros(3, np.float32), np.zeros(shape, np.float64), np.asarray(np.float32(1))])
        )

        def lie(arrays):
            real = Array(held)
            arrays[key] = Array(dtype="float32", shape=shape, stype=real.stype, data=real.data)

        return with_array(lie)
    if kind == "array-missing":
        return with_array(lambda arrays: arrays.pop(key))
    if kind == "array-nan":
        value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        return with_array(lambda arrays: arrays.__setitem__(key, Array(np.full(shape, value, np.float32))))

    def reverse(arrays):
        entries = list(arrays.items())
        arrays.clear()
        arrays.update(reversed(entries))

    return with_array(reverse)


@st.composite
def round_of_replies(draw):
    """For each node: honest values for both phases, and which phases it spoils (how)."""
    plan = {}
    for node in range(1, NUM_NODES + 1):
        bad = {phase: draw(st.one_of(st.none(), mutation(phase))) for phase in ("train", "evaluate")}
        plan[node] = {
            "train": honest_metrics("train", draw),
            "evaluate": honest_metrics("evaluate", draw),
            "shift": draw(st.floats(-0.05, 0.05)),
            **{f"bad-{phase}": mutate for phase, mutate in bad.items()},
        }
    return plan


def answer_from(plan):
    def answer(server_round, message):
        node = plan[message.metadata.dst_node_id]
        phase = "train" if is_train(message) else "evaluate"
        content = RecordDict({"metrics": MetricRecord(dict(node[phase]))})
        if phase == "train":
            received = message.content["arrays"].to_torch_state_dict()
            content["arrays"] = ArrayRecord({key: value + node["shift"] for key, value in received.items()})
        if node[f"bad-{phase}"] is not None:
            try:
                node[f"bad-{phase}"](content)
            except (TypeError, ValueError):
                assume(False)  # Flower's records refuse it: no ClientApp could send it
        return content

    return answer


@pytest.mark.parametrize("rule", [*AGGREGATIONS, "dp"])
@FUZZ
@given(plan=round_of_replies())
def test_no_reply_breaks_a_round_and_every_bad_one_is_counted(tmp_path_factory, rule, plan):
    one_round = {
        "num_server_rounds": 1,
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "max_failed_rounds": 5,
    }
    if rule == "dp":
        config = config_for(dp_noise_multiplier=0.01, dp_clipping_norm=1.0, **one_round)
    else:
        config = config_for(aggregation=rule, trim_fraction=0.2, **one_round)
    run_dir = tmp_path_factory.mktemp("fuzz")
    honest_train = sum(1 for node in plan.values() if node["bad-train"] is None)
    trainable = honest_train > 0 and too_few_replies(config, honest_train) is None
    try:
        run_rounds(run_dir, config, ScriptedGrid(NUM_NODES, answer_from(plan)))
    except RunFailed as failed:
        # A one-round run fails when its round trained nothing: only for want of usable replies.
        assert not trainable, failed

    [entry] = json.loads((run_dir / "results.json").read_text())
    for phase in ("train", "evaluate"):
        bad = sum(1 for node in plan.values() if node[f"bad-{phase}"] is not None)
        counts = dict(entry["replies"][phase])
        bounded = {key: counts.pop(key) for key in ("clipped", "capped") if key in counts}
        assert counts == {"expected": NUM_NODES, "received": NUM_NODES, "failed": 0, "dropped": bad}
        assert set(bounded) == ({"clipped", "capped"} if phase == "train" else {"capped"})
        assert all(count <= NUM_NODES - bad for count in bounded.values())  # of the replies used
    assert (entry["train_metrics_clientapp"] != {}) == trainable
    saved = torch.load(run_dir / "resume.pt", weights_only=True)["arrays"]
    assert all(torch.isfinite(value).all() for value in saved.values())
    for key, value in entry["evaluate_metrics_clientapp"].items():
        assert math.isfinite(value)
        if "_acc" in key or "share" in key:
            assert 0 <= value <= 1
        if "gain_points" in key:
            assert -100 <= value <= 100


STEPS = (0.010, 0.013, 0.017, 0.018, 0.020, 0.026, 0.031)  # node n's, n = 1..7


def with_rows(node_1_rows: int):
    """Nodes move the model each by its own step (no two alike, and no ties in Krum's
    scores); node 1 claims `node_1_rows` rows."""

    def answer(server_round, message):
        node = message.metadata.dst_node_id
        content = RecordDict({"metrics": MetricRecord(honest_metrics_fixed(is_train(message)))})
        if is_train(message):
            received = message.content["arrays"].to_torch_state_dict()
            step = STEPS[node - 1]
            content["arrays"] = ArrayRecord({key: value + step for key, value in received.items()})
            if node == 1:
                content["metrics"][ROWS_KEY] = node_1_rows
        return content

    return answer


def honest_metrics_fixed(train: bool) -> dict:
    if train:
        return {"train_loss": 1.0, ROWS_KEY: 10}
    return {"eval_loss": 1.0, "eval_acc": 0.5, "eval_loss_global": 1.0, "eval_acc_global": 0.5, ROWS_KEY: 10}


@pytest.mark.parametrize("rule", [rule for rule in AGGREGATIONS if rule != "fedavg"])
@settings(
    max_examples=5,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(rows=st.integers(1, MAX_TRAIN_ROWS))
def test_under_a_robust_rule_no_row_count_moves_the_aggregate(tmp_path_factory, rule, rows):
    config = config_for(aggregation=rule, num_server_rounds=1, fraction_train=1.0)
    start, models = ArrayRecord(Net().state_dict()), []
    for claimed in (10, rows):  # 10: what the others claim
        grid = ScriptedGrid(NUM_NODES, with_rows(claimed))
        result = run_rounds(tmp_path_factory.mktemp("rows"), config, grid, initial=start)
        models.append(result.arrays.to_torch_state_dict())
    for key in models[0]:  # equal but for the order of the sums (Flower samples nodes in random order)
        torch.testing.assert_close(models[0][key], models[1][key], rtol=0, atol=1e-6)


# The size bound: every train update cut to update-norm-bound x the round's median norm,
# every FedAvg weight to update-weight-bound x the round's median rows.


def sent_and_replies(updates: list[dict[str, torch.Tensor]], rows: list[int]):
    """The model sent, and node n's train reply moving it by `updates[n - 1]` on
    `rows[n - 1]` rows, as the gate receives them."""
    torch.manual_seed(0)
    sent = ArrayRecord(Net().state_dict())
    model = sent.to_torch_state_dict()
    replies = []
    for node, (update, count) in enumerate(zip(updates, rows, strict=True), start=1):
        message = Message(RecordDict({"arrays": sent, "config": ConfigRecord()}), dst_node_id=node,
                          message_type="train")  # fmt: skip
        message.metadata.__dict__["_message_id"] = f"message-{node}"
        arrays = ArrayRecord({key: model[key] + update[key] for key in model})
        metrics = MetricRecord({"train_loss": 1.0, ROWS_KEY: count})
        replies.append(Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=message))
    return sent, replies


def random_update(norm: float, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    update = {key: torch.randn(value.shape, generator=generator) for key, value in Net().state_dict().items()}
    length = torch.sqrt(sum(value.double().square().sum() for value in update.values()))
    return {key: value * float(norm / length) for key, value in update.items()}


def flat_update(arrays: ArrayRecord, sent: ArrayRecord) -> torch.Tensor:
    after, before = arrays.to_torch_state_dict(), sent.to_torch_state_dict()
    return torch.cat([(after[key].double() - before[key].double()).flatten() for key in before])


def aggregate(config, sent, replies) -> torch.Tensor:
    """The gate, then the rule: the global model's update."""
    gate = ReplyGate.for_run(config, sent)
    usable = gate.screen("train", replies, 1)
    gate.bound(usable, sent, 1)
    strategy = build_strategy(config, len(replies))
    strategy.configure_train(1, sent, ConfigRecord(), ScriptedGrid(len(replies), None))
    arrays, _ = strategy.aggregate_train(1, usable)
    return flat_update(arrays, sent)


HONEST_NORMS = (1.0, 1.2, 0.8, 1.5, 0.9)  # the lower median is 1.0
HONEST_ROWS = (100, 120, 90, 200, 110)  # the lower median is 110


def test_honest_replies_under_the_bound_pass_bit_for_bit():
    sent, replies = sent_and_replies(
        [random_update(norm, seed) for seed, norm in enumerate(HONEST_NORMS)], list(HONEST_ROWS)
    )
    before = [(dict(reply.content["arrays"]), dict(reply.content["metrics"])) for reply in replies]
    gate = ReplyGate.for_run(config_for(), sent)
    usable = gate.screen("train", replies, 1)
    assert gate.bound(usable, sent, 1) == Bounded(clipped=0, capped=0)
    for reply, (arrays, metrics) in zip(usable, before, strict=True):
        assert dict(reply.content["metrics"]) == metrics
        for key, array in reply.content["arrays"].items():
            assert array.numpy().tobytes() == arrays[key].numpy().tobytes()


def the_attack(attack: str, sent: ArrayRecord) -> dict[str, torch.Tensor]:
    """Node 6's update: its trained model x 1e30 (finite), or a replacement that a mean
    over 6 replies of equal rows would turn into a zero model."""
    model = sent.to_torch_state_dict()
    trained = {key: model[key] + update for key, update in random_update(1.0, 9).items()}
    if attack == "huge":
        return {key: 1e30 * trained[key] - model[key] for key in model}
    return {key: -6 * model[key] for key in model}  # x = g + 6 (0 - g)


@pytest.mark.parametrize("attack", ["huge", "replacement"])
def test_one_reply_moves_fedavg_no_further_than_the_bound_allows(attack):
    """5 honest replies and one attacker claiming the most rows: the attacker's share of
    the weighted mean moves it by at most (its capped rows / all rows) x 2 x the median
    update norm. Without the bound (the control) it moves it 10 or more times further."""
    sent, _ = sent_and_replies([], [])
    updates = [random_update(norm, seed) for seed, norm in enumerate(HONEST_NORMS)]
    updates.append(the_attack(attack, sent))
    rows = [*HONEST_ROWS, MAX_TRAIN_ROWS]
    honest_sum = sum(count * torch.cat([u.double().flatten() for u in update.values()])
                     for update, count in zip(updates[:5], HONEST_ROWS, strict=True))  # fmt: skip
    capped_rows = 3 * 110
    sent, replies = sent_and_replies(updates, rows)
    gate = ReplyGate.for_run(config_for(), sent)
    gate.bound(gate.screen("train", replies, 1), sent, 1)
    # Cut to 2 x the median norm, 1.0, in float64: a float32 square of 1e30 is Inf.
    assert float(flat_update(replies[-1].content["arrays"], sent).norm()) == pytest.approx(2.0, rel=1e-5)
    assert replies[-1].content["metrics"][ROWS_KEY] == capped_rows
    bounded = aggregate(config_for(), *sent_and_replies(updates, rows))
    total = sum(HONEST_ROWS) + capped_rows
    allowed = capped_rows / total * 2 * 1.0
    assert (bounded - honest_sum / total).norm() <= allowed * (1 + 1e-5)

    unbounded = aggregate(
        config_for(update_norm_bound=0.0, update_weight_bound=0.0), *sent_and_replies(updates, rows)
    )
    total = sum(HONEST_ROWS) + MAX_TRAIN_ROWS
    assert (unbounded - honest_sum / total).norm() > 10 * allowed


def test_a_row_count_above_the_bound_weighs_the_bound():
    sent, replies = sent_and_replies(
        [random_update(1.0, seed) for seed in range(5)], [100, 120, 90, 200, 1000]
    )
    gate = ReplyGate.for_run(config_for(), sent)
    assert gate.bound(gate.screen("train", replies, 1), sent, 1) == Bounded(clipped=0, capped=1)
    assert [reply.content["metrics"][ROWS_KEY] for reply in replies] == [100, 120, 90, 200, 360]


def test_of_two_replies_the_smaller_update_sets_the_bound():
    """The lower median: of 2, the smaller norm, so one attacker of 2 cannot raise it."""
    sent, replies = sent_and_replies([random_update(1.0, 0), random_update(50.0, 1)], [100, 100])
    gate = ReplyGate.for_run(config_for(), sent)
    assert gate.bound(gate.screen("train", replies, 1), sent, 1) == Bounded(clipped=1, capped=0)
    norms = [float(flat_update(reply.content["arrays"], sent).norm()) for reply in replies]
    assert norms == pytest.approx([1.0, 2.0], rel=1e-5)


def test_under_dp_the_gate_leaves_the_clipping_to_dp():
    """DP clips to its own fixed norm: a bound from other clients' updates would let one
    client's data change another's share. Every reply weighs 1 there too."""
    config = config_for(dp_noise_multiplier=1.0, dp_clipping_norm=0.5)
    sent, replies = sent_and_replies([random_update(norm, 0) for norm in (1.0, 1.0, 50.0)], [100, 100, 900])
    before = [reply.content["arrays"]["fc1.weight"].numpy().tobytes() for reply in replies]
    gate = ReplyGate.for_run(config, sent)
    assert gate.bound(gate.screen("train", replies, 1), sent, 1) == Bounded()
    assert [reply.content["arrays"]["fc1.weight"].numpy().tobytes() for reply in replies] == before
    assert [reply.content["metrics"][ROWS_KEY] for reply in replies] == [100, 100, 900]


def test_under_a_robust_rule_the_norm_is_bounded_and_every_reply_weighs_one():
    sent, replies = sent_and_replies([random_update(norm, 0) for norm in (1.0, 1.0, 50.0)], [100, 100, 900])
    gate = ReplyGate.for_run(config_for(aggregation="median"), sent)
    assert gate.bound(gate.screen("train", replies, 1), sent, 1) == Bounded(clipped=1, capped=0)
    assert [reply.content["metrics"][EQUAL_WEIGHT_KEY] for reply in replies] == [1, 1, 1]


def test_with_private_head_the_bound_measures_the_body_that_was_sent():
    config = config_for(personalisation=PRIVATE_HEAD)
    sent, replies = sent_and_replies(
        [random_update(norm, seed) for seed, norm in enumerate((1.0, 1.0, 50.0))], [100] * 3
    )
    for reply in replies:  # a private-head client sends its body only
        reply.content["arrays"] = ArrayRecord(
            {key: array for key, array in reply.content["arrays"].items() if key not in HEAD_KEYS}
        )
    gate = ReplyGate.for_run(config, sent)
    usable = gate.screen("train", replies, 1)
    assert len(usable) == 3 and gate.bound(usable, sent, 1) == Bounded(clipped=1, capped=0)
    body = ArrayRecord({key: array for key, array in sent.items() if key not in HEAD_KEYS})
    norms = [float(flat_update(reply.content["arrays"], body).norm()) for reply in usable]
    # The head's share of each update is left out: the body's norms, then the cut to 2 x their median.
    assert norms[2] == pytest.approx(2 * sorted(norms)[1], rel=1e-5)


def test_when_half_the_replies_move_nothing_no_update_is_cut(caplog):
    """A bound of 0 would cut every update to nothing: the round goes on uncut instead."""
    zero = {key: torch.zeros_like(value) for key, value in Net().state_dict().items()}
    sent, replies = sent_and_replies([zero, zero, random_update(1.0, 0), random_update(5.0, 1)], [100] * 4)
    gate = ReplyGate.for_run(config_for(), sent)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert gate.bound(gate.screen("train", replies, 1), sent, 1) == Bounded()
    assert "half the train replies or more moved nothing, so no update norm is cut" in caplog.text
    assert float(flat_update(replies[3].content["arrays"], sent).norm()) == pytest.approx(5.0, rel=1e-5)


def test_what_a_supernode_names_reaches_the_log_escaped_and_short(caplog):
    """A metric key of a million characters with a terminal's colour code, and a row
    count of a million numbers: the warning escapes the code and stays one short line."""
    sent, [reply] = sent_and_replies([random_update(1.0, 0)], [10])
    key = "\x1b[31m" + "k" * 1_000_000
    reply.content["metrics"] = MetricRecord({"train_loss": 1.0, key: 1.0})
    _, [long_rows] = sent_and_replies([random_update(1.0, 1)], [10])
    long_rows.content["metrics"][ROWS_KEY] = [1] * 1_000_000
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert ReplyGate.for_run(config_for(), sent).screen("train", [reply, long_rows], 1) == []
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2 and all(len(line) < 500 and "\x1b" not in line for line in lines)
    assert "\\x1b[31mkkk" in lines[0]
