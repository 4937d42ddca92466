"""Trusting the clients less: each aggregation rule against a poisoned reply, row
counts that cannot buy weight, the per-round reply floor, and DP (clipping, noise,
epsilon, its budget)."""

import dataclasses
import json
import logging
import re

import numpy as np
import pytest
import torch
from dp_accounting import dp_event, rdp
from dp_accounting.privacy_accountant import NeighboringRelation
from flwr.app import ArrayRecord, ConfigRecord
from hypothesis import assume, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from harness.flower_processes import default_run_config
from pytorch_example.config import AppConfig, ConfigError
from pytorch_example.outputs import RunOutputs
from pytorch_example.privacy import Clipping, PrivacyLedger, run_ledger
from pytorch_example.rounds import RunFailed
from pytorch_example.task import Net
from pytorch_example.trust import build_strategy, check_federation, check_sample
from tests.scripted import (
    ScriptedGrid,
    config_for,
    every_node_moves_the_model,
    is_train,
    mean_shift,
    run_rounds,
    shifted,
    trained,
)


def results_of(run_dir) -> list[dict]:
    return json.loads((run_dir / "results.json").read_text())


def honest_but_node_1(attack_shift: float, attack_rows: int = 10):
    """Nodes 2..7 move the model by 0.010..0.016; node 1 by `attack_shift`, claiming
    `attack_rows` rows."""

    def answer(server_round, message):
        if not is_train(message):
            return trained(message)
        node = message.metadata.dst_node_id
        content = shifted(message, attack_shift if node == 1 else 0.01 + 0.001 * (node - 2))
        if node == 1:
            content["metrics"]["num-examples"] = attack_rows
        return content

    return answer


ROBUST = ["trimmed-mean", "median", "krum", "multi-krum", "bulyan"]


@pytest.mark.parametrize(
    ("settings", "supernodes", "refusal", "fix"),
    [
        (
            {"aggregation": "bulyan", "num-malicious": 3},
            50,
            r"needs at least 15 replies a round, but a round samples 12 of 50 SuperNodes: lower "
            r"num-malicious, or use fraction-train=0.3",
            {"fraction-train": 0.3},
        ),
        (
            {"aggregation": "krum", "num-malicious": 5, "fraction-train": 1.0},
            10,
            r"needs at least 13 replies .* or use at least 13 SuperNodes",
            None,
        ),
        (
            {"aggregation": "multi-krum", "num-malicious": 5},
            50,
            r"needs at least 13 replies",
            {"fraction-train": 0.26},
        ),
        (
            {"aggregation": "trimmed-mean", "trim-fraction": 0.05},
            50,
            r"'trim-fraction' = 0.05 cuts 0 of the 12 replies a round gets at each end, fewer than 1 "
            r"\(num-malicious=1, and at least one\): raise it to 0.084",
            {"trim-fraction": 0.084},
        ),
        (
            {"aggregation": "trimmed-mean", "num-malicious": 3},
            50,
            r"'trim-fraction' = 0.2 cuts 2 of the 12 replies a round gets at each end, fewer than 3 "
            r"\(num-malicious=3, and at least one\): raise it to 0.25",
            {"trim-fraction": 0.25},
        ),
        (
            {"aggregation": "trimmed-mean", "trim-fraction": 0.4, "fraction-train": 0.1},
            10,
            r"'trimmed-mean' with num-malicious=1 needs at least 3 replies a round, but a round samples 2 "
            r"of 10 SuperNodes: lower num-malicious, or use fraction-train=0.3",
            {"fraction-train": 0.3},
        ),
        (  # 0.3 would sample 3, enough replies, but cut none of them
            {"aggregation": "trimmed-mean", "fraction-train": 0.1},
            10,
            r"needs at least 3 replies a round, but a round samples 2 of 10 SuperNodes: lower "
            r"num-malicious, or use fraction-train=0.5",
            {"fraction-train": 0.5},
        ),
        (
            {"aggregation": "median", "fraction-train": 1.0},
            2,
            r"'median' with num-malicious=1 needs at least 3 replies a round, but a round samples 2 of 2 "
            r"SuperNodes: lower num-malicious, or use at least 3 SuperNodes",
            {"num-malicious": 0},
        ),
        (
            {"aggregation": "median", "num-malicious": 6},
            50,
            r"'median' with num-malicious=6 needs at least 13 replies",
            {"fraction-train": 0.26},
        ),
        (
            {"aggregation": "multi-krum", "multi-krum-keep": 12},
            50,
            r"'multi-krum-keep' = 12 exceeds the 11",
            {"multi-krum-keep": 11},
        ),
    ],
)
def test_a_rule_that_cannot_work_on_the_sample_is_refused_with_a_fix_that_works(
    settings, supernodes, refusal, fix
):
    run_config = {**default_run_config(), **settings}
    with pytest.raises(ConfigError, match=refusal):
        check_sample(AppConfig.from_run_config(run_config), supernodes)
    if fix is not None:
        check_sample(AppConfig.from_run_config({**run_config, **fix}), supernodes)


