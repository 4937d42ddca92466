"""End to end: the real `flwr run` on a real SuperLink with the Simulation Engine."""

import re

import pytest
import torch
from dp_accounting import dp_event, rdp
from dp_accounting.privacy_accountant import NeighboringRelation

from harness.attacks import ATTACK_RUN_CONFIG, ATTACKS_CLIENT_APP
from harness.flower_processes import copy_app, trained_rounds
from harness.sent_log import SENT_LOG_CLIENT_APP, read_sent_log
from pytorch_example.task import HEAD_KEYS, Net

pytestmark = pytest.mark.e2e


def test_what_leaves_a_client_is_what_personalisation_says(superlink, idx_dataset, tmp_path, base_run_config):
    """Each reply as the ClientApp hands it to its SuperNode, recorded by a Flower mod:
    with private-head, whose replies differ most from the published example's (the other
    two send the whole model, as test_client_app checks of each)."""
    cache = tmp_path / "cache"
    run_config = {
        "num-server-rounds": 1,
        "fraction-train": 0.5,
        "fraction-evaluate": 1.0,
        "personalisation": "private-head",
        **base_run_config,
    }
    app = copy_app(tmp_path / "app", client_app=SENT_LOG_CLIENT_APP)
    log, record = superlink.run(app, run_config, federation_config={"num-supernodes": 4})
    assert record["status"] == "finished:completed", log

    sent = read_sent_log(cache)
    model_keys = set(Net().state_dict())
    train_arrays = model_keys - set(HEAD_KEYS)  # the body only
    trains = [reply for reply in sent if reply["type"] == "train"]
    evaluates = [reply for reply in sent if reply["type"] == "evaluate"]
    assert len(trains) == 2 and len(evaluates) == 4
    for reply in trains:
        assert reply["records"]["arrays"] == ["ArrayRecord", sorted(train_arrays)]
        assert reply["records"]["metrics"][0] == "MetricRecord" and set(reply["records"]) == {
            "arrays",
            "metrics",
        }
    for reply in evaluates:
        assert set(reply["records"]) == {"metrics"}  # scores only, no model

    [run_dir] = [path for path in (tmp_path / "outputs").glob("*/*") if path.is_dir()]
    final = torch.load(run_dir / "final_model.pt", weights_only=True)
    torch.manual_seed(42)  # the run's seed: the initial model the ServerApp started from
    initial = Net().state_dict()
    assert all(torch.equal(final[key], initial[key]) for key in HEAD_KEYS)  # no client sent one
    assert not torch.equal(final["fc1.weight"], initial["fc1.weight"])
    # The clients keep their heads on disk: all four refit one when they evaluate.
    assert len(list((cache / "heads").glob("*/partition-*-of-4.pt"))) == 4


def test_bad_flag_fails_the_run_with_one_line(superlink, app_dir, tmp_path):
    output_dir = tmp_path / "outputs"
    log, record = superlink.run(
        app_dir,
        {"fraction-train": 1.5, "output-dir": str(output_dir)},
        federation_config={"num-supernodes": 2},
    )
    assert record["status"] == "finished:failed"
    assert "'fraction-train' = 1.5 is invalid" in record["status-details"]
    # The reason, with no traceback, is the last line before Flower's own exit lines.
    lines = [line for line in log.splitlines() if line.strip()]
    exit_line = next(index for index, line in enumerate(lines) if "Exit Code: 700" in line)
    reason = lines[exit_line - 1]
    assert "ConfigError: run-config key 'fraction-train' = 1.5 is invalid" in reason, lines[: exit_line + 1]
    assert "Traceback" not in log
    assert not output_dir.exists()


def results_of(output_dir) -> list[dict]:
    [results_file] = output_dir.glob("*/*/results.json")
    return trained_rounds(results_file)


