"""What a run leaves behind: results.json, checkpoints, config.json and W&B."""

import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Result
from PIL import Image

from harness.flower_processes import default_run_config
from harness.wandb_offline import read_offline_run
from pytorch_example import plots
from pytorch_example.config import AppConfig, ConfigError
from pytorch_example.files import DEFAULT_CACHE_DIR
from pytorch_example.outputs import RunOutputs
from pytorch_example.plots import plot_run
from pytorch_example.run_files import LEGACY_SETTINGS, ResumeError, _best_problem, load_resume_state
from pytorch_example.run_folder import DP_ONLY, lock_run_folder, read_run_folder, resume_run, resume_settings
from pytorch_example.task import Net


def result_after_round(result: Result, server_round: int, accuracy: float) -> Result:
    result.arrays = ArrayRecord(Net().state_dict())
    result.train_metrics_clientapp[server_round] = MetricRecord({"train_loss": 2.0 / server_round})
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
        "train_metrics_clientapp": {"train_loss": 1.0},
        "evaluate_metrics_clientapp": dict(result.evaluate_metrics_clientapp[2]),
        "evaluate_metrics_serverapp": {"accuracy": 0.5, "loss": 1.2},
    }
    assert saved[1]["evaluate_metrics_clientapp"]["eval_acc_global"] == 0.3


def test_results_json_holds_no_float_noise(tmp_path):
    outputs = RunOutputs(tmp_path, {}, wandb_project=None)
    result = result_after_round(Result(), 1, 0.1 + 0.2)  # 0.30000000000000004
    result.evaluate_metrics_clientapp[1]["eval_acc_global"] = 0.9999999999999999  # a mean of 1.0s
    outputs.record_round(1, result, 0.1)
    [saved] = json.loads((tmp_path / "results.json").read_text())
    assert saved["evaluate_metrics_serverapp"]["accuracy"] == 0.3
    assert saved["evaluate_metrics_clientapp"]["eval_acc_global"] == 1.0
    assert saved["evaluate_metrics_clientapp"]["eval_acc_std"] == 0.2


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


def test_without_central_evaluation_the_best_model_follows_the_clients_scores_of_it(tmp_path):
    """central-evaluation=false: the global model's accuracy on the clients' validation
    rows picks the best checkpoint, and a resume's checks read it the same way."""
    outputs = RunOutputs(tmp_path, {}, wandb_project=None)
    for server_round, accuracy in ((1, 0.3), (2, 0.5), (3, 0.4)):
        result = Result(arrays=ArrayRecord(Net().state_dict()))
        result.evaluate_metrics_clientapp[server_round] = MetricRecord({"eval_acc_global": accuracy})
        outputs.record_round(server_round, result, 0.1)
    names = sorted(path.name for path in tmp_path.glob("best_model_*.pt"))
    assert names == ["best_model_round_1_acc_0.3000.pt", "best_model_round_2_acc_0.5000.pt"]
    assert (outputs.state.best_accuracy, outputs.state.best_round) == (0.5, 2)
    assert _best_problem(torch.load(tmp_path / "resume.pt", weights_only=True), tmp_path) is None


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
        "train_loss": pytest.approx(1.0),
        "federated_evaluate_loss": 1.5,
        "federated_evaluate_accuracy": 0.4,
        "federated_evaluate_loss_global_model": 1.9,
        "federated_evaluate_accuracy_global_model": 0.3,
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
        # A whole PNG of the figure's size, drawn from the two rounds recorded.
        with Image.open(tmp_path / name) as image:
            image.verify()
        assert Image.open(tmp_path / name).size[0] >= 700
    central = plots.central_figure(json.loads((tmp_path / "results.json").read_text()), {})
    assert list(central.axes[0].get_lines()[0].get_ydata()) == [0.5, 0.5]


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
DP = {"dp-noise-multiplier": 1.0}


