"""The strategies and the round loop: learning rate sent each round, outputs recorded,
the rule that fails a run whose clients stopped training, each aggregation rule against
a poisoned reply, and DP's epsilon."""

import itertools
import json
import logging
import re
import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from pytorch_example.config import EQUAL_WEIGHT_KEY, AppConfig, ConfigError
from pytorch_example.outputs import RunOutputs, load_resume_state
from pytorch_example.strategy import (
    CustomFedAvg,
    RoundLoop,
    RunFailed,
    build_strategy,
    check_federation,
    clock,
)
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


def fedavg(fraction_train: float = 0.5, learning_rate_at=lambda server_round: 0.1 / server_round):
    return CustomFedAvg(
        learning_rate_at=learning_rate_at,
        node_wait_s=5,
        fraction_train=fraction_train,
        fraction_evaluate=1.0,
    )


def run_loop(
    tmp_path, strategy, grid, num_rounds: int, max_failed_rounds: int = 3, frozen_keys=(), timeout=5
):
    """The round loop over `strategy`, recording into `tmp_path`; the `Result`."""
    rounds = RoundLoop(
        RunOutputs(tmp_path, {}, wandb_project=None),
        learning_rate_at=lambda server_round: 0.1 / server_round,
        max_failed_rounds=max_failed_rounds,
        frozen_keys=frozen_keys,
    )
    return rounds.run(strategy, grid, ArrayRecord(Net().state_dict()), num_rounds=num_rounds, timeout=timeout)


def run(tmp_path, answer, num_rounds: int, max_failed_rounds: int = 3) -> tuple[ScriptedGrid, list[dict]]:
    grid = ScriptedGrid(4, answer)
    run_loop(tmp_path, fedavg(), grid, num_rounds, max_failed_rounds)
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

    torch.manual_seed(0)
    start = Net()
    torch.manual_seed(0)
    grid = ScriptedGrid(4, node_4_sends_its_head)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = run_loop(tmp_path, fedavg(fraction_train=1.0), grid, 1, frozen_keys=HEAD_KEYS)
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
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = run_loop(tmp_path, fedavg(fraction_train=1.0), grid, num_rounds=2)
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
    strategy = CustomFedAvg(learning_rate_at=lambda _: 0.1, node_wait_s=2)
    one_node = ScriptedGrid(1, lambda _, message: trained(message))  # FedAvg needs 2
    started = time.monotonic()
    with pytest.raises(
        RunFailed, match=r"1 SuperNode\(s\) connected but 2 needed .* after 2s \(round-timeout\)"
    ):
        run_loop(tmp_path, strategy, one_node, num_rounds=2)
    assert 2 <= time.monotonic() - started < 10


def shifted(message: Message, by: float) -> RecordDict:
    """A train reply that moves every weight of the received model by `by`."""
    content = trained(message)
    state = message.content["arrays"].to_torch_state_dict()
    content["arrays"] = ArrayRecord({key: value + by for key, value in state.items()})
    content["metrics"][EQUAL_WEIGHT_KEY] = 1
    return content


def honest_but_node_1_scaled(server_round, message):
    """Nodes move the model by 0.010..0.016 (node 2..7); node 1 sends its update x100."""
    if not message.metadata.message_type.startswith("train"):
        return trained(message)
    node = message.metadata.dst_node_id
    return shifted(message, 100 * 0.01 if node == 1 else 0.01 + 0.001 * (node - 2))


def mean_shift(start: ArrayRecord, end: ArrayRecord) -> float:
    before, after = start.to_torch_state_dict(), end.to_torch_state_dict()
    return float(torch.cat([(after[key] - before[key]).flatten() for key in before]).mean())