@hypothesis_settings(max_examples=300, derandomize=True, deadline=None)
@given(
    rule=st.sampled_from(["trimmed-mean", "median", "krum", "multi-krum", "bulyan"]),
    num_malicious=st.integers(0, 6),
    trim_fraction=st.integers(1, 499).map(lambda step: step / 1000),
    fraction_train=st.integers(1, 100).map(lambda step: step / 100),
    supernodes=st.integers(1, 300),
)
def test_every_fix_a_refusal_suggests_passes_the_same_check(
    rule, num_malicious, trim_fraction, fraction_train, supernodes
):
    config = AppConfig(
        aggregation=rule,
        num_malicious=num_malicious,
        trim_fraction=trim_fraction,
        fraction_train=fraction_train,
    )
    try:
        check_sample(config, supernodes)
    except ConfigError as refusal:
        fix = str(refusal).rpartition(": ")[2]
        if match := re.fullmatch(r"raise it to ([\d.]+)", fix):
            fixed = {"trim_fraction": float(match[1])}
        elif match := re.search(r"use fraction-train=([\d.]+)$", fix):
            fixed = {"fraction_train": float(match[1])}
        elif match := re.search(r"use at least (\d+) SuperNodes$", fix):
            fixed, supernodes = {}, int(match[1])
        else:
            assume(False)  # multi-krum-keep: lowering it, or num-malicious, is the user's choice
        check_sample(dataclasses.replace(config, **fixed), supernodes)


def test_each_rule_at_its_limit_is_accepted():
    for settings in (
        {"aggregation": "bulyan", "num-malicious": 2},  # 4 * 2 + 3 = 11 <= 12
        {"aggregation": "krum", "num-malicious": 4},  # 2 * 4 + 3 = 11
        {"aggregation": "multi-krum", "multi-krum-keep": 11},
        {"aggregation": "trimmed-mean", "trim-fraction": 1 / 12},
        {"aggregation": "trimmed-mean", "num-malicious": 2, "trim-fraction": 2 / 12},
        {"aggregation": "median", "num-malicious": 5},  # 2 * 5 + 1 = 11
    ):
        check_sample(AppConfig.from_run_config({**default_run_config(), **settings}), 50)


@pytest.mark.parametrize("aggregation", ["fedavg, unbounded", "fedavg", *ROBUST])
def test_each_aggregation_against_one_update_scaled_a_hundredfold(tmp_path, aggregation):
    # 7 nodes all train: Bulyan with num-malicious=1 needs 4f + 3 = 7 replies.
    rule, _, unbounded = aggregation.partition(", ")
    config = config_for(
        aggregation=rule,
        update_norm_bound=0.0 if unbounded else 2.0,
        num_server_rounds=1,
        fraction_train=1.0,
        trim_fraction=0.2,
    )
    check_federation(config, 7)
    start = ArrayRecord(Net().state_dict())
    result = run_rounds(tmp_path, config, ScriptedGrid(7, honest_but_node_1(1.0)), initial=start)
    shift = mean_shift(start, result.arrays)
    if unbounded:  # (1.0 + six honest ~0.013) / 7 ~ 0.155
        assert shift > 0.1
    elif rule == "fedavg":  # node 1's update cut to 2 x the median, 0.013: (0.075 + 0.026) / 7
        assert shift == pytest.approx((0.075 + 2 * 0.013) / 7, rel=1e-4)
    else:  # node 1's cut update is 0.026; the honest ones 0.010..0.015
        expected = {
            "median": [0.013],  # the middle of the seven
            "trimmed-mean": [0.013],  # 0.011..0.015: one cut at each end
            "multi-krum": [0.0125],  # the six honest: all but the one farthest from the rest
            "krum": [0.012, 0.013],  # one honest update whole: these two tie as nearest the rest
            "bulyan": [0.012, 0.013],  # Krum's picks, trimmed around their median
        }[rule]
        assert any(shift == pytest.approx(value, rel=1e-4) for value in expected), shift