def run_folder(tmp_path: Path, rounds=((1, 0.3), (2, 0.6)), initial: dict | None = None, **settings) -> Path:
    """A run folder as a run of 5 rounds leaves it when killed after `rounds`: opened by
    `RunOutputs.open`, its `initial` central scores (round 0) and each round recorded,
    its privacy too with DP on."""
    run_config = {
        **default_run_config(),
        "num-server-rounds": 5,
        "output-dir": str(tmp_path),
        "use-wandb": False,
        **settings,
    }
    config = AppConfig.from_run_config(run_config)
    with RunOutputs.open(config, run_config, 4, ArrayRecord(Net().state_dict())) as outputs:
        if initial is not None:
            outputs.record_initial_evaluation(initial)
        for server_round, accuracy in rounds:
            privacy = {"epsilon": 1.5 * server_round, "delta": 1e-5, "releases": server_round, "credited": 0}
            outputs.record_round(
                server_round,
                result_after_round(Result(), server_round, accuracy),
                0.1,
                {},
                privacy if config.dp_on else None,
            )
    return outputs.run_dir


@pytest.fixture(scope="module")
def made_folders(tmp_path_factory) -> dict[str, Path]:
    """One run folder without DP and one with, made once: the tests damage copies."""
    root = tmp_path_factory.mktemp("made")
    return {"plain": run_folder(root / "plain"), "dp": run_folder(root / "dp", **DP)}


@pytest.fixture
def killed_run(made_folders, tmp_path) -> Path:
    return shutil.copytree(made_folders["plain"], tmp_path / "run")


@pytest.fixture
def killed_dp_run(made_folders, tmp_path) -> Path:
    return shutil.copytree(made_folders["dp"], tmp_path / "run")


def resume(run_dir: Path, **settings) -> RunOutputs:
    """What the ServerApp does with `resume-from`: the folder's run-config, then the folder."""
    run_config = {**default_run_config(), "use-wandb": False, "resume-from": str(run_dir), **settings}
    resumed = resume_run(run_config, AppConfig.from_run_config(run_config), 4)
    return RunOutputs.open(resumed.config, resumed.run_config, 4, ArrayRecord(Net().state_dict()), resumed)


