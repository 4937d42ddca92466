"""The ServerApp's pieces: device check, run folders, central evaluation."""

import pytest
import torch
from flwr.app import ArrayRecord

from harness.flower_processes import default_run_config
from harness.synthetic_fmnist import make_split
from pytorch_example.client_app import LINEAGE_KEY
from pytorch_example.config import CLIENT_KEYS, AppConfig, ConfigError, check_server_device
from pytorch_example.data import ImageSet
from pytorch_example.outputs import create_run_dir
from pytorch_example.server_app import central_evaluation, client_settings
from pytorch_example.task import Net


def test_cpu_is_always_a_valid_server_device():
    check_server_device("cpu")  # no error: that is the claim


def test_the_messages_carry_the_clients_settings_and_none_of_the_servers_paths(tmp_path):
    run_config = {
        **default_run_config(),
        "dataset-path": str(tmp_path / "server-data"),
        "data-cache-dir": str(tmp_path / "server-cache"),
        "output-dir": str(tmp_path / "server-outputs"),
        "resume-from": str(tmp_path / "server-outputs" / "run"),
        "local-epochs": 3,
    }
    sent = client_settings(run_config, "a" * 32)
    assert set(sent) == {*CLIENT_KEYS, LINEAGE_KEY} and sent["local-epochs"] == 3
    assert not any(str(tmp_path) in str(value) for value in sent.values())


def test_a_gpu_the_serverapp_cannot_see_fails_in_one_line():
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ConfigError, match=f"'server-device' = '{missing}' but the ServerApp sees"):
        check_server_device(missing)


def test_run_folders_are_dated_and_never_reused(tmp_path):
    # Created within the same second or two, so the later ones need a suffix.
    run_dirs = [create_run_dir(tmp_path) for _ in range(3)]
    assert len(set(run_dirs)) == 3 and all(path.is_dir() for path in run_dirs)
    assert all(path.parent.parent == tmp_path for path in run_dirs)
    assert any(path.name.endswith("-1") for path in run_dirs)


def test_central_evaluation_scores_the_given_model():
    images, labels = make_split(300, seed=3)
    test_set = ImageSet(torch.from_numpy(images), torch.from_numpy(labels.astype("int64")))
    evaluate = central_evaluation(test_set, AppConfig.from_run_config(default_run_config()))
    metrics = evaluate(1, ArrayRecord(Net().state_dict()))
    assert set(metrics) == {"accuracy", "loss"}
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["loss"] > 0
