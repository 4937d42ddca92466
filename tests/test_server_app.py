"""The ServerApp's pieces: device check, run folders, central evaluation."""

import json
import os

import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from harness.flower_processes import default_run_config
from harness.synthetic_fmnist import make_split
from pytorch_example import server_app, task
from pytorch_example.check import check_server_device
from pytorch_example.config import CLIENT_KEYS, AppConfig, ConfigError
from pytorch_example.data import ImageSet, load_test_set
from pytorch_example.names import LINEAGE_KEY
from pytorch_example.run_folder import create_run_dir, lock_run_folder
from pytorch_example.server_app import central_evaluation, client_settings
from pytorch_example.task import Net
from tests.scripted import (
    ScriptedGrid,
    every_node_moves_the_model,
    honest,
    is_train,
    mean_shift,
    shifted,
    trained,
)


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
    context = scripted_run(tmp_path, **{"num-server-rounds": 2})
    server_app.main(ScriptedGrid(3, honest), context)
    [run_dir] = [path for path in (tmp_path / "outputs").glob("*/*") if path.is_dir()]
    results = json.loads((run_dir / "results.json").read_text())
    assert [entry["evaluate_metrics_serverapp"] for entry in results] == [{}, {}]
    assert [path.name for path in run_dir.glob("best_model_*.pt")] == ["best_model_round_1_acc_0.1000.pt"]
    assert not (tmp_path / "cache").exists()  # nothing decoded, nothing partitioned


def test_the_serverapp_scores_each_rounds_model_and_bounds_a_huge_update(tmp_path, idx_dataset):
    """`server_app.main` end to end on a grid double: every node moves the model a little
    but node 1, which sends weights a million times off; the gate cuts its update to the
    round's bound, and central evaluation scores the model each round ends with."""
    run_config = {
        **default_run_config(),
        "num-server-rounds": 2,
        "fraction-train": 1.0,
        "fraction-evaluate": 1.0,
        "round-timeout": 5.0,
        "dataset-path": str(idx_dataset),
        "data-cache-dir": str(tmp_path / "cache"),
        "output-dir": str(tmp_path / "outputs"),
        "use-wandb": False,
    }

    def answer(server_round, message):
        if not is_train(message):
            return trained(message)
        return shifted(message, by=1e6 if message.metadata.dst_node_id == 1 else 0.01)

    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    server_app.main(ScriptedGrid(4, answer), context)
    [run_dir] = [path for path in (tmp_path / "outputs").glob("*/*") if path.is_dir()]
    results = json.loads((run_dir / "results.json").read_text())
    assert [entry["round"] for entry in results] == [0, 1, 2]
    assert [entry["replies"]["train"]["clipped"] for entry in results[1:]] == [1, 1]

    torch.manual_seed(42)  # the run's seed: its initial model
    initial = ArrayRecord(Net().state_dict())
    final = ArrayRecord(torch.load(run_dir / "final_model.pt", weights_only=True))
    # 3 updates of 0.01 and one cut to twice their norm, each round: a mean step of 0.0125.
    assert mean_shift(initial, final) == pytest.approx(2 * 0.0125, rel=1e-3)
    config = AppConfig.from_run_config(run_config)
    test_set = load_test_set(config.data_source)
    for entry, model in ((results[0], initial), (results[2], final)):
        net = Net()
        net.load_state_dict(model.to_torch_state_dict())
        loss, accuracy = task.test(net, test_set, config.eval_batch_size, torch.device("cpu"))
        assert entry["evaluate_metrics_serverapp"] == pytest.approx({"accuracy": accuracy, "loss": loss})
    assert (
        results[2]["evaluate_metrics_serverapp"]["loss"] != results[0]["evaluate_metrics_serverapp"]["loss"]
    )


def scripted_run(tmp_path, **settings) -> Context:
    """The ServerApp's context for a run on the grid double: every node every round, no
    central evaluation (no data), W&B off, `settings` over that."""
    run_config = {
        **default_run_config(),
        "central-evaluation": False,
        "fraction-train": 1.0,
        "fraction-evaluate": 1.0,
        "round-timeout": 5.0,
        "data-cache-dir": str(tmp_path / "cache"),
        "output-dir": str(tmp_path / "outputs"),
        "use-wandb": False,
        **settings,
    }
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def dp_run(tmp_path, **settings) -> Context:
    """An adaptive-clipping DP run on the grid double."""
    return scripted_run(tmp_path, **{"dp-noise-multiplier": 0.1, "dp-clipping-quantile": 0.5, **settings})


def test_an_adaptive_dp_run_resumes_at_the_norm_its_folder_saved(tmp_path):
    """Through `server_app.main`: each update is far longer than the norm, which grows
    each round; the resumed run clips its first round at the norm resume.pt kept."""
    grid = ScriptedGrid(4, every_node_moves_the_model(by=1.0))
    context = dp_run(tmp_path, **{"num-server-rounds": 2})
    server_app.main(grid, context)
    [run_dir] = [path for path in (tmp_path / "outputs").glob("*/*") if path.is_dir()]
    norms = [
        entry["privacy"]["clipping_norm"] for entry in json.loads((run_dir / "results.json").read_text())
    ]
    assert norms[0] == 0.1 and norms[1] > norms[0]
    saved = torch.load(run_dir / "resume.pt", weights_only=True)["dp_clipping_norm"]
    assert saved > norms[1]
    context = dp_run(tmp_path, **{"num-server-rounds": 3, "resume-from": str(run_dir)})
    server_app.main(grid, context)
    results = json.loads((run_dir / "results.json").read_text())
    assert [entry["round"] for entry in results] == [1, 2, 3] and results[2]["privacy"][
        "clipping_norm"
    ] == saved


def test_a_resume_refused_after_its_folder_was_read_leaves_the_folder_free(tmp_path):
    grid = ScriptedGrid(4, every_node_moves_the_model(by=1.0))
    context = dp_run(tmp_path, **{"num-server-rounds": 1})
    server_app.main(grid, context)
    [run_dir] = [path for path in (tmp_path / "outputs").glob("*/*") if path.is_dir()]
    missing = f"cuda:{torch.cuda.device_count()}"  # refused once the folder's settings are known
    context = dp_run(
        tmp_path, **{"num-server-rounds": 2, "resume-from": str(run_dir), "server-device": missing}
    )
    with pytest.raises(ConfigError, match="'server-device'"):
        server_app.main(grid, context)
    os.close(lock_run_folder(run_dir, create=False))  # free: no "still going" refusal