def folder_bytes(run_dir: Path) -> dict[str, str]:
    return {
        str(path.relative_to(run_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(run_dir.rglob("*"))
        if path.is_file()
    }


def assert_refused(run_dir: Path, message: str, **settings) -> None:
    """`resume-from` `run_dir` fails in one line matching `message`, and changes no file."""
    before = folder_bytes(run_dir)
    with pytest.raises(ConfigError, match=message) as refusal, resume(run_dir, **settings):
        pass
    assert "\n" not in str(refusal.value)
    assert folder_bytes(run_dir) == before


def edit_state(run_dir: Path, **changes) -> None:
    """Rewrite resume.pt with `changes`; a change of None drops the field."""
    state = torch.load(run_dir / "resume.pt", weights_only=True)
    state = {key: value for key, value in {**state, **changes}.items() if value is not None}
    torch.save(state, run_dir / "resume.pt")


def edit_json(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def test_a_resumed_run_must_share_the_data_personalisation_and_privacy_settings():
    config = AppConfig.from_run_config({**default_run_config(), "dirichlet-alpha": 0.5})
    assert resume_settings(config) == {
        "dataset-name": "zalando-datasets/fashion_mnist",
        "dataset-path": None,
        "dirichlet-alpha": 0.5,
        "partition-seed": 42,
        "val-fraction": 0.2,
        "personalisation": "refit-head",
        "central-evaluation": True,
        "dp-noise-multiplier": 0.0,
    }
    # The clipping norm only matters, and is only compared, with DP on.
    dp_config = AppConfig.from_run_config({**default_run_config(), "dp-noise-multiplier": 1.0})
    assert resume_settings(dp_config)["dp-clipping-norm"] == 0.1


def test_every_round_leaves_what_a_restart_needs(tmp_path):
    run_dir = run_folder(tmp_path, rounds=((1, 0.3), (2, 0.6), (3, 0.5)))
    folder = read_run_folder(run_dir, MODEL_SHAPES)
    state = folder.state
    assert folder.run_config == json.loads((run_dir / "config.json").read_text())
    assert state.round == 3 and len(state.lineage) == 32
    assert (state.best_accuracy, state.best_round) == (0.6, 2)
    assert state.best_checkpoint == "best_model_round_2_acc_0.6000.pt"
    assert [entry["round"] for entry in state.round_results] == [1, 2, 3]
    saved = torch.load(run_dir / "resume.pt", weights_only=True)["arrays"]
    for name, value in saved.items():
        torch.testing.assert_close(state.arrays.to_torch_state_dict()[name], value)


def test_a_genuine_folder_resumes_where_it_stood(tmp_path):
    run_dir = run_folder(tmp_path, **{"learning-rate": 0.02, "aggregation": "median"})
    lineage = read_run_folder(run_dir, MODEL_SHAPES).state.lineage
    with resume(run_dir) as outputs:  # `resume-from` alone: the folder's settings
        assert (outputs.next_round, outputs.lineage) == (3, lineage)
        assert outputs.run_config["learning-rate"] == 0.02 and outputs.run_config["aggregation"] == "median"
        outputs.record_round(3, result_after_round(Result(), 3, 0.7), 0.02)
    assert [entry["round"] for entry in json.loads((run_dir / "results.json").read_text())] == [1, 2, 3]
    assert read_run_folder(run_dir, MODEL_SHAPES).state.best_checkpoint == "best_model_round_3_acc_0.7000.pt"


def test_a_resumed_run_keeps_its_best_and_rewrites_results_from_its_state(tmp_path):
    run_dir = run_folder(tmp_path)
    # A crash after resume.pt but before results.json: the folder says one round less.
    edit_json(run_dir / "results.json", lambda results: results[:1])
    with resume(run_dir) as outputs:
        assert [entry["round"] for entry in json.loads((run_dir / "results.json").read_text())] == [1, 2]
        outputs.record_round(3, result_after_round(Result(), 3, 0.5), 0.05)  # not a new best
    assert sorted(path.name for path in run_dir.glob("best_model_*.pt")) == [
        "best_model_round_1_acc_0.3000.pt",
        "best_model_round_2_acc_0.6000.pt",
    ]
    assert [entry["round"] for entry in json.loads((run_dir / "results.json").read_text())] == [1, 2, 3]


def test_a_run_killed_before_its_first_results_json_resumes(tmp_path):
    run_dir = run_folder(tmp_path, rounds=((1, 0.3),))
    (run_dir / "results.json").unlink()
    with resume(run_dir) as outputs:
        assert outputs.next_round == 2
    assert [entry["round"] for entry in json.loads((run_dir / "results.json").read_text())] == [1]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda run_dir: (run_dir / "resume.pt").unlink(), "holds no resume.pt"),
        (
            lambda run_dir: (run_dir / "resume.pt").write_bytes(b"not a checkpoint"),
            "resume.pt cannot be read",
        ),
        (lambda run_dir: (run_dir / "config.json").unlink(), "holds no config.json"),
    ],
    ids=["no state", "unreadable state", "no config"],
)
def test_a_folder_without_usable_state_is_refused(killed_run, damage, message):
    damage(killed_run)
    assert_refused(killed_run, message)


def test_other_data_settings_or_another_model_are_refused(killed_run):
    run_dir = killed_run
    assert_refused(
        run_dir,
        r"other data, personalisation or privacy settings \(dirichlet-alpha was 1.0\)",
        **{"dirichlet-alpha": 0.5},
    )
    with pytest.raises(ResumeError, match="holds a model that is not this app's model"):
        read_run_folder(run_dir, {**MODEL_SHAPES, "fc2.weight": (20, 128)})


def test_a_dp_run_resumes_only_with_its_delta_and_goes_on_from_its_releases(killed_dp_run):
    run_dir = killed_dp_run
    assert_refused(run_dir, r"dp-delta was 1e-05", **{"dp-delta": 1e-6})
    # A folder from before dp-delta had to match: its resume.pt does not repeat it.
    settings = torch.load(run_dir / "resume.pt", weights_only=True)["settings"]
    edit_state(run_dir, settings={key: value for key, value in settings.items() if key != "dp-delta"})
    with resume(run_dir) as outputs:
        assert outputs.privacy_releases == (2, 0) and outputs.state.settings == settings


