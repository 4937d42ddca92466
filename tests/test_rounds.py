"""The round loop: every round recorded with its learning rate, the rule that fails a
run whose clients stopped training, the progress line, and the gate every reply
passes (what it leaves out, and how it counts)."""

import json
import logging
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from pytorch_example.gate import ReplyGate
from pytorch_example.outputs import RunOutputs
from pytorch_example.rounds import RoundLoop, RunFailed, clock, last_line
from pytorch_example.task import HEAD_KEYS, Net
from pytorch_example.trust import build_strategy
from tests.scripted import (
    ScriptedGrid,
    config_for,
    every_node_moves_the_model,
    honest,
    is_train,
    mean_shift,
    run_rounds,
    shifted,
    trained,
)


def results_of(run_dir) -> list[dict]:
    return json.loads((run_dir / "results.json").read_text())


def failing_in(rounds: set[int]):
    def answer(server_round, message):
        if server_round in rounds and is_train(message):
            return ValueError(f"partition broken in round {server_round}")
        return trained(message)

    return answer


def test_every_round_is_recorded_with_its_learning_rate(tmp_path):
    grid = ScriptedGrid(4, honest)
    run_rounds(tmp_path, config_for(fraction_train=0.5), grid)
    results = results_of(tmp_path)
    assert [entry["round"] for entry in results] == [1, 2, 3]
    assert [entry["learning_rate"] for entry in results] == [0.02, 0.01, 0.01]
    train_configs = [config for kind, config in grid.sent if kind.startswith("train")]
    assert [config["lr"] for config in train_configs] == [0.02, 0.02, 0.01, 0.01, 0.01, 0.01]
    # Evaluate messages too: clients refit their heads at the round's rate.
    evaluate_configs = [config for kind, config in grid.sent if kind.startswith("evaluate")]
    rates = {(config["server-round"], config["lr"]) for config in evaluate_configs}
    assert rates == {(1, 0.02), (2, 0.01), (3, 0.01)}
    assert (tmp_path / "final_model.pt").exists()


def test_a_run_whose_clients_never_train_fails_naming_their_error(tmp_path):
    with pytest.raises(
        RunFailed, match=r"3 round\(s\) in a row .* ValueError\('partition broken in round 1'\)"
    ):
        run_rounds(tmp_path, config_for(num_server_rounds=5), ScriptedGrid(4, failing_in({1, 2, 3, 4, 5})))
    assert not (tmp_path / "final_model.pt").exists()


def test_the_rule_counts_rounds_in_a_row_only(tmp_path):
    run_rounds(tmp_path, config_for(num_server_rounds=6), ScriptedGrid(4, failing_in({1, 2, 4, 5})))
    results = results_of(tmp_path)
    assert [entry["round"] for entry in results] == list(range(1, 7))
    assert results[0]["train_metrics_clientapp"] == {} and results[2]["train_metrics_clientapp"] != {}


def test_a_run_shorter_than_the_limit_fails_when_all_its_rounds_failed(tmp_path):
    with pytest.raises(RunFailed, match=r"1 round\(s\) in a row"):
        run_rounds(tmp_path, config_for(num_server_rounds=1), ScriptedGrid(4, failing_in({1})))
    (tmp_path / "two").mkdir()
    run_rounds(tmp_path / "two", config_for(num_server_rounds=2), ScriptedGrid(4, failing_in({1})))
    assert len(results_of(tmp_path / "two")) == 2


def test_a_round_whose_clients_all_fail_keeps_the_previous_model_bit_for_bit(tmp_path):
    torch.manual_seed(1)
    start = ArrayRecord(Net().state_dict())
    config = config_for(num_server_rounds=2, fraction_train=1.0)
    with pytest.raises(RunFailed):
        run_rounds(tmp_path, config, ScriptedGrid(4, failing_in({1, 2})), initial=start)
    # The model each round left, as saved for a resume.
    saved = torch.load(tmp_path / "resume.pt", weights_only=True)
    initial = start.to_torch_state_dict()
    assert saved["round"] == 2 and list(saved["arrays"]) == list(initial)
    assert all(torch.equal(saved["arrays"][key], initial[key]) for key in initial)


