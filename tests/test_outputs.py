"""What a run leaves behind: results.json, checkpoints, config.json and W&B."""

import json

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Result

from harness.flower_processes import default_run_config
from harness.wandb_offline import read_offline_run
from pytorch_example.config import AppConfig
from pytorch_example.outputs import ResumeError, RunOutputs, continued_run_config, load_resume_state
from pytorch_example.task import Net


def result_after_round(result: Result, server_round: int, accuracy: float) -> Result:
    result.arrays = ArrayRecord(Net().state_dict())
    result.train_metrics_clientapp[server_round] = MetricRecord({"train_loss": 2.0 - server_round})
    result.evaluate_metrics_clientapp[server_round] = MetricRecord(
        {
            "eval_loss": 1.5,
            "eval_acc": 0.4,
            "eval_loss_global": 1.9,
            "eval_acc_global": 0.3,
            "eval_acc_min": 0.1,
            "eval_acc_median": 0.45,
            "eval_acc_max": 0.7,
            "eval_acc_std": 0.2,
        }
    )
    result.evaluate_metrics_serverapp[server_round] = MetricRecord({"accuracy": accuracy, "loss": 1.2})
    return result


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """No credentials anywhere and no terminal to prompt on."""
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))
    monkeypatch.setattr("sys.stdin", None)


def test_config_json_is_written_on_entry(tmp_path):
    with RunOutputs(tmp_path, {"num-server-rounds": 2}, wandb_project=None):
        assert json.loads((tmp_path / "config.json").read_text()) == {"num-server-rounds": 2}


def test_results_json_has_the_reference_shape_after_every_round(tmp_path):
    outputs = RunOutputs(tmp_path, {}, wandb_project=None)
    result = Result()
    for server_round, accuracy in ((1, 0.3), (2, 0.5)):
        outputs.record_round(server_round, result_after_round(result, server_round, accuracy), 0.1)
        saved = json.loads((tmp_path / "results.json").read_text())
        assert len(saved) == server_round
    assert saved[1] == {
        "round": 2,
        "learning_rate": 0.1,
        "replies": {},
        "train_metrics": {"train_loss": 0.0},
        "evaluate_metrics_clientapp": dict(result.evaluate_metrics_clientapp[2]),
        "evaluate_metrics_serverapp": {"accuracy": 0.5, "loss": 1.2},
    }
    assert saved[1]["evaluate_metrics_clientapp"]["eval_acc_global"] == 0.3


def test_checkpoint_only_on_a_new_best_central_accuracy(tmp_path):
    outputs = RunOutputs(tmp_path, {}, wandb_project=None)
    result = Result()
    arrays_by_round = {}
    for server_round, accuracy in ((1, 0.3), (2, 0.2), (3, 0.6), (4, 0.6)):
        outputs.record_round(server_round, result_after_round(result, server_round, accuracy), 0.1)
        arrays_by_round[server_round] = result.arrays.to_torch_state_dict()
    names = sorted(path.name for path in tmp_path.glob("best_model_*.pt"))
    assert names == ["best_model_round_1_acc_0.3000.pt", "best_model_round_3_acc_0.6000.pt"]
    saved = torch.load(tmp_path / names[-1], weights_only=True)
    for name, value in arrays_by_round[3].items():
        torch.testing.assert_close(saved[name], value)
    assert outputs.state.best_accuracy == 0.6


def test_round_without_central_evaluation_saves_no_checkpoint(tmp_path):
    outputs = RunOutputs(tmp_path, {}, wandb_project=None)
    result = Result(arrays=ArrayRecord(Net().state_dict()))
    result.train_metrics_clientapp[1] = MetricRecord({"train_loss": 1.0})
    outputs.record_round(1, result, 0.1)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved[0]["evaluate_metrics_serverapp"] == {}
    assert not list(tmp_path.glob("best_model_*.pt"))