def test_under_fedavg_a_row_count_weighs_no_more_than_its_round_allows(tmp_path):
    """Node 1 claims a million rows against the others' 10: it is used, weighing 3 x 10,
    its update cut to 2 x the median (0.013 a weight)."""
    config = config_for(num_server_rounds=1, fraction_train=1.0)
    start = ArrayRecord(Net().state_dict())
    grid = ScriptedGrid(7, honest_but_node_1(1.0, attack_rows=10**6))
    shift = mean_shift(start, run_rounds(tmp_path, config, grid, initial=start).arrays)
    assert shift == pytest.approx((10 * 0.075 + 30 * 2 * 0.013) / (60 + 30), rel=1e-4)
    assert results_of(tmp_path)[0]["replies"]["train"] | {"expected": 7} == {
        "expected": 7, "received": 7, "failed": 0, "dropped": 0, "clipped": 1, "capped": 1
    }  # fmt: skip
    (tmp_path / "beyond").mkdir()  # more than any client could hold: left out
    run_rounds(tmp_path / "beyond", config, ScriptedGrid(7, honest_but_node_1(1.0, attack_rows=10**15)))
    assert results_of(tmp_path / "beyond")[0]["replies"]["train"]["dropped"] == 1


def test_an_honest_reply_is_used_whatever_rows_the_server_expected(tmp_path):
    """The server computes no member's partition: SuperNodes cut into 2 partitions while
    the ServerApp counts 3 (or holding their own data) hold more rows than it would
    guess, and every reply is used."""
    config = config_for(num_server_rounds=1, fraction_train=1.0)

    def big_partitions(server_round, message):
        content = trained(message)
        if is_train(message):
            content["metrics"]["num-examples"] = 1500 + message.metadata.dst_node_id
        return content

    run_rounds(tmp_path, config, ScriptedGrid(3, big_partitions))
    assert results_of(tmp_path)[0]["replies"]["train"]["dropped"] == 0


def test_multi_krum_keeps_all_but_f_of_the_replies_that_came(tmp_path):
    def node_7_crashes(server_round, message):
        if is_train(message) and message.metadata.dst_node_id == 7:
            return RuntimeError("gone")
        return honest_but_node_1(1.0)(server_round, message)

    config = config_for(aggregation="multi-krum", num_server_rounds=1, fraction_train=1.0)
    start = ArrayRecord(Net().state_dict())
    result = run_rounds(tmp_path, config, ScriptedGrid(7, node_7_crashes), initial=start)
    assert 0.0099 < mean_shift(start, result.arrays) < 0.0161  # 6 came: 5 kept, the attacker not


def test_a_round_with_too_few_usable_replies_for_its_rule_trains_nothing_and_says_why(tmp_path, caplog):
    def nodes_6_and_7_crash(server_round, message):
        if is_train(message) and message.metadata.dst_node_id >= 6:
            return RuntimeError("gone")
        return trained(message)

    config = config_for(aggregation="bulyan", num_server_rounds=1, fraction_train=1.0)
    with (
        caplog.at_level(logging.WARNING, logger="flwr"),
        pytest.raises(RunFailed, match="needs 7 replies, 5"),
    ):
        run_rounds(tmp_path, config, ScriptedGrid(7, nodes_6_and_7_crash))
    assert (
        "Round 1 trained nothing ('bulyan' with num-malicious=1 needs 7 replies, 5 were usable)"
        in caplog.text
    )
    keep = config_for(aggregation="multi-krum", multi_krum_keep=5, num_server_rounds=1, fraction_train=1.0)
    (tmp_path / "keep").mkdir()
    with pytest.raises(RunFailed, match=r"'multi-krum' with num-malicious=1 needs 6 replies, 5 were usable"):
        run_rounds(tmp_path / "keep", keep, ScriptedGrid(7, nodes_6_and_7_crash))


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_a_per_weight_rule_short_of_a_majority_honest_trains_nothing(tmp_path, caplog, rule):
    """With num-malicious=2, median and trimmed-mean need 5 usable replies: of 2 left, the
    median would be the mean, and one reply of 2t - h would set the model to t."""

    def only_nodes_1_and_2_train(server_round, message):
        if is_train(message) and message.metadata.dst_node_id >= 3:
            return RuntimeError("gone")
        return trained(message)

    config = config_for(aggregation=rule, num_malicious=2, trim_fraction=0.4, num_server_rounds=1)
    config = dataclasses.replace(config, fraction_train=1.0)
    check_sample(config, 5)  # a round samples all 5: enough
    start = ArrayRecord(Net().state_dict())
    with caplog.at_level(logging.WARNING, logger="flwr"), pytest.raises(RunFailed):
        run_rounds(tmp_path, config, ScriptedGrid(5, only_nodes_1_and_2_train), initial=start)
    assert (
        f"Round 1 trained nothing ('{rule}' with num-malicious=2 needs 5 replies, 2 were usable)"
        in caplog.text
    )
    assert results_of(tmp_path)[0]["train_metrics_clientapp"] == {}
    saved = torch.load(tmp_path / "resume.pt", weights_only=True)["arrays"]
    assert all(torch.equal(saved[key], value) for key, value in start.to_torch_state_dict().items())


