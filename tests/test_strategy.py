"""The round loop: learning rate sent each round, outputs recorded, and the rule that
fails a run whose clients stopped training."""

import itertools
import json
import logging
import re
import time

import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from pytorch_example.outputs import RunOutputs
from pytorch_example.strategy import CustomFedAvg, RunFailed, clock
from pytorch_example.task import HEAD_KEYS, Net


class ScriptedGrid:
    """Stands in for Flower's Grid: every node answers at once, as `answer` says.

    `answer(server_round, message)` returns a reply's content, or an exception to
    send back as the error a crashed ClientApp would.
    """

    def __init__(self, num_nodes: int, answer) -> None:
        self.node_ids = list(range(1, num_nodes + 1))
        self.answer = answer
        self.ids = itertools.count()
        self.pushed: dict[str, Message] = {}
        self.sent: list[tuple[str, dict]] = []  # type and config, as pushed

    def get_node_ids(self):
        return self.node_ids

    def push_messages(self, messages):
        ids = []
        for message in messages:
            # As the SuperLink does when it accepts a message.
            message.metadata.__dict__["_message_id"] = f"message-{next(self.ids)}"
            self.pushed[message.metadata.message_id] = message
            self.sent.append((message.metadata.message_type, dict(message.content["config"])))
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        replies = []
        for message_id in list(message_ids):
            message = self.pushed.pop(message_id)
            server_round = int(message.content["config"]["server-round"])
            answer = self.answer(server_round, message)
            if isinstance(answer, Exception):
                replies.append(message.create_error_reply(Error(code=0, reason=f"Traceback...\n{answer!r}")))
            else:
                replies.append(message.create_reply(answer))
        return replies


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    """What Flower sets in a ServerApp process before the strategy creates messages."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def trained(message: Message) -> RecordDict:
    if message.metadata.message_type.startswith("train"):
        return RecordDict(
            {
                "arrays": message.content["arrays"],
                "metrics": MetricRecord({"train_loss": 1.0, "num-examples": 10}),
            }
        )
    # Client n scores 0.1 * n with its own head, on 5 * n validation rows.
    node = message.metadata.dst_node_id
    return RecordDict(
        {
            "metrics": MetricRecord(
                {"eval_loss": 1.0, "eval_acc": 0.1 * node, "eval_acc_global": 0.1, "num-examples": 5 * node}
            )
        }
    )


def run(tmp_path, answer, num_rounds: int, max_failed_rounds: int = 3) -> tuple[ScriptedGrid, list[dict]]:
    grid = ScriptedGrid(4, answer)
    outputs = RunOutputs(tmp_path, {}, wandb_project=None)
    strategy = CustomFedAvg(
        outputs=outputs,
        learning_rate_at=lambda server_round: 0.1 / server_round,
        max_failed_rounds=max_failed_rounds,
        fraction_train=0.5,
        fraction_evaluate=1.0,
    )
    strategy.start(grid, ArrayRecord(Net().state_dict()), num_rounds=num_rounds, timeout=5)
    return grid, json.loads((tmp_path / "results.json").read_text())


def failing_in(rounds: set[int]):
    def answer(server_round, message):
        if server_round in rounds and message.metadata.message_type.startswith("train"):
            return ValueError(f"partition broken in round {server_round}")
        return trained(message)

    return answer


def test_every_round_is_recorded_with_its_learning_rate(tmp_path):
    grid, results = run(tmp_path, lambda _, message: trained(message), num_rounds=3)
    assert [entry["round"] for entry in results] == [1, 2, 3]
    train_configs = [config for kind, config in grid.sent if kind.startswith("train")]
    assert [config["lr"] for config in train_configs] == pytest.approx(
        [0.1, 0.1, 0.05, 0.05, 0.1 / 3, 0.1 / 3]
    )
    assert (tmp_path / "final_model.pt").exists()


def test_a_run_whose_clients_never_train_fails_naming_their_error(tmp_path):
    with pytest.raises(
        RunFailed, match=r"3 round\(s\) in a row .* ValueError\('partition broken in round 1'\)"
    ):
        run(tmp_path, failing_in({1, 2, 3, 4, 5}), num_rounds=5)
    assert not (tmp_path / "final_model.pt").exists()


def test_the_rule_counts_rounds_in_a_row_only(tmp_path):
    _, results = run(tmp_path, failing_in({1, 2, 4, 5}), num_rounds=6)
    assert [entry["round"] for entry in results] == list(range(1, 7))
    assert results[0]["train_metrics"] == {} and results[2]["train_metrics"] != {}


def test_a_run_shorter_than_the_limit_fails_when_all_its_rounds_failed(tmp_path):
    with pytest.raises(RunFailed, match=r"1 round\(s\) in a row"):
        run(tmp_path, failing_in({1}), num_rounds=1)
    (tmp_path / "two").mkdir()
    _, results = run(tmp_path / "two", failing_in({1}), num_rounds=2)
    assert len(results) == 2


def test_evaluation_reports_the_spread_of_personalised_accuracy(tmp_path):
    _, results = run(tmp_path, lambda _, message: trained(message), num_rounds=1)
    metrics = results[0]["evaluate_metrics_clientapp"]
    # Four clients at 0.1..0.4: weighted by their 5..20 rows for the mean, once each for the spread.
    assert metrics["eval_acc"] == pytest.approx((0.1 * 5 + 0.2 * 10 + 0.3 * 15 + 0.4 * 20) / 50)
    assert metrics["eval_acc_min"] == pytest.approx(0.1) and metrics["eval_acc_max"] == pytest.approx(0.4)
    assert metrics["eval_acc_median"] == pytest.approx(0.25)
    assert metrics["eval_acc_std"] == pytest.approx(0.1118034, rel=1e-6)
    assert metrics["eval_acc_global"] == pytest.approx(0.1)
    assert results[0]["learning_rate"] == pytest.approx(0.1)
    # Own minus global, in points: 0, 10, 20, 30; client 1 gains nothing, so 3 of 4 gain.
    assert metrics["eval_gain_share"] == pytest.approx(0.75)
    assert metrics["eval_gain_points_mean"] == pytest.approx(15.0)
    assert metrics["eval_gain_points_min"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["eval_gain_points_max"] == pytest.approx(30.0)


def body_only_plus_one(message: Message) -> RecordDict:
    """A private-head client: sends its body, each weight moved by +1, and no head."""
    content = trained(message)
    if "arrays" in content:
        body = {key: value + 1 for key, value in content["arrays"].to_torch_state_dict().items()}
        content["arrays"] = ArrayRecord({key: value for key, value in body.items() if key not in HEAD_KEYS})
    return content


def test_frozen_entries_stay_as_they_were_and_the_rest_is_averaged(tmp_path, caplog):
    def node_4_sends_its_head(server_round, message):
        content = body_only_plus_one(message)
        if message.metadata.dst_node_id == 4 and "arrays" in content:
            content["arrays"] = ArrayRecord({**content["arrays"], **message.content["arrays"]})
        return content

    start = Net()
    strategy = CustomFedAvg(
        outputs=RunOutputs(tmp_path, {}, wandb_project=None),
        learning_rate_at=lambda _: 0.1,
        max_failed_rounds=3,
        frozen_keys=HEAD_KEYS,
        fraction_train=1.0,
    )
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = strategy.start(ScriptedGrid(4, node_4_sends_its_head), ArrayRecord(start.state_dict()), 1, 5)
    assert "left out the train reply of node 4: its arrays" in caplog.text
    final = result.arrays.to_torch_state_dict()
    assert list(final) == list(start.state_dict())
    for key, value in start.state_dict().items():
        torch.testing.assert_close(final[key], value if key in HEAD_KEYS else value + 1)


def test_one_progress_line_per_round_with_time_left(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="flwr"):
        run(tmp_path, lambda _, message: trained(message), num_rounds=3)
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("Round ")]
    assert len(lines) == 3
    assert re.fullmatch(
        r"Round 2/3: [\d.]+s, \d+:\d\d elapsed, ETA \d+:\d\d \| central accuracy - \| "
        r"personalised accuracy 0\.\d{4}",
        lines[1],
    )
    app_lines = [
        record.getMessage()
        for record in caplog.records
        if record.levelno >= logging.INFO
        and record.pathname.endswith(("strategy.py", "outputs.py"))
        and "pytorch_example" in record.pathname
    ]
    assert app_lines == lines + [next(line for line in app_lines if line.startswith("Final model saved"))]


def test_clock_reads_like_a_stopwatch():
    assert [clock(s) for s in (0, 65, 3725)] == ["0:00", "1:05", "1:02:05"]


def poisoned_by_node(node: int, poison):
    """Node `node` sends a train reply changed by `poison(content)`; the rest train."""

    def answer(server_round, message):
        content = trained(message)
        if message.metadata.message_type.startswith("train") and message.metadata.dst_node_id == node:
            poison(content)
        return content

    return answer


def with_nan(content: RecordDict) -> None:
    state = content["arrays"].to_torch_state_dict()
    state["fc1.weight"][0, 0] = float("nan")
    content["arrays"] = ArrayRecord(state)


def with_wrong_shape(content: RecordDict) -> None:
    state = content["arrays"].to_torch_state_dict()
    state["fc2.bias"] = state["fc2.bias"][:5]
    content["arrays"] = ArrayRecord(state)


def with_zero_examples(content: RecordDict) -> None:
    content["metrics"]["num-examples"] = 0


@pytest.mark.parametrize(
    ("poison", "reason"),
    [
        (with_nan, "'fc1.weight' holds NaN or Inf"),
        (with_wrong_shape, "'fc2.bias' has shape (5,), the global model's (10,)"),
        (with_zero_examples, "num-examples = 0 is not a positive integer"),
    ],
)
def test_a_reply_that_would_poison_the_model_is_left_out_and_counted(tmp_path, caplog, poison, reason):
    # fraction-train 1.0: all four nodes train, node 3 sends the bad reply.
    grid = ScriptedGrid(4, poisoned_by_node(3, poison))
    outputs = RunOutputs(tmp_path, {}, wandb_project=None)
    strategy = CustomFedAvg(
        outputs=outputs, learning_rate_at=lambda _: 0.1, max_failed_rounds=3, fraction_train=1.0
    )
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = strategy.start(grid, ArrayRecord(Net().state_dict()), num_rounds=2, timeout=5)
    assert f"Round 1: left out the train reply of node 3: {reason}" in caplog.text
    for value in result.arrays.to_torch_state_dict().values():
        assert torch.isfinite(value).all()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results[0]["replies"] == {
        "train": {"expected": 4, "received": 4, "failed": 0, "dropped": 1},
        "evaluate": {"expected": 4, "received": 4, "failed": 0, "dropped": 0},
    }
    assert results[0]["train_metrics"] != {}


def test_error_replies_are_counted_as_failed(tmp_path):
    def node_2_crashes(server_round, message):
        if message.metadata.dst_node_id == 2:
            return RuntimeError("out of memory")
        return trained(message)

    _, results = run(tmp_path, node_2_crashes, num_rounds=1)
    evaluate = results[0]["replies"]["evaluate"]
    assert evaluate == {"expected": 4, "received": 4, "failed": 1, "dropped": 0}


def test_too_few_supernodes_stop_the_run_in_one_line_after_the_wait(tmp_path):
    outputs = RunOutputs(tmp_path, {}, wandb_project=None)
    strategy = CustomFedAvg(outputs=outputs, learning_rate_at=lambda _: 0.1, max_failed_rounds=3)
    one_node = ScriptedGrid(1, lambda _, message: trained(message))  # FedAvg needs 2
    started = time.monotonic()
    with pytest.raises(
        RunFailed, match=r"1 SuperNode\(s\) connected but 2 needed .* after 2s \(round-timeout\)"
    ):
        strategy.start(one_node, ArrayRecord(Net().state_dict()), num_rounds=2, timeout=2)
    assert 2 <= time.monotonic() - started < 10