def test_a_folder_made_before_personalisation_and_dp_existed_resumes_as_stored_head(tmp_path):
    run_dir = run_folder(tmp_path, personalisation="stored-head")
    # As the first resumable version wrote it: no key added since, in either file.
    edit_json(
        run_dir / "config.json",
        lambda config: {key: value for key, value in config.items() if key not in LEGACY_SETTINGS},
    )
    old_settings = ("dataset-name", "dataset-path", "dirichlet-alpha", "partition-seed", "val-fraction")
    settings = torch.load(run_dir / "resume.pt", weights_only=True)["settings"]
    edit_state(
        run_dir,
        settings={key: settings[key] for key in old_settings},
        num_supernodes=None,
        privacy_releases=None,
    )
    assert_refused(run_dir, r"personalisation was 'stored-head'", personalisation="private-head")
    with resume(run_dir) as outputs:  # `resume-from` alone takes the legacy setting
        assert outputs.run_config["personalisation"] == "stored-head"
        assert outputs.state.settings == settings  # the next resume.pt says it in full


def test_a_run_resumed_on_another_federation_size_says_its_clients_start_new_heads(tmp_path, caplog):
    cache = tmp_path / "cache"
    run_dir = run_folder(tmp_path / "outputs", **{"data-cache-dir": str(cache)})  # 4 SuperNodes
    heads = cache / "heads" / read_run_folder(run_dir, MODEL_SHAPES).state.lineage
    heads.mkdir(parents=True)
    for partition in range(4):
        (heads / f"partition-{partition}-of-4.pt").write_bytes(b"")
    for num_supernodes, kept in ((4, "4 of 4 kept"), (6, "0 of 6 kept")):
        caplog.clear()
        run_config = {**default_run_config(), "resume-from": str(run_dir), "data-cache-dir": str(cache)}
        with caplog.at_level(logging.INFO, logger="flwr"):
            resumed = resume_run(run_config, AppConfig.from_run_config(run_config), num_supernodes)
        os.close(resumed.lock)
        assert f"Each client restores its own head as it is first sampled: {kept} for this run" in caplog.text
        grew = "This run started with 4 SuperNodes and goes on with 6" in caplog.text
        assert grew == (num_supernodes == 6)


def test_a_folder_whose_rounds_say_train_metrics_resumes_under_flowers_name(tmp_path):
    run_dir = run_folder(tmp_path)
    legacy = {"train_metrics_clientapp": "train_metrics"}

    def as_before(entries: list[dict]) -> list[dict]:
        return [{legacy.get(key, key): value for key, value in entry.items()} for entry in entries]

    round_results = torch.load(run_dir / "resume.pt", weights_only=True)["round_results"]
    edit_state(run_dir, round_results=as_before(round_results))
    edit_json(run_dir / "results.json", as_before)
    assert "train_metrics" in json.loads((run_dir / "results.json").read_text())[1]
    with resume(run_dir) as outputs:
        assert outputs.state.round_results == round_results
    rewritten = json.loads((run_dir / "results.json").read_text())
    assert [entry.get("train_metrics_clientapp") for entry in rewritten] == [
        entry["train_metrics_clientapp"] for entry in round_results
    ]
    assert not any("train_metrics" in entry for entry in rewritten)


def edit_round_norm(norm: float):
    """resume.pt's rounds say they clipped at `norm` (results.json is rewritten from them)."""

    def edit(run_dir: Path) -> None:
        round_results = torch.load(run_dir / "resume.pt", weights_only=True)["round_results"]
        for entry in round_results:
            entry["privacy"]["clipping_norm"] = norm
        edit_state(run_dir, round_results=round_results)

    return edit


def set_best_checkpoint(name: str):
    return lambda run_dir: edit_state(run_dir, best_checkpoint=name)


def lower_all_releases(run_dir: Path) -> None:
    """resume.pt says no DP round was released, its own rounds included; results.json says 2."""
    round_results = torch.load(run_dir / "resume.pt", weights_only=True)["round_results"]
    for entry in round_results:
        entry["privacy"] = {**entry["privacy"], "releases": 0}
    edit_state(run_dir, privacy_releases=0, round_results=round_results)


def every_file_says_no_release(run_dir: Path) -> None:
    """resume.pt and results.json agree that no DP round was released, though both rounds trained."""
    lower_all_releases(run_dir)
    edit_json(run_dir / "results.json", lambda rounds: [
        {**entry, "privacy": {**entry["privacy"], "releases": 0}} for entry in rounds
    ])  # fmt: skip