def test_trimmed_mean_that_cuts_fewer_than_num_malicious_in_a_round_trains_nothing(tmp_path, caplog):
    def node_7_crashes(server_round, message):
        return (
            RuntimeError("gone")
            if is_train(message) and message.metadata.dst_node_id == 7
            else trained(message)
        )

    # 7 sampled: 0.3 x 7 cuts 2 = num-malicious; of the 6 that came it cuts 1.
    config = config_for(aggregation="trimmed-mean", num_malicious=2, trim_fraction=0.3, fraction_train=1.0)
    check_sample(config, 7)
    with caplog.at_level(logging.WARNING, logger="flwr"), pytest.raises(RunFailed):
        run_rounds(
            tmp_path, dataclasses.replace(config, num_server_rounds=1), ScriptedGrid(7, node_7_crashes)
        )
    assert "trim-fraction=0.3 cuts 1 of 6 usable replies at each end, fewer than 2 (num-malicious=2" in (
        caplog.text
    )


def dp_config(**overrides):
    settings = {"fraction_train": 1.0, "dp_noise_multiplier": 1.0, "dp_clipping_norm": 0.5, **overrides}
    return config_for(**settings)


all_move_by_one = every_node_moves_the_model(by=1.0)


def test_dp_clips_each_update_and_averages_clients_equally(tmp_path):
    """Node n moves every weight by 0.001 * 10 ** (n - 1) and holds 100 * n rows: updates
    of norm 0.28 (under the clipping norm 0.5) to 283 (clipped to 0.5)."""

    def unlike_updates(server_round, message):
        if not is_train(message):
            return trained(message)
        node = message.metadata.dst_node_id
        content = shifted(message, 0.001 * 10 ** (node - 1))
        content["metrics"]["num-examples"] = 100 * node
        return content

    start = ArrayRecord(Net().state_dict())
    config = dp_config(dp_noise_multiplier=1e-9, num_server_rounds=1)  # noise too small to see
    result = run_rounds(tmp_path, config, ScriptedGrid(4, unlike_updates), initial=start)
    before, after = start.to_torch_state_dict(), result.arrays.to_torch_state_dict()
    moved = torch.cat([(after[key] - before[key]).flatten() for key in before])
    size = moved.numel() ** 0.5  # the norm of a shift by 1 of every weight
    clipped = [min(0.001 * 10 ** (node - 1), 0.5 / size) for node in (1, 2, 3, 4)]
    torch.testing.assert_close(moved, torch.full_like(moved, sum(clipped) / 4), rtol=1e-4, atol=1e-7)


def test_dp_noise_has_the_multiplier_times_the_norm_over_the_clients_sampled(tmp_path):
    # 8 SuperNodes, half sampled: 4 clients, each sending the model back unchanged.
    config = dp_config(fraction_train=0.5, dp_noise_multiplier=1.0, dp_clipping_norm=0.5, num_server_rounds=1)
    start = ArrayRecord(Net().state_dict())
    result = run_rounds(tmp_path, config, ScriptedGrid(8, lambda _, message: trained(message)), initial=start)
    before, after = start.to_torch_state_dict(), result.arrays.to_torch_state_dict()
    noise = torch.cat([(after[key] - before[key]).flatten() for key in before]).double()
    # About 80,000 draws: their spread is within 1% of the true one.
    assert noise.std().item() == pytest.approx(1.0 * 0.5 / 4, rel=0.02)
    assert abs(noise.mean().item()) < 0.01


