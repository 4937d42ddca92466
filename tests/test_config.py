"""Run-config validation and the learning-rate schedule."""

import dataclasses
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from harness.flower_processes import REPO, default_run_config
from harness.synthetic_fmnist import write_idx_dataset
from pytorch_example import files as files_module
from pytorch_example.config import AppConfig, ConfigError
from pytorch_example.data_cache import DataError
from pytorch_example.files import DEFAULT_CACHE_DIR, project_dir


def test_pyproject_defaults_are_valid():
    config = AppConfig.from_run_config(default_run_config())
    assert config.num_server_rounds == 10
    assert (config.fraction_train, config.fraction_evaluate) == (0.25, 0.5)
    assert (config.local_epochs, config.batch_size, config.learning_rate) == (1, 32, 0.02)
    assert config.server_device == "cpu"
    assert config.dataset_path is None
    assert config.data_cache_dir == DEFAULT_CACHE_DIR
    assert config.output_dir == project_dir() / "outputs"


def test_default_schedule_halves_the_learning_rate_at_round_5():
    config = AppConfig.from_run_config(default_run_config())
    assert [config.learning_rate_at(r) for r in range(1, 8)] == [0.02] * 4 + [0.01] * 3


def test_schedule_with_several_milestones():
    run_config = {**default_run_config(), "lr-decay-rounds": "8, 3", "lr-decay-factor": 0.1}
    config = AppConfig.from_run_config(run_config)
    assert config.lr_decay_rounds == (3, 8)
    assert config.learning_rate_at(2) == pytest.approx(0.02)
    assert config.learning_rate_at(3) == pytest.approx(0.002)
    assert config.learning_rate_at(8) == pytest.approx(0.0002)


def test_empty_schedule_keeps_the_rate():
    config = AppConfig.from_run_config({**default_run_config(), "lr-decay-rounds": ""})
    assert config.learning_rate_at(100) == 0.02


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num-server-rounds", 0),
        ("num-server-rounds", 2.5),
        ("fraction-train", 0.0),
        ("fraction-train", 1.5),
        ("fraction-evaluate", -0.1),
        ("local-epochs", True),
        ("batch-size", 0),
        ("learning-rate", 0),
        ("momentum", 1.0),
        ("personalisation", "fedper"),
        ("head-refit-epochs", 0),
        ("trim-fraction", 0.5),
        ("trim-fraction", 0.0),
        ("num-malicious", -1),
        ("multi-krum-keep", 1.5),
        ("update-norm-bound", 0.5),
        ("update-norm-bound", -1.0),
        ("update-weight-bound", float("inf")),
        ("update-weight-bound", True),
        ("dp-noise-multiplier", -0.5),
        ("dp-clipping-norm", 0.0),
        ("dp-delta", 1.0),
        ("dp-max-epsilon", -1.0),
        ("lr-decay-rounds", "five"),
        ("lr-decay-rounds", "0"),
        ("server-learning-rate", 0.0),
        ("server-momentum", 1.0),
        ("server-momentum", -0.1),
        ("server-device", "gpu"),
        ("server-device", "cuda:"),
        ("server-device", "cuda:x"),
        ("dirichlet-alpha", -1.0),
        ("val-fraction", 1.0),
        ("use-wandb", "yes"),
        ("dataset-name", ""),
        ("dataset-path", 3),
        ("max-failed-rounds", 0),
        ("round-timeout", 0),
    ],
)
def test_bad_values_name_key_and_value(key, value):
    with pytest.raises(ConfigError, match=f"run-config key '{key}' = {value!r} is invalid"):
        AppConfig.from_run_config({**default_run_config(), key: value})


def test_personalisation_names_its_choices():
    with pytest.raises(ConfigError, match='expected "refit-head" or "private-head" or "stored-head"'):
        AppConfig.from_run_config({**default_run_config(), "personalisation": "stored"})


def test_aggregation_names_its_choices():
    with pytest.raises(ConfigError, match='expected "fedavg" or "trimmed-mean" or "median" or "krum" or '):
        AppConfig.from_run_config({**default_run_config(), "aggregation": "mean"})