def test_evaluation_reports_the_spread_of_own_model_accuracy(tmp_path):
    run_rounds(tmp_path, config_for(num_server_rounds=1, fraction_evaluate=1.0), ScriptedGrid(4, honest))
    metrics = results_of(tmp_path)[0]["evaluate_metrics_clientapp"]
    # Four clients at 0.1..0.4: weighted by their 5..20 rows for the mean, once each for the spread.
    assert metrics["eval_acc"] == pytest.approx((0.1 * 5 + 0.2 * 10 + 0.3 * 15 + 0.4 * 20) / 50)
    assert metrics["eval_acc_min"] == pytest.approx(0.1) and metrics["eval_acc_max"] == pytest.approx(0.4)
    assert metrics["eval_acc_median"] == pytest.approx(0.25)
    assert metrics["eval_acc_std"] == pytest.approx(0.1118034, rel=1e-6)
    assert metrics["eval_acc_global"] == pytest.approx(0.1)
    # Own minus global, in points: 0, 10, 20, 30; client 1 gains nothing, so 3 of 4 gain.
    assert metrics["eval_gain_share"] == pytest.approx(0.75)
    assert metrics["eval_gain_points_mean"] == pytest.approx(15.0)
    assert metrics["eval_gain_points_min"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["eval_gain_points_max"] == pytest.approx(30.0)


def test_a_private_head_run_keeps_the_global_head_and_averages_the_body(tmp_path, caplog):
    def body_only_plus_one_but_node_4_sends_its_head(server_round, message):
        content = shifted(message, 1.0)
        if is_train(message) and message.metadata.dst_node_id != 4:
            body = content["arrays"].to_torch_state_dict()
            content["arrays"] = ArrayRecord({k: v for k, v in body.items() if k not in HEAD_KEYS})
        return content

    torch.manual_seed(0)
    start = Net().state_dict()
    config = config_for(num_server_rounds=1, fraction_train=1.0, personalisation="private-head")
    grid = ScriptedGrid(4, body_only_plus_one_but_node_4_sends_its_head)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = run_rounds(tmp_path, config, grid, initial=ArrayRecord(start))
    assert "left out the train reply of node 4: its arrays" in caplog.text
    final = result.arrays.to_torch_state_dict()
    assert list(final) == list(start)
    for key, value in start.items():
        torch.testing.assert_close(final[key], value if key in HEAD_KEYS else value + 1)


def test_one_progress_line_per_round_with_time_left(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="flwr"):
        run_rounds(tmp_path, config_for(), ScriptedGrid(4, honest))
    messages = [record.getMessage() for record in caplog.records]
    lines = [message for message in messages if re.match(r"Round \d+/\d+: ", message)]
    assert len(lines) == 3
    assert re.fullmatch(
        r"Round 2/3: [\d.]+s, \d+:\d\d elapsed, ETA \d+:\d\d \| central accuracy - \| "
        r"own-model accuracy 0\.\d{4}",
        lines[1],
    )


def test_clock_reads_like_a_stopwatch():
    assert [clock(s) for s in (0, 65, 3725)] == ["0:00", "1:05", "1:02:05"]


def poisoned(phase: str, node: int, poison):
    """Node `node` sends its `phase` reply changed by `poison(content)`; the rest are honest."""

    def answer(server_round, message):
        content = trained(message)
        if (phase == "train") == is_train(message) and message.metadata.dst_node_id == node:
            poison(content)
        return content

    return answer


def set_array(key, make):
    def poison(content):
        state = content["arrays"].to_torch_state_dict()
        state[key] = make(state[key])
        content["arrays"] = ArrayRecord(state)

    return poison


def set_metric(key, value):
    return lambda content: content["metrics"].__setitem__(key, value)


def without_metric(key):
    return lambda content: content["metrics"].pop(key)


def lying_array(key, bytes_of):
    """`key` declared as the model's dtype and shape, with the bytes of `bytes_of(values)`."""

    def poison(content):
        arrays = dict(content["arrays"].items())
        declared = arrays[key]
        held = Array(bytes_of(declared.numpy()))
        arrays[key] = Array(
            dtype=declared.dtype, shape=tuple(declared.shape), stype=held.stype, data=held.data
        )
        content["arrays"] = ArrayRecord(arrays)

    return poison


BAD_TRAIN_REPLIES = [
    (lying_array("fc1.weight", lambda values: values[:3]), "'fc1.weight' holds float32 (3, 512)"),
    (lying_array("fc2.bias", lambda values: values.astype(np.float64)), "'fc2.bias' holds float64 (10,)"),
    (lying_array("fc2.bias", lambda values: np.asarray(np.float32(0.5))), "'fc2.bias' holds float32 ()"),
    (set_array("fc1.weight", lambda a: a.index_fill(0, torch.tensor([0]), float("nan"))), "holds NaN or Inf"),
    (set_array("fc2.bias", lambda a: a[:5]), "'fc2.bias' holds float32 (5,), not the model's float32 (10,)"),
    (set_array("fc2.bias", lambda a: a.double()), "'fc2.bias' holds float64 (10,)"),
    (lambda c: c.__setitem__("arrays", ArrayRecord(dict(reversed(list(c["arrays"].items()))))), "in order"),
    (set_metric("num-examples", 0), "num-examples = 0 is not an integer from 1 to 1,000,000,000"),
    (set_metric("num-examples", 10**15), "is not an integer from 1 to 1,000,000,000"),
    (set_metric("num-examples", 10.0), "num-examples = 10.0 is not an integer"),
    (set_metric("train_loss", float("nan")), "train_loss = nan is not a finite number"),
    (set_metric("train_loss", -1.0), "train_loss = -1.0 is not a loss"),
    (set_metric("extra", 1.0), "its metrics ['extra', 'num-examples', 'train_loss'] are not"),
    (set_metric("equal-weight", 1), "are not"),
    (lambda c: c.__setitem__("extra", MetricRecord({"x": 1})), "holds the records"),
]


@pytest.mark.parametrize(("poison", "reason"), BAD_TRAIN_REPLIES)
def test_a_train_reply_unlike_the_clientapps_is_left_out_and_counted(tmp_path, caplog, poison, reason):
    config = config_for(num_server_rounds=1, fraction_train=1.0, fraction_evaluate=1.0)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = run_rounds(tmp_path, config, ScriptedGrid(4, poisoned("train", 3, poison)))
    assert "Round 1: left out the train reply of node 3: " in caplog.text and reason in caplog.text
    assert all(torch.isfinite(value).all() for value in result.arrays.to_torch_state_dict().values())
    [entry] = results_of(tmp_path)
    assert entry["replies"] == {
        "train": {"expected": 4, "received": 4, "failed": 0, "dropped": 1, "clipped": 0, "capped": 0},
        "evaluate": {"expected": 4, "received": 4, "failed": 0, "dropped": 0, "capped": 0},
    }
    assert entry["train_metrics_clientapp"] == {"train_loss": 1.0}


BAD_EVALUATE_REPLIES = [
    (without_metric("num-examples"), "its metrics"),
    (set_metric("eval_acc", 1e9), "eval_acc = 1000000000.0 is not a score in [0, 1]"),
    (set_metric("eval_acc", [0.5, 0.5]), "eval_acc = [0.5, 0.5] is not a finite number"),
    (set_metric("eval_acc_global", -0.1), "is not a score in [0, 1]"),
    (set_metric("eval_loss", float("inf")), "eval_loss = inf is not a finite number"),
    (set_metric("num-examples", 10**9 + 1), "num-examples = 1000000001 is not an integer from 1 to"),
    (set_metric("num-examples", [5]), "num-examples = [5] is not an integer"),
    (lambda c: c.__setitem__("arrays", ArrayRecord()), "holds the records ['arrays', 'metrics']"),
]


@pytest.mark.parametrize(("poison", "reason"), BAD_EVALUATE_REPLIES)
def test_an_evaluate_reply_unlike_the_clientapps_is_left_out_and_counted(tmp_path, caplog, poison, reason):
    config = config_for(num_server_rounds=1, fraction_train=1.0, fraction_evaluate=1.0)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        run_rounds(tmp_path, config, ScriptedGrid(4, poisoned("evaluate", 2, poison)))
    assert "Round 1: left out the evaluate reply of node 2: " in caplog.text and reason in caplog.text
    [entry] = results_of(tmp_path)
    assert entry["replies"]["evaluate"] == {
        "expected": 4,
        "received": 4,
        "failed": 0,
        "dropped": 1,
        "capped": 0,
    }
    # Nodes 1, 3, 4 score 0.1, 0.3, 0.4 on 5, 15, 20 rows.
    assert entry["evaluate_metrics_clientapp"]["eval_acc"] == pytest.approx((0.5 + 4.5 + 8) / 40)


def test_an_evaluate_reply_weighs_no_more_than_its_round_allows(tmp_path):
    """Node 4 claims a million validation rows against the others' 5, 10, 15: its score
    weighs 3 x the round's median (10) rows, not a million."""
    config = config_for(num_server_rounds=1, fraction_train=1.0, fraction_evaluate=1.0)
    run_rounds(tmp_path, config, ScriptedGrid(4, poisoned("evaluate", 4, set_metric("num-examples", 10**6))))
    [entry] = results_of(tmp_path)
    assert entry["replies"]["evaluate"]["dropped"] == 0 and entry["replies"]["evaluate"]["capped"] == 1
    # Nodes 1..4 score 0.1..0.4, on 5, 10, 15 and (capped) 30 rows.
    expected = (0.1 * 5 + 0.2 * 10 + 0.3 * 15 + 0.4 * 30) / 60
    assert entry["evaluate_metrics_clientapp"]["eval_acc"] == pytest.approx(expected)


def test_error_replies_are_counted_as_failed(tmp_path):
    def node_2_crashes(server_round, message):
        return RuntimeError("out of memory") if message.metadata.dst_node_id == 2 else trained(message)

    run_rounds(
        tmp_path, config_for(num_server_rounds=1, fraction_evaluate=1.0), ScriptedGrid(4, node_2_crashes)
    )
    evaluate = results_of(tmp_path)[0]["replies"]["evaluate"]
    assert evaluate == {"expected": 4, "received": 4, "failed": 1, "dropped": 0, "capped": 0}


def test_too_few_supernodes_stop_the_run_in_one_line_after_the_wait(tmp_path):
    one_node = ScriptedGrid(1, honest)  # FedAvg needs 2
    with pytest.raises(
        RunFailed, match=r"1 SuperNode\(s\) connected but 2 needed .* after 1s \(round-timeout\)"
    ):
        run_rounds(tmp_path, config_for(round_timeout=1.0), one_node)


def test_a_reply_whose_content_cannot_be_read_is_left_out(tmp_path, caplog):
    class Unreadable(ArrayRecord):
        def items(self):
            raise RuntimeError("corrupt bytes")

    def node_1_unreadable(server_round, message):
        content = trained(message)
        if is_train(message) and message.metadata.dst_node_id == 1:
            return RecordDict({"arrays": Unreadable(dict(content["arrays"])), "metrics": content["metrics"]})
        return content

    config = config_for(num_server_rounds=1, fraction_train=1.0)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        run_rounds(tmp_path, config, ScriptedGrid(4, node_1_unreadable))
    assert "left out the train reply of node 1: it cannot be read (RuntimeError)" in caplog.text
    assert results_of(tmp_path)[0]["replies"]["train"]["dropped"] == 1


def test_the_config_clients_get_holds_the_run_config(tmp_path):
    grid = ScriptedGrid(2, honest)
    config = config_for(num_server_rounds=1)
    start = ArrayRecord(Net().state_dict())
    outputs, gate = RunOutputs(tmp_path, {}, wandb_project=None), ReplyGate.for_run(config, start)
    rounds = RoundLoop(config, build_strategy(config, 2), grid, outputs, gate)
    rounds.run(start, client_config=ConfigRecord({"lineage": "a" * 32}))
    assert all(sent["lineage"] == "a" * 32 and "lr" in sent for _, sent in grid.sent)


def test_a_round_whose_mean_overflows_trains_nothing_and_keeps_the_model(tmp_path, caplog):
    start = ArrayRecord(Net().state_dict())
    # The trimmed mean of 5 (one cut at each end) sums 3 such replies in float32: Inf.
    config = config_for(num_server_rounds=1, fraction_train=1.0, aggregation="trimmed-mean")
    with caplog.at_level(logging.WARNING, logger="flwr"), pytest.raises(RunFailed):
        run_rounds(tmp_path, config, ScriptedGrid(5, every_node_moves_the_model(by=3e38)), initial=start)
    assert "the new model from the usable replies holds NaN or Inf" in caplog.text
    saved = torch.load(tmp_path / "resume.pt", weights_only=True)["arrays"]
    assert all(torch.equal(saved[key], value) for key, value in start.to_torch_state_dict().items())


def test_central_evaluation_scores_each_rounds_aggregate(tmp_path):
    """Every node moves every weight by 1e-4 a round: the model scored after round r is r
    steps from the start (round 0, the start itself), and the results record its scores."""
    start = ArrayRecord(Net().state_dict())
    scored: dict[int, float] = {}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        scored[server_round] = mean_shift(start, arrays)
        return MetricRecord({"accuracy": 0.1 * server_round, "loss": 1.0})

    grid = ScriptedGrid(4, every_node_moves_the_model(by=1e-4))
    run_rounds(tmp_path, config_for(fraction_train=1.0), grid, initial=start, evaluate_fn=evaluate)
    assert scored == pytest.approx({0: 0.0, 1: 1e-4, 2: 2e-4, 3: 3e-4}, rel=1e-3, abs=1e-9)
    recorded = json.loads((tmp_path / "results.json").read_text())
    assert [entry["evaluate_metrics_serverapp"]["accuracy"] for entry in recorded] == [0.0, 0.1, 0.2, 0.3]


def test_a_clients_error_reaches_the_log_as_one_short_printable_line():
    reason = "Traceback (most recent call last):\n  ...\nValueError: \x1b[2J\x1b[31m" + "x" * 10_000
    line = last_line(reason)
    assert line.startswith("ValueError: \\x1b[2J\\x1b[31mxxx") and len(line) < 400 and line.isprintable()