def with_metric(section: str, name: str, value):
    """resume.pt and results.json agree on a crafted metric in round 1."""

    def craft(run_dir: Path) -> None:
        round_results = torch.load(run_dir / "resume.pt", weights_only=True)["round_results"]
        round_results[0][section] = {**round_results[0][section], name: value}
        edit_state(run_dir, round_results=round_results)
        (run_dir / "results.json").write_text(json.dumps(round_results))

    return craft


def truncate_config(run_dir: Path) -> None:
    text = (run_dir / "config.json").read_text()
    (run_dir / "config.json").write_text(text[: len(text) // 2])


def edit_arrays(change):
    def edit(run_dir: Path) -> None:
        arrays = torch.load(run_dir / "resume.pt", weights_only=True)["arrays"]
        edit_state(run_dir, arrays={key: change(value) for key, value in arrays.items()})

    return edit


def edit_results(run_dir: Path) -> None:
    def better_round_1(results: list) -> list:
        results[0]["evaluate_metrics_serverapp"]["accuracy"] = 0.9
        return results

    edit_json(run_dir / "results.json", better_round_1)


def link_best_checkpoint_elsewhere(run_dir: Path) -> None:
    checkpoint = run_dir / "best_model_round_2_acc_0.6000.pt"
    checkpoint.unlink()
    checkpoint.symlink_to(run_dir / "resume.pt")


def hard_link_best_checkpoint_elsewhere(run_dir: Path) -> None:
    checkpoint = run_dir / "best_model_round_2_acc_0.6000.pt"
    checkpoint.unlink()
    elsewhere = run_dir.parent / "elsewhere.pt"
    elsewhere.write_bytes(b"not this run's model")
    os.link(elsewhere, checkpoint)


def lock_linked_to_a_missing_file(run_dir: Path) -> None:
    (run_dir / ".run.lock").unlink()
    (run_dir / ".run.lock").symlink_to(run_dir.parent / "made-by-the-lock")


def config_without(key: str):
    return lambda run_dir: edit_json(
        run_dir / "config.json", lambda config: {name: value for name, value in config.items() if name != key}
    )


def config_with(**values):
    return lambda run_dir: edit_json(run_dir / "config.json", lambda config: {**config, **values})


def state_with(**fields):
    return lambda run_dir: edit_state(run_dir, **fields)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        pytest.param(
            state_with(lineage="../../.."), r"resume.pt holds lineage '\.\./\.\./\.\.'", id="lineage"
        ),
        pytest.param(  # a run id, then a path: the whole of it must be the run id
            state_with(lineage="0123456789abcdef0123456789abcdef/../.."),
            "resume.pt holds lineage '0123456789abcdef0123456789abcdef/../..', not a run id",
            id="lineage after a run id",
        ),
        pytest.param(
            state_with(best_checkpoint="/etc/passwd"),
            "resume.pt names best_checkpoint '/etc/passwd'",
            id="absolute checkpoint",
        ),
        pytest.param(
            state_with(best_checkpoint="../best_model_round_2_acc_0.6000.pt"),
            r"resume.pt names best_checkpoint '\.\./best_model_round_2_acc_0.6000.pt'",
            id="checkpoint in ..",
        ),
        pytest.param(
            link_best_checkpoint_elsewhere,
            "best_model_round_2_acc_0.6000.pt, which is not a file in the folder",
            id="checkpoint a link",
        ),
        pytest.param(
            hard_link_best_checkpoint_elsewhere,
            "best_model_round_2_acc_0.6000.pt, which is not a file in the folder",
            id="checkpoint a hard link",
        ),
        pytest.param(
            lock_linked_to_a_missing_file, r"cannot be locked for this run \(\.run\.lock", id="lock a link"
        ),
        pytest.param(
            lambda run_dir: (run_dir / "best_model_round_2_acc_0.6000.pt").unlink(),
            "best_model_round_2_acc_0.6000.pt, which is not a file in the folder",
            id="checkpoint gone",
        ),
        pytest.param(state_with(best_accuracy=0.9), "resume.pt says its best round is 2 at", id="best"),
        pytest.param(state_with(wandb_run_id="../x"), r"resume.pt holds wandb_run_id '\.\./x'", id="W&B id"),
        pytest.param(
            state_with(round=1), "resume.pt holds round_results that are not rounds 1 to 1", id="round"
        ),
        pytest.param(state_with(round=0), "resume.pt says no round finished", id="round 0"),
        pytest.param(
            lambda run_dir: torch.save([1, 2], run_dir / "resume.pt"),
            "resume.pt holds a list, not a run's state",
            id="not a dict",
        ),
        pytest.param(
            state_with(spare=1), r"resume.pt holds fields this app never writes \(spare\)", id="field"
        ),
        pytest.param(
            edit_arrays(lambda array: array.fill_(float("nan"))),
            "resume.pt holds conv1.weight with NaN",
            id="NaN",
        ),
        pytest.param(
            edit_arrays(lambda array: array.double()),
            "resume.pt holds conv1.weight as torch.float64",
            id="float64",
        ),
        pytest.param(
            state_with(server_velocity={"conv1.weight": torch.zeros(3)}),
            "resume.pt holds a server_velocity that is not one finite tensor per model entry",
            id="velocity",
        ),
        pytest.param(
            state_with(settings={**SETTINGS, "dirichlet-alpha": 0.5}),
            "resume.pt and its config.json disagree on",
            id="settings",
        ),
        pytest.param(truncate_config, r"config.json cannot be read \(JSONDecodeError", id="truncated config"),
        pytest.param(
            config_with(**{"learning-rate": "fast"}),
            "config.json holds a value this app refuses .*'learning-rate' = 'fast'",
            id="wrong type",
        ),
        pytest.param(
            config_with(**{"fraction-train": True}),
            "config.json holds a value this app refuses .*'fraction-train' = True",
            id="bool for a number",
        ),
        pytest.param(
            config_with(lr=0.5), r"config.json holds keys this app does not know \(lr\)", id="unknown key"
        ),
        pytest.param(
            config_without("learning-rate"),
            r"config.json lacks run-config keys \(learning-rate\)",
            id="no key",
        ),
        pytest.param(
            lambda run_dir: edit_json(run_dir / "config.json", lambda config: [config]),
            "config.json holds a JSON list",
            id="config a list",
        ),
        pytest.param(edit_results, "results.json holds other rounds than its resume.pt", id="other results"),
        pytest.param(
            lambda run_dir: (run_dir / "results.json").write_text("[{"),
            "results.json cannot be read",
            id="truncated results",
        ),
        pytest.param(
            lambda run_dir: (run_dir / "results.json").unlink(), "holds no results.json", id="no results"
        ),
        pytest.param(
            with_metric("evaluate_metrics_clientapp", "eval_acc", 1e9),
            r"evaluate_metrics_clientapp eval_acc = 1000000000.0, not a number in \[0.0, 1.0\]",
            id="own accuracy 1e9",
        ),
        pytest.param(
            with_metric("train_metrics_clientapp", "train_loss", -2.0),
            r"train_metrics_clientapp train_loss = -2.0, not a number in \[0.0, inf\]",
            id="negative train loss",
        ),
        pytest.param(
            with_metric("evaluate_metrics_serverapp", "loss", math.nan),
            r"evaluate_metrics_serverapp loss = nan, not a number in \[0.0, inf\]",
            id="NaN central loss",
        ),
    ],
)
def test_a_damaged_or_crafted_folder_is_refused_and_left_as_it_was(killed_run, damage, message):
    damage(killed_run)
    assert_refused(killed_run, message)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        pytest.param(
            state_with(privacy_releases=0),
            r"resume.pt says 0 DP round\(s\) were released, fewer than its round 2 records \(2\)",
            id="resume.pt",
        ),
        pytest.param(
            lower_all_releases,
            r"resume.pt records 2 round\(s\) that trained under DP, but 0 release\(s\)",
            id="resume.pt and its rounds",
        ),
        pytest.param(state_with(privacy_releases=4), "privacy_releases = 4, not 0 to 3", id="too many"),
        pytest.param(
            every_file_says_no_release,
            r"records 2 round\(s\) that trained under DP, but 0 release\(s\)",
            id="every file says none",
        ),
        pytest.param(
            state_with(privacy_releases=0, round_results=[]),
            "resume.pt holds round_results that are not rounds 1 to 2",
            id="rounds gone",
        ),
        pytest.param(
            state_with(dp_clipping_norm=-0.1),
            r"holds dp_clipping_norm = -0.1, not a clipping norm",
            id="norm",
        ),
        pytest.param(
            edit_round_norm(float("inf")), r"with a clipping norm that is none", id="a round's norm"
        ),
    ],
)
def test_a_dp_folder_that_understates_its_releases_is_refused(killed_dp_run, damage, message):
    damage(killed_dp_run)
    assert_refused(killed_dp_run, message)