@pytest.mark.parametrize(
    ("settings", "refusal"),
    [
        ({"dp-max-epsilon": 8.0}, r"'dp-max-epsilon' = 8 bounds nothing while dp-noise-multiplier = 0"),
        (
            {"dp-noise-multiplier": 1.0, "aggregation": "median"},
            r"'aggregation' = 'median' cannot run with DP .* use aggregation=\"fedavg\"",
        ),
        (
            {"dp-noise-multiplier": 1.0, "personalisation": "private-head"},
            r"'personalisation' = 'private-head' cannot run with DP .* sends the body only",
        ),
    ],
)
def test_dp_settings_flower_cannot_account_for_are_refused(settings, refusal):
    with pytest.raises(ConfigError, match=refusal):
        AppConfig.from_run_config({**default_run_config(), **settings})


def test_a_config_written_back_as_a_run_config_reads_the_same():
    """What a ClientApp's settings start from: every key's default, as a run-config."""
    assert AppConfig.from_run_config(AppConfig().as_run_config()) == AppConfig()
    changed = {**default_run_config(), "lr-decay-rounds": "", "dataset-path": "/tmp", "resume-from": "/tmp"}
    config = AppConfig.from_run_config({**changed, "seed": 3, "learning-rate": 0.5})
    assert AppConfig.from_run_config(config.as_run_config()) == config


def test_missing_key_is_named():
    run_config = default_run_config()
    del run_config["batch-size"]
    with pytest.raises(ConfigError, match="'batch-size' is missing"):
        AppConfig.from_run_config(run_config)


def test_dataset_path_must_be_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="'dataset-path' .* is not a folder"):
        AppConfig.from_run_config({**default_run_config(), "dataset-path": str(tmp_path / "nope")})


def test_resume_from_must_be_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="'resume-from' .* is not a folder: point it at the run folder"):
        AppConfig.from_run_config({**default_run_config(), "resume-from": str(tmp_path / "nope")})


def test_a_run_that_would_measure_its_model_nowhere_is_refused():
    settings = {**default_run_config(), "central-evaluation": False, "fraction-evaluate": 0.0}
    with pytest.raises(
        ConfigError, match="'central-evaluation' = false leaves only the clients .* fraction-evaluate"
    ):
        AppConfig.from_run_config(settings)
    accepted = AppConfig.from_run_config({**settings, "fraction-evaluate": 0.5})
    assert (accepted.central_evaluation, accepted.fraction_evaluate) == (False, 0.5)


def test_integers_are_accepted_for_float_keys():
    config = AppConfig.from_run_config({**default_run_config(), "learning-rate": 1, "fraction-train": 1})
    assert config.learning_rate == 1.0 and config.fraction_train == 1.0


def test_relative_paths_are_anchored_to_the_project_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = AppConfig.from_run_config({**default_run_config(), "output-dir": "runs/x"})
    assert config.output_dir == project_dir() / "runs" / "x"
    absolute = AppConfig.from_run_config({**default_run_config(), "output-dir": str(tmp_path)})
    assert absolute.output_dir == tmp_path


@pytest.fixture(autouse=True)
def fresh_project_dir():
    project_dir.cache_clear()
    yield
    project_dir.cache_clear()


class FakeDistribution:
    def __init__(self, direct_url: str | None) -> None:
        self.direct_url = direct_url

    def read_text(self, name: str) -> str | None:
        return self.direct_url if name == "direct_url.json" else None


def test_project_dir_of_an_editable_install_is_its_source_folder(tmp_path, monkeypatch):
    source = tmp_path / "my project"
    url = json.dumps({"url": source.as_uri(), "dir_info": {"editable": True}})
    monkeypatch.setattr(files_module, "distribution", lambda name: FakeDistribution(url))
    monkeypatch.chdir(tmp_path)
    assert project_dir() == source


@pytest.mark.parametrize(
    "direct_url",
    [None, json.dumps({"url": "file:///wheels/app.whl", "archive_info": {}})],
    ids=["from an index", "from a wheel"],
)
def test_project_dir_of_any_other_install_is_the_working_folder(tmp_path, monkeypatch, direct_url):
    monkeypatch.setattr(files_module, "distribution", lambda name: FakeDistribution(direct_url))
    monkeypatch.chdir(tmp_path)
    assert project_dir() == tmp_path