def test_wandb_run_holds_config_series_summary_and_best_model(tmp_path, offline_wandb):
    run_config = {"num-server-rounds": 3, "dirichlet-alpha": 1.0}
    with RunOutputs(tmp_path, run_config, "pytorch-example-tests") as outputs:
        assert outputs.wandb_run.settings.mode == "offline"
        result = Result()
        for server_round, accuracy in ((1, 0.3), (2, 0.6), (3, 0.5)):
            outputs.record_round(server_round, result_after_round(result, server_round, accuracy), 0.1)
    [run_folder] = (tmp_path / "wandb").glob("offline-run-*")
    run = read_offline_run(run_folder)
    assert run.exit_code == 0
    assert {key: run.config[key] for key in run_config} == run_config
    assert [row["_step"] for row in run.history] == [1, 2, 3]
    assert {name: value for name, value in run.history[1].items() if not name.startswith("_")} == {
        "learning_rate": 0.1,
        "train_loss": pytest.approx(0.0),
        "federated_evaluate_loss": 1.5,
        "federated_evaluate_accuracy": 0.4,
        "federated_evaluate_loss_global_head": 1.9,
        "federated_evaluate_accuracy_global_head": 0.3,
        "federated_evaluate_accuracy_min": 0.1,
        "federated_evaluate_accuracy_median": 0.45,
        "federated_evaluate_accuracy_max": 0.7,
        "federated_evaluate_accuracy_std": 0.2,
        "centralized_accuracy": 0.6,
        "centralized_loss": 1.2,
    }
    assert run.summary["best_centralized_accuracy"] == 0.6
    assert run.summary["best_centralized_accuracy_round"] == 2
    [artifact] = run.artifacts
    assert artifact["type"] == "model" and "best" in artifact["aliases"]
    assert artifact["files"] == ["best_model_round_2_acc_0.6000.pt"]
    assert artifact["metadata"] == {"accuracy": 0.6, "round": 2}


def test_figures_are_drawn_when_the_run_ends(tmp_path):
    with RunOutputs(tmp_path, {}, wandb_project=None) as outputs:
        result = Result()
        for server_round in (1, 2):
            outputs.record_round(server_round, result_after_round(result, server_round, 0.5), 0.1)
    for name in ("central.png", "personalisation.png", "learning_rate.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "error", [RuntimeError("round 3 broke"), KeyboardInterrupt()], ids=["crash", "interrupt"]
)
def test_a_run_that_ends_in_an_exception_is_a_failed_wandb_run(tmp_path, offline_wandb, error):
    with pytest.raises(type(error)), RunOutputs(tmp_path, {}, "pytorch-example-tests"):
        raise error
    [run_folder] = (tmp_path / "wandb").glob("offline-run-*")
    assert read_offline_run(run_folder).exit_code == 1


def test_an_error_in_wandb_finish_never_hides_the_run_error(tmp_path, offline_wandb, monkeypatch):
    outputs = RunOutputs(tmp_path, {}, "pytorch-example-tests")
    with pytest.raises(RuntimeError, match="the real failure"), outputs:
        real_finish = outputs.wandb_run.finish

        def broken_finish(exit_code):
            real_finish(exit_code=exit_code)
            raise OSError("disk full while finishing")

        monkeypatch.setattr(outputs.wandb_run, "finish", broken_finish)
        raise RuntimeError("the real failure")


def test_wandb_off_starts_no_run(tmp_path):
    with RunOutputs(tmp_path, {}, wandb_project=None) as outputs:
        assert outputs.wandb_run is None
    assert not (tmp_path / "wandb").exists()


MODEL_SHAPES = {key: tuple(value.shape) for key, value in Net().state_dict().items()}
SETTINGS = {"dataset-name": "zalando-datasets/fashion_mnist", "dirichlet-alpha": 1.0}


def test_every_round_leaves_what_a_restart_needs(tmp_path):
    with RunOutputs(tmp_path, {}, wandb_project=None, resume_settings=SETTINGS) as outputs:
        result = Result()
        for server_round, accuracy in ((1, 0.3), (2, 0.6), (3, 0.5)):
            outputs.record_round(server_round, result_after_round(result, server_round, accuracy), 0.1)
    state = load_resume_state(tmp_path, SETTINGS, MODEL_SHAPES)
    assert state.round == 3 and state.lineage == outputs.lineage
    assert (state.best_accuracy, state.best_round) == (0.6, 2)
    assert state.best_checkpoint == "best_model_round_2_acc_0.6000.pt"
    assert [entry["round"] for entry in state.round_results] == [1, 2, 3]
    for name, value in result.arrays.to_torch_state_dict().items():
        torch.testing.assert_close(state.arrays.to_torch_state_dict()[name], value)