@pytest.mark.parametrize(
    ("aggregation", "poisoned"),
    [
        ("fedavg", True),
        ("trimmed-mean", False),
        ("median", False),
        ("krum", False),
        ("multi-krum", False),
        ("bulyan", False),
    ],
)
def test_each_aggregation_against_one_update_scaled_a_hundredfold(tmp_path, aggregation, poisoned):
    # 7 nodes all train: Bulyan with num-malicious=1 needs 4f + 3 = 7 replies.
    config = AppConfig(aggregation=aggregation, fraction_train=1.0, num_malicious=1, trim_fraction=0.2)
    check_federation(config, 7)
    start = ArrayRecord(Net().state_dict())
    rounds = RoundLoop(RunOutputs(tmp_path, {}, wandb_project=None), lambda _: 0.1, max_failed_rounds=3)
    result = rounds.run(build_strategy(config, 7), ScriptedGrid(7, honest_but_node_1_scaled), start, 1, 5)
    shift = mean_shift(start, result.arrays)
    # FedAvg: (1.0 + six honest ~0.013) / 7 ~ 0.155; a robust rule stays among the honest 0.010..0.016.
    if poisoned:
        assert shift > 0.1
    else:
        assert 0.0099 < shift < 0.0161


def dp_config(**overrides) -> AppConfig:
    return AppConfig(
        **{"fraction_train": 1.0, "dp_noise_multiplier": 1.0, "dp_clipping_norm": 0.5, **overrides}
    )


def all_move_by_one(server_round, message):
    return shifted(message, 1.0) if message.metadata.message_type.startswith("train") else trained(message)


def test_dp_clips_each_update_and_averages_clients_equally(tmp_path):
    """Node n moves every weight by 0.001 * 10 ** (n - 1) and holds 10 * n rows: updates
    of norm 0.28 (under the clipping norm 0.5) to 283 (clipped to 0.5)."""

    def unlike_updates(server_round, message):
        if not message.metadata.message_type.startswith("train"):
            return trained(message)
        node = message.metadata.dst_node_id
        content = shifted(message, 0.001 * 10 ** (node - 1))
        content["metrics"]["num-examples"] = 10 * node
        return content

    config = dp_config(dp_noise_multiplier=1e-9)  # noise too small to see
    start = ArrayRecord(Net().state_dict())
    rounds = RoundLoop(
        RunOutputs(tmp_path, {}, wandb_project=None), lambda _: 0.1, max_failed_rounds=3, equal_weights=True
    )
    result = rounds.run(build_strategy(config, 4), ScriptedGrid(4, unlike_updates), start, 1, 5)
    before, after = start.to_torch_state_dict(), result.arrays.to_torch_state_dict()
    moved = torch.cat([(after[key] - before[key]).flatten() for key in before])
    size = moved.numel() ** 0.5  # the norm of a shift by 1 of every weight
    clipped = [min(0.001 * 10 ** (node - 1), 0.5 / size) for node in (1, 2, 3, 4)]
    torch.testing.assert_close(moved, torch.full_like(moved, sum(clipped) / 4), rtol=1e-4, atol=1e-7)


def epsilons(results: list[dict]) -> list[float]:
    return [entry["privacy"]["epsilon"] for entry in results]


def test_dp_reports_epsilon_after_every_round(tmp_path, caplog):
    config = dp_config()
    rounds = RoundLoop(RunOutputs(tmp_path, {}, wandb_project=None), lambda _: 0.1, max_failed_rounds=3)
    with caplog.at_level(logging.INFO, logger="flwr"):
        rounds.run(
            build_strategy(config, 4), ScriptedGrid(4, all_move_by_one), ArrayRecord(Net().state_dict()), 3, 5
        )
    results = json.loads((tmp_path / "results.json").read_text())
    assert [entry["privacy"]["releases"] for entry in results] == [1, 2, 3]
    assert all(entry["privacy"]["delta"] == 1e-5 for entry in results)
    assert 0 < epsilons(results)[0] < epsilons(results)[1] < epsilons(results)[2]
    assert re.search(r"Round 3/3: .* \| epsilon [\d.]+ \(delta 1e-05\)", caplog.text)