def epsilons(results: list[dict]) -> list[float]:
    return [entry["privacy"]["epsilon"] for entry in results]


def test_dp_epsilon_is_the_gaussian_at_half_the_multiplier_composed_each_round(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="flwr"):
        run_rounds(tmp_path, dp_config(), ScriptedGrid(4, all_move_by_one))
    results = results_of(tmp_path)
    assert [entry["privacy"]["releases"] for entry in results] == [1, 2, 3]
    assert all(entry["privacy"]["delta"] == 1e-5 for entry in results)
    # Independently: a Gaussian of noise multiplier 1 on a sum whose sensitivity is 2C
    # (one sampled update replaced by another) is multiplier 0.5, composed per round.
    for releases, epsilon in enumerate(epsilons(results), start=1):
        accountant = rdp.RdpAccountant()
        accountant.compose(dp_event.GaussianDpEvent(0.5), releases)
        assert epsilon == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert re.search(r"Round 3/3: .* \| epsilon [\d.]+ \(delta 1e-05\)", caplog.text)


def test_a_resumed_dp_run_goes_on_from_the_epsilon_it_spent(tmp_path):
    run_rounds(tmp_path, dp_config(), ScriptedGrid(4, all_move_by_one))
    fresh = epsilons(results_of(tmp_path))
    (tmp_path / "resumed").mkdir()
    run_rounds(
        tmp_path / "resumed", dp_config(), ScriptedGrid(4, all_move_by_one), first_round=3, privacy_releases=2
    )
    resumed = results_of(tmp_path / "resumed")
    assert resumed[0]["privacy"]["releases"] == 3
    assert resumed[0]["privacy"]["epsilon"] == pytest.approx(fresh[2])


def test_dp_max_epsilon_ends_the_run_before_the_round_that_would_pass_it(tmp_path, caplog):
    (tmp_path / "all").mkdir()
    run_rounds(tmp_path / "all", dp_config(), ScriptedGrid(4, all_move_by_one))
    first_three = epsilons(results_of(tmp_path / "all"))
    limit = (first_three[1] + first_three[2]) / 2  # round 2 fits, round 3 would not
    with caplog.at_level(logging.WARNING, logger="flwr"):
        run_rounds(
            tmp_path, dp_config(dp_max_epsilon=limit, num_server_rounds=5), ScriptedGrid(4, all_move_by_one)
        )
    results = results_of(tmp_path)
    assert [entry["round"] for entry in results] == [1, 2]
    assert epsilons(results)[-1] <= limit
    assert "Round 3 not run, so the run ends here" in caplog.text
    assert (tmp_path / "final_model.pt").exists()


def test_a_dp_reply_left_out_counts_as_a_zero_update_and_the_round_goes_on(tmp_path):
    def node_2_sends_an_extra_key(server_round, message):
        content = shifted(message, 1e-6) if is_train(message) else trained(message)  # under the norm
        if is_train(message) and message.metadata.dst_node_id == 2:
            content["metrics"]["extra"] = 1.0
        return content

    start = ArrayRecord(Net().state_dict())
    config = dp_config(dp_noise_multiplier=1e-9, num_server_rounds=1)  # noise too small to see
    result = run_rounds(tmp_path, config, ScriptedGrid(4, node_2_sends_an_extra_key), initial=start)
    # Three of the four sampled moved every weight by 1e-6, the fourth adds nothing.
    assert mean_shift(start, result.arrays) == pytest.approx(3 / 4 * 1e-6, rel=1e-3)
    [entry] = results_of(tmp_path)
    assert entry["replies"]["train"]["dropped"] == 1 and entry["privacy"]["releases"] == 1