def test_a_resumed_run_keeps_its_best_and_rewrites_results_from_its_state(tmp_path):
    with RunOutputs(tmp_path, {}, wandb_project=None, resume_settings=SETTINGS) as outputs:
        result = Result()
        for server_round, accuracy in ((1, 0.3), (2, 0.6)):
            outputs.record_round(server_round, result_after_round(result, server_round, accuracy), 0.1)
    # A crash after resume.pt but before results.json: the folder says one round less.
    (tmp_path / "results.json").write_text(
        json.dumps(json.loads((tmp_path / "results.json").read_text())[:1])
    )
    state = load_resume_state(tmp_path, SETTINGS, MODEL_SHAPES)
    with RunOutputs(tmp_path, {}, None, SETTINGS, resumed=state) as outputs:
        assert [entry["round"] for entry in json.loads((tmp_path / "results.json").read_text())] == [1, 2]
        outputs.record_round(3, result_after_round(Result(), 3, 0.5), 0.05)  # not a new best
    assert sorted(path.name for path in tmp_path.glob("best_model_*.pt")) == [
        "best_model_round_1_acc_0.3000.pt",
        "best_model_round_2_acc_0.6000.pt",
    ]
    assert [entry["round"] for entry in json.loads((tmp_path / "results.json").read_text())] == [1, 2, 3]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda run_dir: (run_dir / "resume.pt").unlink(), "holds no resume.pt"),
        (
            lambda run_dir: (run_dir / "resume.pt").write_bytes(b"not a checkpoint"),
            "resume.pt cannot be read",
        ),
    ],
    ids=["no state", "unreadable state"],
)
def test_a_folder_without_usable_state_is_refused(tmp_path, damage, message):
    with RunOutputs(tmp_path, {}, wandb_project=None, resume_settings=SETTINGS) as outputs:
        outputs.record_round(1, result_after_round(Result(), 1, 0.3), 0.1)
    damage(tmp_path)
    with pytest.raises(ResumeError, match=message):
        load_resume_state(tmp_path, SETTINGS, MODEL_SHAPES)


def test_other_data_settings_or_another_model_are_refused(tmp_path):
    with RunOutputs(tmp_path, {}, wandb_project=None, resume_settings=SETTINGS) as outputs:
        outputs.record_round(1, result_after_round(Result(), 1, 0.3), 0.1)
    with pytest.raises(
        ResumeError, match=r"other data, personalisation or privacy settings \(dirichlet-alpha was 1.0\)"
    ):
        load_resume_state(tmp_path, {**SETTINGS, "dirichlet-alpha": 0.5}, MODEL_SHAPES)
    with pytest.raises(ResumeError, match="its model is not this app's model"):
        load_resume_state(tmp_path, SETTINGS, {**MODEL_SHAPES, "fc2.weight": (20, 128)})


def test_a_folder_made_before_personalisation_existed_resumes_as_stored_head(tmp_path):
    # Its saved settings lack the key: it was run as the published example, stored heads.
    with RunOutputs(tmp_path, {}, wandb_project=None, resume_settings=SETTINGS) as outputs:
        outputs.record_round(1, result_after_round(Result(), 1, 0.3), 0.1)
    load_resume_state(tmp_path, {**SETTINGS, "personalisation": "stored-head"}, MODEL_SHAPES)
    with pytest.raises(ResumeError, match=r"personalisation was 'stored-head'"):
        load_resume_state(tmp_path, {**SETTINGS, "personalisation": "refit-head"}, MODEL_SHAPES)

    # `resume-from` alone takes the folder's settings, the legacy one included.
    (tmp_path / "config.json").write_text(json.dumps({"dirichlet-alpha": 1.0}))
    run_config = {**default_run_config(), "resume-from": str(tmp_path)}
    continued = continued_run_config(run_config, AppConfig.from_run_config(run_config))
    assert continued["personalisation"] == "stored-head"


def test_epsilon_is_recorded_each_round_and_a_resumed_run_counts_its_releases(tmp_path, offline_wandb):
    with RunOutputs(tmp_path, {}, "pytorch-example-tests", resume_settings=SETTINGS) as outputs:
        assert outputs.privacy_releases == 0
        for server_round, epsilon in ((1, 2.5), (2, 3.75)):
            privacy = {"epsilon": epsilon, "delta": 1e-5, "releases": server_round}
            outputs.record_round(
                server_round, result_after_round(Result(), server_round, 0.3), 0.1, {}, privacy
            )
    results = json.loads((tmp_path / "results.json").read_text())
    assert [entry["privacy"]["epsilon"] for entry in results] == [2.5, 3.75]
    [run_folder] = (tmp_path / "wandb").glob("offline-run-*")
    assert [row["privacy_epsilon"] for row in read_offline_run(run_folder).history] == [2.5, 3.75]
    state = load_resume_state(tmp_path, SETTINGS, MODEL_SHAPES)
    assert RunOutputs(tmp_path, {}, None, SETTINGS, resumed=state).privacy_releases == 2
