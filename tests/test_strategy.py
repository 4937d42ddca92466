"""The strategy's outputs: results.json, checkpoints, config.json and W&B."""

import json

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Result

from pytorch_example.strategy import CustomFedAvg
from pytorch_example.task import Net


def make_strategy(run_dir, wandb_project=None) -> CustomFedAvg:
    return CustomFedAvg(
        run_dir=run_dir,
        run_config={"num-server-rounds": 2},
        learning_rate_at=lambda server_round: 0.1,
        wandb_project=wandb_project,
        fraction_train=0.25,
    )


def result_after_round(result: Result, server_round: int, accuracy: float) -> Result:
    result.arrays = ArrayRecord(Net().state_dict())
    result.train_metrics_clientapp[server_round] = MetricRecord({"train_loss": 2.0 - server_round})
    result.evaluate_metrics_clientapp[server_round] = MetricRecord({"eval_loss": 1.5, "eval_acc": 0.4})
    result.evaluate_metrics_serverapp[server_round] = MetricRecord({"accuracy": accuracy, "loss": 1.2})
    return result


def test_results_json_has_the_reference_shape_after_every_round(tmp_path):
    strategy = make_strategy(tmp_path)
    result = Result()
    for server_round, accuracy in ((1, 0.3), (2, 0.5)):
        strategy._record_round(server_round, result_after_round(result, server_round, accuracy))
        saved = json.loads((tmp_path / "results.json").read_text())
        assert len(saved) == server_round
    assert saved[1] == {
        "round": 2,
        "train_metrics": {"train_loss": 0.0},
        "evaluate_metrics_clientapp": {"eval_loss": 1.5, "eval_acc": 0.4},
        "evaluate_metrics_serverapp": {"accuracy": 0.5, "loss": 1.2},
    }


def test_checkpoint_only_on_a_new_best_central_accuracy(tmp_path):
    strategy = make_strategy(tmp_path)
    result = Result()
    arrays_by_round = {}
    for server_round, accuracy in ((1, 0.3), (2, 0.2), (3, 0.6), (4, 0.6)):
        strategy._record_round(server_round, result_after_round(result, server_round, accuracy))
        arrays_by_round[server_round] = result.arrays.to_torch_state_dict()
    names = sorted(path.name for path in tmp_path.glob("best_model_*.pt"))
    assert names == ["best_model_round_1_acc_0.3000.pt", "best_model_round_3_acc_0.6000.pt"]
    saved = torch.load(tmp_path / names[-1], weights_only=True)
    for name, value in arrays_by_round[3].items():
        torch.testing.assert_close(saved[name], value)
    assert strategy.best_accuracy == 0.6


def test_round_without_central_evaluation_saves_no_checkpoint(tmp_path):
    strategy = make_strategy(tmp_path)
    result = Result(arrays=ArrayRecord(Net().state_dict()))
    result.train_metrics_clientapp[1] = MetricRecord({"train_loss": 1.0})
    strategy._record_round(1, result)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved[0]["evaluate_metrics_serverapp"] == {}
    assert not list(tmp_path.glob("best_model_*.pt"))


def test_wandb_without_credentials_logs_offline_and_never_prompts(tmp_path, monkeypatch):
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))
    monkeypatch.setattr("sys.stdin", None)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    strategy = make_strategy(run_dir, wandb_project="pytorch-example-tests")
    strategy.wandb_run = strategy._start_wandb()
    try:
        assert strategy.wandb_run.settings.mode == "offline"
        logged = []
        log_to_wandb = strategy.wandb_run.log
        monkeypatch.setattr(
            strategy.wandb_run, "log", lambda data, step: (logged.append((step, data)), log_to_wandb(data, step=step))
        )
        strategy._record_round(1, result_after_round(Result(), 1, 0.42))
        assert logged == [
            (
                1,
                {
                    "train_loss": pytest.approx(1.0),
                    "federated_evaluate_loss": 1.5,
                    "federated_evaluate_accuracy": 0.4,
                    "centralized_accuracy": 0.42,
                    "centralized_loss": 1.2,
                },
            )
        ]
    finally:
        strategy.wandb_run.finish()
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_wandb_off_starts_no_run(tmp_path):
    assert make_strategy(tmp_path)._start_wandb() is None