def test_settings_a_federation_cannot_serve_are_refused_in_one_line():
    with pytest.raises(
        ConfigError, match=r"'bulyan' with num-malicious=3 needs at least 15 replies a round, but"
    ):
        check_federation(config_for(aggregation="bulyan", num_malicious=3), 50)
    check_federation(config_for(aggregation="bulyan", num_malicious=2), 50)  # 12 sampled >= 11
    with pytest.raises(
        ConfigError, match=r"'dp-noise-multiplier' > 0 .* 1 SuperNode\(s\) are connected: start 2"
    ):
        check_federation(dp_config(), 1)
    with pytest.raises(
        ConfigError, match=r"'dp-max-epsilon' = 1 leaves no round to run: epsilon is 0 after 0"
    ):
        PrivacyLedger(dp_config(dp_max_epsilon=1.0), None, 4)
    two_rounds = PrivacyLedger(dp_config(), None, 4, releases=2).spent()["epsilon"]
    with pytest.raises(ConfigError, match=rf"leaves no round to run: epsilon is {two_rounds:.3g} after 2"):
        PrivacyLedger(dp_config(dp_max_epsilon=two_rounds + 0.1), None, 4, releases=2)


def test_dp_samples_the_same_number_of_clients_as_supernodes_come_and_go():
    grid = ScriptedGrid(4, all_move_by_one)
    strategy = build_strategy(dp_config(), 4)
    sampled = []
    for server_round, nodes in ((1, [1, 2, 3, 4]), (2, [1, 2, 3, 4, 5, 6]), (3, [2, 3, 4, 5])):
        grid.node_ids = nodes
        arrays = ArrayRecord(Net().state_dict())
        sampled.append(len(list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))))
    assert sampled == [4, 4, 4]


def test_a_dp_release_is_saved_before_the_round_is_evaluated(tmp_path):
    """A run killed while its clients evaluate: resuming it must count that round's release."""

    def killed_in_round_2_evaluation(server_round, message):
        if server_round == 2 and not is_train(message):
            raise KeyboardInterrupt
        return all_move_by_one(server_round, message)

    with pytest.raises(KeyboardInterrupt):
        run_rounds(tmp_path, dp_config(), ScriptedGrid(4, killed_in_round_2_evaluation))
    saved = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert (saved["round"], saved["privacy_releases"]) == (1, 2)


@pytest.mark.parametrize("overrides", [{}, {"aggregation": "median"}, {"dp_noise_multiplier": 1e-9}])
def test_no_rule_records_a_mean_of_row_counts_as_a_row_count(tmp_path, overrides):
    """Replies of 100 to 400 rows: under rules that weigh every reply the same, Flower's
    mean would record 250.0 "num-examples"; FedAvg, which weighs by them, records none."""

    def rows_by_node(server_round, message):
        content = trained(message)
        if is_train(message):
            content["metrics"]["num-examples"] = 100 * message.metadata.dst_node_id
        return content

    config = config_for(num_server_rounds=1, fraction_train=1.0, **overrides)
    result = run_rounds(tmp_path, config, ScriptedGrid(4, rows_by_node))
    assert set(result.train_metrics_clientapp[1]) == {"train_loss"}


def sampled_epsilon(population: int, sample: int, credited: int, plain: int, sigma: float = 1.0) -> float:
    """Google's dp_accounting, independently of the app: `credited` rounds of a uniform
    `sample` of `population` without replacement and `plain` rounds of the Gaussian alone,
    each at sigma / 2 (one update replaced by another moves the sum by 2C)."""
    accountant = rdp.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    gaussian = dp_event.GaussianDpEvent(sigma / 2)
    if credited:
        accountant.compose(dp_event.SampledWithoutReplacementDpEvent(population, sample, gaussian), credited)
    if plain:
        accountant.compose(gaussian, plain)
    return accountant.get_epsilon(1e-5)


def test_with_the_population_declared_epsilon_credits_each_rounds_uniform_sample(tmp_path, caplog):
    config = dp_config(fraction_train=0.5, dp_population=8)  # 4 of 8 a round
    with caplog.at_level(logging.INFO, logger="flwr"):
        run_rounds(tmp_path, config, ScriptedGrid(8, all_move_by_one))
    results = results_of(tmp_path)
    assert [entry["privacy"]["credited"] for entry in results] == [1, 2, 3]
    for releases, epsilon in enumerate(epsilons(results), start=1):
        assert epsilon == pytest.approx(sampled_epsilon(8, 4, releases, 0), rel=1e-9)
    assert epsilons(results)[-1] < sampled_epsilon(8, 4, 0, 3)  # (little, at half the population a round)