def test_epsilon_is_recorded_each_round_and_a_resumed_run_counts_its_releases(tmp_path, offline_wandb):
    with RunOutputs(tmp_path, {}, "pytorch-example-tests", settings=SETTINGS) as outputs:
        assert outputs.privacy_releases == (0, 0)
        for server_round, epsilon in ((1, 2.5), (2, 3.75)):
            privacy = {"epsilon": epsilon, "delta": 1e-5, "releases": server_round, "credited": 0}
            outputs.record_round(
                server_round, result_after_round(Result(), server_round, 0.3), 0.1, {}, privacy
            )
    results = json.loads((tmp_path / "results.json").read_text())
    assert [entry["privacy"]["epsilon"] for entry in results] == [2.5, 3.75]
    [run_folder] = (tmp_path / "wandb").glob("offline-run-*")
    assert [row["privacy_epsilon"] for row in read_offline_run(run_folder).history] == [2.5, 3.75]
    state = load_resume_state(tmp_path, SETTINGS, MODEL_SHAPES)
    assert RunOutputs(tmp_path, {}, None, SETTINGS, resumed=state).privacy_releases == (2, 0)


def test_a_folder_whose_run_is_still_going_is_refused_and_free_once_it_ends(killed_run):
    with resume(killed_run) as going:  # e.g. a run the user left running after Ctrl-C in `flwr run`
        assert going.next_round == 3
        assert_refused(killed_run, r"is the folder of a run that is still going: .*flwr stop")
    with resume(killed_run) as resumed:  # that run ended: its folder may be continued
        assert resumed.next_round == 3