def test_one_supernode_cannot_end_or_set_the_default_run_by_what_it_sends(
    superlink, tmp_path, base_run_config
):
    """6 SuperNodes all train under the default aggregation. In the attacked run,
    partition 0 sends, every round, its trained weights x 1e30 (finite: the gate's checks
    pass them) and partition 1 a replacement that a plain weighted mean turns into a zero
    model. The control is an honest run of the same seed. Without the bound, measured:
    either alone ends the run (the aggregate is huge, then every client trains to NaN) or
    leaves it at chance. With it, the attackers delay learning (early rounds lag the
    honest run's) but cannot stop it: by round 6 the honest run has learnt, and the
    attacked one with it."""
    app = copy_app(tmp_path / "app", client_app=ATTACKS_CLIENT_APP, extra_config=ATTACK_RUN_CONFIG)
    final_accuracy = {}
    for attack in ("honest", "0:huge-weights,1:replacement"):
        output_dir = tmp_path / attack.replace(":", "-").replace(",", "_")
        run_config = {
            "num-server-rounds": 6,
            "fraction-train": 1.0,
            "fraction-evaluate": 0.0,
            **base_run_config,
            "output-dir": str(output_dir),
        }
        if attack != "honest":
            run_config["attack-partitions"] = attack
        log, record = superlink.run(app, run_config, federation_config={"num-supernodes": 6})
        assert record["status"] == "finished:completed", log
        results = results_of(output_dir)
        assert [entry["round"] for entry in results] == [1, 2, 3, 4, 5, 6]
        clipped = [entry["replies"]["train"]["clipped"] for entry in results]
        if attack != "honest":  # every round, both attackers' updates were cut to the bound
            assert all(count >= 2 for count in clipped), results
            assert "each update's norm at most 2 x the round's median (update-norm-bound)" in log
        final_accuracy[attack] = results[-1]["evaluate_metrics_serverapp"]["accuracy"]
    assert final_accuracy["honest"] > 0.8, final_accuracy  # the control learned: there is a gap to lose
    assert final_accuracy["0:huge-weights,1:replacement"] >= final_accuracy["honest"] - 0.10, final_accuracy


def epsilon_after(releases: int, noise_multiplier: float, delta: float) -> float:
    """Google's dp_accounting, independently of the app, after `releases` rounds that each
    sample 2 of a simulation's 4 SuperNodes: the sample credited (the population is the
    simulation's, fixed), the noise sigma x C on a sum one client can move by 2C."""
    accountant = rdp.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    sampled = dp_event.SampledWithoutReplacementDpEvent(4, 2, dp_event.GaussianDpEvent(noise_multiplier / 2))
    accountant.compose(sampled, releases)
    return float(accountant.get_epsilon(delta))


def test_a_dp_run_reports_epsilon_each_round_and_stops_at_its_budget(
    superlink, app_dir, tmp_path, base_run_config
):
    budget = (epsilon_after(2, 1.0, 1e-5) + epsilon_after(3, 1.0, 1e-5)) / 2  # fits 2 rounds, not 3
    output_dir = tmp_path / "outputs"
    run_config = {**base_run_config, "num-server-rounds": 4, "fraction-train": 0.5, "fraction-evaluate": 0.5}
    # Noise of 1 x clipping norm / 2 clients per weight: at a norm of 1 it wrecks the model
    # in one round and the clients diverge; epsilon does not depend on the norm.
    run_config |= {"dp-noise-multiplier": 1.0, "dp-clipping-norm": 0.01, "dp-max-epsilon": budget}
    # DP-FedAvgM: the server's momentum steps on the released models only, at no epsilon.
    run_config |= {"server-learning-rate": 0.5, "server-momentum": 0.9}
    log, record = superlink.run(app_dir, run_config, federation_config={"num-supernodes": 4})
    assert record["status"] == "finished:completed", log
    assert "DP's epsilon: sampling credited: a uniform 2 of a fixed population of 4 SuperNodes" in log
    results = results_of(output_dir)
    assert [entry["round"] for entry in results] == [1, 2]
    epsilons = [entry["privacy"]["epsilon"] for entry in results]
    assert epsilons == pytest.approx([epsilon_after(1, 1.0, 1e-5), epsilon_after(2, 1.0, 1e-5)])
    assert epsilons[0] < epsilons[1] <= budget
    assert re.search(r"Round 2/4: .* \| epsilon [\d.]+ \(delta 1e-05, sampling credited\)", log)
    # What epsilon means, said where DP is said to be on.
    assert "the epsilon each round reports is all this run has spent, and smaller is more private" in log
    assert "Round 3 not run, so the run ends here" in log
    assert "Server step: SGD on model minus aggregate, learning rate 0.5, momentum 0.9" in log
    run_dir = next(output_dir.glob("*/*"))
    assert (run_dir / "final_model.pt").exists()
    velocity = torch.load(run_dir / "resume.pt", weights_only=True)["server_velocity"]
    assert velocity.keys() == Net().state_dict().keys() and all(v.abs().sum() > 0 for v in velocity.values())