class LosesANodeInRound2(ScriptedGrid):
    """8 SuperNodes, but 7 while round 2's sample is drawn."""

    def __init__(self) -> None:
        super().__init__(8, self.moved)

    def moved(self, server_round, message):
        if not is_train(message):  # after a round's train phase, the count for the next one
            self.node_ids = list(range(1, 8)) if server_round == 1 else list(range(1, 9))
        return all_move_by_one(server_round, message)


def test_a_round_drawn_from_other_supernodes_than_the_declared_population_is_not_credited(tmp_path):
    run_rounds(tmp_path, dp_config(fraction_train=0.5, dp_population=8), LosesANodeInRound2())
    results = results_of(tmp_path)
    assert [entry["privacy"]["credited"] for entry in results] == [1, 1, 2]
    expected = [sampled_epsilon(8, 4, 1, 0), sampled_epsilon(8, 4, 1, 1), sampled_epsilon(8, 4, 2, 1)]
    assert epsilons(results) == pytest.approx(expected, rel=1e-9)


def test_without_a_declared_population_no_round_is_credited(tmp_path):
    run_rounds(tmp_path, dp_config(fraction_train=0.5), ScriptedGrid(8, all_move_by_one))
    results = results_of(tmp_path)
    assert [entry["privacy"]["credited"] for entry in results] == [0, 0, 0]
    assert epsilons(results) == pytest.approx([sampled_epsilon(8, 4, 0, n) for n in (1, 2, 3)], rel=1e-9)


def shift_by_node(shifts: dict[int, float]):
    """Node n moves every weight by `shifts[n]` (evaluate replies as trained)."""

    def answer(server_round, message):
        if not is_train(message):
            return trained(message)
        return shifted(message, shifts[message.metadata.dst_node_id])

    return answer


@pytest.mark.parametrize(("trim_fraction", "kept"), [(0.1, range(2, 10)), (0.3, range(4, 8))])
def test_trimmed_mean_cuts_trim_fraction_of_the_replies_at_each_end(tmp_path, trim_fraction, kept):
    """Node k of 10 moves every weight by k^2 x 1e-5: the trimmed mean is the mean of the
    kept nodes' shifts, so each trim-fraction gives its own (the bound off: it would cut
    the largest)."""
    config = config_for(aggregation="trimmed-mean", trim_fraction=trim_fraction, update_norm_bound=0.0,
                        num_server_rounds=1, fraction_train=1.0)  # fmt: skip
    start = ArrayRecord(Net().state_dict())
    shifts = {k: k * k * 1e-5 for k in range(1, 11)}
    result = run_rounds(tmp_path, config, ScriptedGrid(10, shift_by_node(shifts)), initial=start)
    expected = sum(shifts[k] for k in kept) / len(kept)
    assert mean_shift(start, result.arrays) == pytest.approx(expected, rel=1e-4)


def test_krum_takes_one_reply_whole_where_multi_krum_averages(tmp_path):
    """7 nodes move every weight by 0, 10, 17, 20, 22, 30, 40 (x 1e-5): the sums of squared
    distances to their 4 nearest rank 20 first (213), then 22 (237) and 17 (252), no tie.
    Krum takes 20 whole; Multi-Krum keeping 3 averages 20, 22 and 17."""
    shifts = {
        node: shift * 1e-5 for node, shift in zip(range(1, 8), (0, 10, 17, 20, 22, 30, 40), strict=True)
    }
    start = ArrayRecord(Net().state_dict())
    moved = {}
    for rule in ("krum", "multi-krum"):
        (tmp_path / rule).mkdir()
        config = config_for(aggregation=rule, num_server_rounds=1, fraction_train=1.0, multi_krum_keep=3)
        result = run_rounds(tmp_path / rule, config, ScriptedGrid(7, shift_by_node(shifts)), initial=start)
        moved[rule] = mean_shift(start, result.arrays)
    assert moved["krum"] == pytest.approx(20e-5, rel=1e-4)
    assert moved["multi-krum"] == pytest.approx((20e-5 + 22e-5 + 17e-5) / 3, rel=1e-4)


# Adaptive clipping (dp-clipping-quantile): the norm follows a quantile of the updates'.