def test_a_damaged_results_entry_is_refused_in_one_line(killed_run):
    def central_as_a_number(state):
        state["round_results"][1]["evaluate_metrics_serverapp"] = 0.5
        return state

    edit_state(
        killed_run,
        round_results=central_as_a_number(torch.load(killed_run / "resume.pt", weights_only=True))[
            "round_results"
        ],
    )
    assert_refused(killed_run, r"round_results entry 2 that holds evaluate_metrics_serverapp = 0.5, not")


@pytest.mark.parametrize("key", ["dataset-path", "data-cache-dir"])
def test_a_resume_that_leaves_out_where_the_clients_data_lies_is_refused_with_the_fix(tmp_path, key):
    """A simulation's ClientApps read these from the resuming command's run-config, not
    from the messages: resumed without them, they would cut other partitions, or not find
    their heads."""
    data = tmp_path / "data"
    data.mkdir()
    run_dir = run_folder(tmp_path, **{key: str(data)})
    assert_refused(
        run_dir,
        rf"run-config key '{key}': the run in {run_dir} ran with {key}='{data}', which a simulation's "
        rf"ClientApps read from this command's run-config: add {key}='{data}' to --run-config",
    )
    with resume(run_dir, **{key: str(data)}) as outputs:
        assert outputs.next_round == 3