def test_a_resumed_dp_run_goes_on_from_the_epsilon_it_spent(tmp_path):
    rounds = RoundLoop(RunOutputs(tmp_path, {}, wandb_project=None), lambda _: 0.1, max_failed_rounds=3)
    rounds.run(
        build_strategy(dp_config(), 4),
        ScriptedGrid(4, all_move_by_one),
        ArrayRecord(Net().state_dict()),
        3,
        5,
    )
    fresh = epsilons(json.loads((tmp_path / "results.json").read_text()))
    (tmp_path / "resumed").mkdir()
    rounds = RoundLoop(
        RunOutputs(tmp_path / "resumed", {}, wandb_project=None), lambda _: 0.1, max_failed_rounds=3
    )
    strategy = build_strategy(dp_config(), 4, privacy_releases=2)
    rounds.run(
        strategy, ScriptedGrid(4, all_move_by_one), ArrayRecord(Net().state_dict()), 3, 5, first_round=3
    )
    resumed = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert resumed[0]["privacy"]["releases"] == 3
    assert resumed[0]["privacy"]["epsilon"] == pytest.approx(fresh[2])


def test_dp_max_epsilon_ends_the_run_before_the_round_that_would_pass_it(tmp_path, caplog):
    rounds = RoundLoop(
        RunOutputs(tmp_path / "all", {}, wandb_project=None), lambda _: 0.1, max_failed_rounds=3
    )
    (tmp_path / "all").mkdir()
    rounds.run(
        build_strategy(dp_config(), 4),
        ScriptedGrid(4, all_move_by_one),
        ArrayRecord(Net().state_dict()),
        3,
        5,
    )
    first_three = epsilons(json.loads((tmp_path / "all" / "results.json").read_text()))
    limit = (first_three[1] + first_three[2]) / 2  # round 2 fits, round 3 would not
    rounds = RoundLoop(RunOutputs(tmp_path, {}, wandb_project=None), lambda _: 0.1, max_failed_rounds=3)
    strategy = build_strategy(dp_config(dp_max_epsilon=limit), 4)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        rounds.run(strategy, ScriptedGrid(4, all_move_by_one), ArrayRecord(Net().state_dict()), 5, 5)
    results = json.loads((tmp_path / "results.json").read_text())
    assert [entry["round"] for entry in results] == [1, 2]
    assert epsilons(results)[-1] <= limit
    assert "Round 3 not run, so the run ends here (dp-max-epsilon)" in caplog.text
    assert (tmp_path / "final_model.pt").exists()


def test_a_dp_round_missing_a_sampled_reply_trains_nothing_and_says_why(tmp_path):
    def node_2_sends_nan(server_round, message):
        content = all_move_by_one(server_round, message)
        if message.metadata.message_type.startswith("train") and message.metadata.dst_node_id == 2:
            with_nan(content)
        return content

    rounds = RoundLoop(RunOutputs(tmp_path, {}, wandb_project=None), lambda _: 0.1, max_failed_rounds=1)
    with pytest.raises(RunFailed, match=r"aggregated none of the 3 valid train replies"):
        rounds.run(
            build_strategy(dp_config(), 4),
            ScriptedGrid(4, node_2_sends_nan),
            ArrayRecord(Net().state_dict()),
            1,
            5,
        )
    results = json.loads((tmp_path / "results.json").read_text())
    assert results[0]["replies"]["train"]["dropped"] == 1 and "privacy" in results[0]
    assert results[0]["privacy"]["releases"] == 0