def test_data_errors_name_the_run_config_key_as_it_is_written():
    line = str(DataError("dirichlet-alpha", 0.05, "alpha 0.05 leaves ...: use 0.1 or more"))
    assert line == "run-config key 'dirichlet-alpha' = 0.05: alpha 0.05 leaves ...: use 0.1 or more"
    assert (
        str(DataError("dataset-path", Path("/x"), "no files"))
        == "run-config key 'dataset-path' = '/x': no files"
    )
    assert isinstance(DataError("val-fraction", 0.9, "..."), ConfigError)  # one line, like any config error


def readme_knobs() -> dict[str, str]:
    """README's run-config table: each key and its default as written there."""
    rows = re.findall(r"^\| `([a-z-]+)` \| `(.*?)` \|", (REPO / "README.md").read_text(), re.MULTILINE)
    return dict(rows)


def test_pyproject_the_typed_config_and_readme_agree_on_every_key_and_default():
    pyproject = default_run_config()
    assert set(pyproject) == {field.name.replace("_", "-") for field in dataclasses.fields(AppConfig)}
    assert AppConfig.from_run_config(pyproject) == AppConfig()
    readme = readme_knobs()
    assert list(readme) == list(pyproject), "README's table lists other keys, or in another order"
    assert {key: tomllib.loads(f"default = {text}")["default"] for key, text in readme.items()} == pyproject


OK_WITHOUT_DATA = "run-config OK: keys and values; not the partitioner, which needs dataset-path here"


@pytest.mark.parametrize(
    ("pairs", "said"),
    [
        (
            ["num-server-rounds=3 learning_rate=0.05"],
            "error: run-config key 'learning_rate' is not one of this app's: did you mean 'learning-rate'?",
        ),
        (
            ["learning-rate=-0.1"],
            "error: run-config key 'learning-rate' = -0.1 is invalid: expected a number in (0.0, inf)",
        ),
        (["seed=3 learning-rate 0.05"], "error: 'learning-rate 0.05' is not key=value: Flower would skip it"),
        (
            ["seed=3", "aggregation=median"],  # Flower itself names no key for this one
            "error: run-config key 'aggregation' = median is not a value Flower reads (a string needs "
            "quotes inside the pairs' own: --run-config \"aggregation='median'\")",
        ),
        (["num-server-rounds=3 learning-rate=0.05"], OK_WITHOUT_DATA),
        (["num-server-rounds=3", "aggregation='median'"], OK_WITHOUT_DATA),
        (
            ["dp-noise-multiplier=2.0 dp-clipping-quantile=0.5"],  # 12 of the 50 clients a round
            "error: run-config key 'dp-clipping-quantile' = 0.5 needs dp-noise-multiplier below 1.2 with 12 "
            "clients a round (the count its norm follows takes noise of its own, m / 20): sample more "
            "clients, lower the multiplier, or set dp-clipping-quantile=0",
        ),
    ],
)
def test_the_config_check_says_in_one_line_what_a_run_would_refuse(pairs, said):
    checked = subprocess.run(
        [sys.executable, "-m", "pytorch_example.check", *pairs], cwd=REPO, capture_output=True, text=True
    )
    assert (checked.stdout + checked.stderr).strip().startswith(said)
    assert len((checked.stdout + checked.stderr).strip().splitlines()) == 1
    assert checked.returncode == (0 if said.startswith("run-config OK") else 1)


def test_with_the_data_at_hand_the_config_check_refuses_an_alpha_the_partitioner_cannot_meet(tmp_path):
    data = write_idx_dataset(tmp_path / "data", num_train=1000, num_test=100)

    def check(alpha: float) -> subprocess.CompletedProcess:
        pairs = f"dataset-path='{data}' data-cache-dir='{tmp_path / 'cache'}' dirichlet-alpha={alpha}"
        return subprocess.run(
            [sys.executable, "-m", "pytorch_example.check", pairs, "--supernodes", "20"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )

    refused = check(0.01)
    assert refused.returncode == 1
    assert refused.stderr.strip().startswith("error: run-config key 'dirichlet-alpha' = 0.01: alpha 0.01")
    assert len(refused.stderr.strip().splitlines()) == 1
    accepted = check(1.0)
    assert accepted.returncode == 0, accepted.stderr
    said = f"run-config OK: keys and values, and dirichlet-alpha's 20 partitions of {data}"
    assert accepted.stdout.strip() == said