def test_a_resume_that_leaves_out_both_paths_names_both_and_one_that_names_the_default_passes(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    run_dir = run_folder(tmp_path / "both", **{"dataset-path": str(data), "data-cache-dir": str(cache)})
    both = rf"dataset-path='{data}' data-cache-dir='{cache}'"
    assert_refused(run_dir, rf"ran with {both}, which .* add {both} to --run-config")
    # Saved as the default's own folder: the same folder as the default "", so not refused.
    run_dir = run_folder(tmp_path / "default", **{"data-cache-dir": str(DEFAULT_CACHE_DIR)})
    with resume(run_dir) as outputs:
        assert outputs.next_round == 3


def test_round_0_holds_the_initial_central_scores_and_a_resume_keeps_it(tmp_path):
    run_dir = run_folder(tmp_path, initial={"accuracy": 0.0828, "loss": 2.3025850929940455})
    results = json.loads((run_dir / "results.json").read_text())
    assert [entry["round"] for entry in results] == [0, 1, 2]
    assert results[0] == {
        "round": 0,
        "evaluate_metrics_serverapp": {"accuracy": 0.0828, "loss": 2.302585092994},
    }
    assert read_run_folder(run_dir, MODEL_SHAPES).state.best_round == 2  # round 0 is no model to keep
    with resume(run_dir) as outputs:
        outputs.record_round(3, result_after_round(Result(), 3, 0.7), 0.1)
    results = json.loads((run_dir / "results.json").read_text())
    assert [entry["round"] for entry in results] == [0, 1, 2, 3]
    assert "central.png" in {path.name for path in plot_run(run_dir)}


@pytest.mark.parametrize(
    ("initial", "message"),
    [
        (
            {"accuracy": 7.0, "loss": 2.3},
            "holds initial_evaluation = {'accuracy': 7.0, 'loss': 2.3}, not round 0",
        ),
        ({"accuracy": 0.1}, "not round 0's scores"),
        ([0.1, 2.3], "not round 0's scores"),
    ],
)
def test_a_folder_with_a_damaged_round_0_is_refused(tmp_path, initial, message):
    run_dir = run_folder(tmp_path, initial={"accuracy": 0.1, "loss": 2.3})
    edit_state(run_dir, initial_evaluation=initial)
    assert_refused(run_dir, re.escape(message))


def test_results_json_without_round_0_of_a_run_that_had_it_is_refused(tmp_path):
    run_dir = run_folder(tmp_path, initial={"accuracy": 0.1, "loss": 2.3})
    edit_json(run_dir / "results.json", lambda rounds: rounds[1:])
    assert_refused(run_dir, re.escape("holds other rounds than its resume.pt (0 to 2, or to 1)"))


def test_a_lock_file_that_links_elsewhere_creates_nothing_there(killed_run):
    lock_linked_to_a_missing_file(killed_run)
    assert_refused(killed_run, r"cannot be locked for this run \(\.run\.lock")
    assert not (killed_run.parent / "made-by-the-lock").exists()


def test_a_run_folder_is_its_users_only_whatever_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        run_dir = run_folder(tmp_path, initial={"accuracy": 0.1, "loss": 2.3})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert {"results.json", "resume.pt", "config.json", "central.png"} <= {path.name for path in files}
    assert {
        path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in files if path.stat().st_mode & 0o077
    } == {}


def test_a_folder_whose_config_has_dp_off_but_whose_rounds_record_releases_is_refused(killed_dp_run):
    """config.json and resume.pt's settings both edited to DP off: resumed so, it would
    train without noise a run whose rounds record epsilon."""
    edit_json(killed_dp_run / "config.json", lambda config: {**config, "dp-noise-multiplier": 0.0})
    settings = torch.load(killed_dp_run / "resume.pt", weights_only=True)["settings"]
    edit_state(killed_dp_run, settings={**{k: v for k, v in settings.items() if k not in DP_ONLY},
                                        "dp-noise-multiplier": 0.0})  # fmt: skip
    assert_refused(killed_dp_run, "records DP releases, but its config.json has DP off")


def test_a_new_run_holds_its_folders_lock_for_as_long_as_it_runs(tmp_path):
    run_config = {**default_run_config(), "output-dir": str(tmp_path), "use-wandb": False}
    config = AppConfig.from_run_config(run_config)
    with RunOutputs.open(config, run_config, 4, ArrayRecord(Net().state_dict())) as outputs:
        try:
            os.close(lock_run_folder(outputs.run_dir, create=False))
            raise AssertionError("a second run got the lock of a folder whose run is going")
        except ResumeError as refusal:
            assert "is the folder of a run that is still going" in str(refusal)
    os.close(lock_run_folder(outputs.run_dir, create=False))  # free once the run has ended