def adaptive(**overrides) -> AppConfig:
    return dp_config(**{"dp_clipping_quantile": 0.5, "dp_noise_multiplier": 0.1, **overrides})


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.9])
def test_adaptive_clipping_settles_at_the_quantile_of_fixed_update_norms(quantile):
    """20 clients a round whose updates' norms are 1 to 20, from a norm of 100: the norm
    falls, then holds where about `quantile` of the updates are within it."""
    np.random.seed(0)
    norms = np.arange(1, 21)
    clipping = Clipping(adaptive(dp_clipping_quantile=quantile, dp_clipping_norm=100.0), sample_size=20)
    within = []
    for _ in range(300):
        clipping.clipped(within=int((norms <= clipping.norm).sum()))
        clipping.follow()
        within.append(float((norms <= clipping.norm).mean()))
    assert np.mean(within[100:]) == pytest.approx(quantile, abs=0.1)


def test_adaptive_clipping_costs_no_more_epsilon_than_the_fixed_norm():
    """The count the norm follows takes noise m / 20 of its own, and the updates' mean a
    multiplier that much higher: together, the fixed norm's Gaussian of sigma / 2."""
    clipping = Clipping(adaptive(dp_noise_multiplier=1.0), sample_size=100)
    assert (clipping.count_std, clipping.noise_multiplier) == (5.0, pytest.approx((1 - 0.01) ** -0.5))

    def epsilon(*events) -> float:
        accountant = rdp.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
        for event in events:
            accountant.compose(event, 30)
        return accountant.get_epsilon(1e-5)

    # One client replaced moves the sum of updates by 2C and the count by 1.
    both = epsilon(dp_event.GaussianDpEvent(clipping.noise_multiplier / 2), dp_event.GaussianDpEvent(5.0))
    assert both == pytest.approx(epsilon(dp_event.GaussianDpEvent(0.5)), rel=1e-6)
    with pytest.raises(
        ConfigError, match=r"'dp-clipping-quantile' = 0.5 needs dp-noise-multiplier below 0.4 with 4"
    ):
        Clipping(adaptive(dp_noise_multiplier=0.5), sample_size=4)
    with pytest.raises(ConfigError, match=r"'dp-clipping-quantile' = 0.5 adapts DP's clipping norm while"):
        AppConfig.from_run_config({**default_run_config(), "dp-clipping-quantile": 0.5})


def test_adaptive_noise_has_its_higher_multiplier_times_the_rounds_norm(tmp_path):
    config = adaptive(num_server_rounds=1, dp_noise_multiplier=1.0, dp_clipping_norm=0.5)
    start = ArrayRecord(Net().state_dict())
    result = run_rounds(
        tmp_path, config, ScriptedGrid(20, lambda _, message: trained(message)), initial=start
    )
    before, after = start.to_torch_state_dict(), result.arrays.to_torch_state_dict()
    noise = torch.cat([(after[key] - before[key]).flatten() for key in before]).double()
    multiplier = (1.0 - 1.0 / 4) ** -0.5  # sigma 1 beside a count noise of 20 / 20
    assert noise.std().item() == pytest.approx(multiplier * 0.5 / 20, rel=0.02)


def test_each_rounds_norm_is_recorded_and_a_resumed_run_goes_on_from_the_next(tmp_path):
    """Every update is far longer than the norm: it grows each round, by exp(0.2 x 0.5)
    give or take the count's noise; a resumed run clips at the norm its folder saved."""
    run_rounds(tmp_path, adaptive(), ScriptedGrid(4, all_move_by_one))
    norms = [entry["privacy"]["clipping_norm"] for entry in results_of(tmp_path)]
    assert norms[0] == 0.5 and norms[0] < norms[1] < norms[2]
    saved = torch.load(tmp_path / "resume.pt", weights_only=True)["dp_clipping_norm"]
    assert saved > norms[2]
    (tmp_path / "resumed").mkdir()
    run_rounds(tmp_path / "resumed", adaptive(num_server_rounds=4), ScriptedGrid(4, all_move_by_one),
               first_round=4, privacy_releases=3, clipping_norm=saved)  # fmt: skip
    assert results_of(tmp_path / "resumed")[0]["privacy"]["clipping_norm"] == saved


def test_a_resumed_run_clips_at_the_norm_its_folder_saved(tmp_path):
    outputs = RunOutputs(tmp_path, {}, wandb_project=None)
    outputs.state.dp_clipping_norm = 0.37
    ledger = run_ledger(adaptive(), ScriptedGrid(4, all_move_by_one), 4, outputs)
    assert ledger.clipping.norm == 0.37
    assert run_ledger(adaptive(), ScriptedGrid(4, all_move_by_one), 4).clipping.norm == 0.5
