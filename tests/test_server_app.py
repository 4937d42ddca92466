"""The ServerApp's pieces: device check, run folders, central evaluation."""

import json

import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from harness.flower_processes import default_run_config
from harness.synthetic_fmnist import make_split
from pytorch_example import server_app
from pytorch_example.client_app import LINEAGE_KEY
from pytorch_example.config import CLIENT_KEYS, AppConfig, ConfigError, check_server_device
from pytorch_example.data import ImageSet
from pytorch_example.outputs import create_run_dir
from pytorch_example.server_app import central_evaluation, client_settings
from pytorch_example.task import Net
from tests.scripted import ScriptedGrid, honest


def test_cpu_is_always_a_valid_server_device_and_a_missing_gpu_is_refused_in_one_line():
    check_server_device("cpu")  # no error, with or without a GPU
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last this machine has
    with pytest.raises(ConfigError, match=rf"'server-device' = '{missing}' but the ServerApp sees"):
        check_server_device(missing)


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


def test_without_central_evaluation_the_serverapp_reads_no_data(tmp_path):
    """central-evaluation=false, dataset-path empty and the Hub out of reach: the run
    reads no image, and its best checkpoint follows the clients' scores."""
    run_config = {
        **default_run_config(),
        "central-evaluation": False,
        "num-server-rounds": 2,
        "fraction-train": 1.0,
        "fraction-evaluate": 1.0,
        "round-timeout": 5.0,
        "data-cache-dir": str(tmp_path / "cache"),
        "output-dir": str(tmp_path / "outputs"),
        "use-wandb": False,
    }
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    server_app.main(ScriptedGrid(3, honest), context)
    [run_dir] = [path for path in (tmp_path / "outputs").glob("*/*") if path.is_dir()]
    results = json.loads((run_dir / "results.json").read_text())
    assert [entry["evaluate_metrics_serverapp"] for entry in results] == [{}, {}]
    assert [path.name for path in run_dir.glob("best_model_*.pt")] == ["best_model_round_1_acc_0.1000.pt"]
    assert not (tmp_path / "cache").exists()  # nothing decoded, nothing partitioned