def test_settings_a_federation_cannot_serve_are_refused_in_one_line():
    with pytest.raises(
        ConfigError, match=r"'bulyan' with num-malicious=3 needs at least 15 replies a round, but"
    ):
        check_federation(AppConfig(aggregation="bulyan", num_malicious=3), 50)
    check_federation(AppConfig(aggregation="bulyan", num_malicious=2), 50)  # 12 sampled >= 11
    with pytest.raises(
        ConfigError, match=r"'dp-noise-multiplier' > 0 .* 1 SuperNode\(s\) are connected: start 2"
    ):
        check_federation(dp_config(), 1)
    with pytest.raises(
        ConfigError, match=r"'dp-max-epsilon' = 1 leaves no round to run: epsilon is 0 after 0"
    ):
        check_federation(dp_config(dp_max_epsilon=1.0), 4)
    with pytest.raises(
        ConfigError, match=r"'dp-max-epsilon' = 8 leaves no round to run: epsilon is 7.08 after 2"
    ):
        build_strategy(dp_config(dp_max_epsilon=8.0), 4, privacy_releases=2)


def test_dp_samples_the_same_number_of_clients_as_supernodes_come_and_go():
    grid = ScriptedGrid(4, all_move_by_one)
    strategy = build_strategy(dp_config(), 4)
    sampled = []
    for server_round, nodes in ((1, [1, 2, 3, 4]), (2, [1, 2, 3, 4, 5, 6]), (3, [2, 3, 4, 5])):
        grid.node_ids = nodes
        arrays = ArrayRecord(Net().state_dict())
        sampled.append(len(list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))))
        strategy.aggregate_train(server_round, [])  # what the round loop does after the replies
    assert sampled == [4, 4, 4]


def reversed_arrays(content: RecordDict) -> None:
    content["arrays"] = ArrayRecord(dict(reversed(list(content["arrays"].items()))))


@pytest.mark.parametrize(
    ("poison", "reason"),
    [
        (lambda content: content["metrics"].__setitem__(EQUAL_WEIGHT_KEY, 2), "equal-weight = 2, not 1"),
        (lambda content: content["metrics"].pop(EQUAL_WEIGHT_KEY), "equal-weight = None, not 1"),
        (reversed_arrays, "in that order"),
        (lambda content: content.__setitem__("extra", MetricRecord({"x": 1})), "holds the records"),
    ],
)
def test_a_dp_reply_that_would_break_the_mean_is_left_out(tmp_path, caplog, poison, reason):
    def node_3_misbehaves(server_round, message):
        content = all_move_by_one(server_round, message)
        if message.metadata.message_type.startswith("train") and message.metadata.dst_node_id == 3:
            poison(content)
        return content

    rounds = RoundLoop(
        RunOutputs(tmp_path, {}, wandb_project=None), lambda _: 0.1, max_failed_rounds=3, equal_weights=True
    )
    grid = ScriptedGrid(4, node_3_misbehaves)
    with (
        caplog.at_level(logging.WARNING, logger="flwr"),
        pytest.raises(RunFailed, match=r"aggregated none of the 3 valid train replies"),
    ):
        rounds.run(build_strategy(dp_config(), 4), grid, ArrayRecord(Net().state_dict()), 1, 5)
    assert "left out the train reply of node 3: " in caplog.text and reason in caplog.text
    results = json.loads((tmp_path / "results.json").read_text())
    assert results[0]["replies"]["train"]["dropped"] == 1 and results[0]["train_metrics"] == {}


def test_a_dp_release_is_saved_before_the_round_is_evaluated(tmp_path):
    """A run killed while its clients evaluate: resuming it must count that round's release."""

    def killed_in_round_2_evaluation(server_round, message):
        if server_round == 2 and not message.metadata.message_type.startswith("train"):
            raise KeyboardInterrupt
        return all_move_by_one(server_round, message)

    rounds = RoundLoop(RunOutputs(tmp_path, {}, wandb_project=None), lambda _: 0.1, max_failed_rounds=3)
    grid = ScriptedGrid(4, killed_in_round_2_evaluation)
    with pytest.raises(KeyboardInterrupt):
        rounds.run(build_strategy(dp_config(), 4), grid, ArrayRecord(Net().state_dict()), 3, 5)
    shapes = {key: tuple(value.shape) for key, value in Net().state_dict().items()}
    state = load_resume_state(tmp_path, {}, shapes)
    assert (state.round, state.privacy_releases) == (1, 2)
