"""The personalised, stateful client: its head kept in a RecordDict across rounds."""

import logging
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from harness.flower_processes import default_run_config
from harness.synthetic_fmnist import write_idx_dataset
from pytorch_example.client_app import (
    HEAD_STATE_KEY,
    client_generator,
    evaluate,
    model_with_own_head,
    save_head,
    train,
)
from pytorch_example.config import AppConfig, ConfigError, NodeConfig
from pytorch_example.data import load_partition
from pytorch_example.task import Net


def test_first_round_uses_the_global_model_unchanged():
    global_model = Net()
    net = model_with_own_head(ArrayRecord(global_model.state_dict()), RecordDict())
    for name, value in global_model.state_dict().items():
        torch.testing.assert_close(net.state_dict()[name], value)


def test_saved_head_replaces_the_global_head_only():
    state = RecordDict()
    trained = Net()
    save_head(trained, state)
    assert HEAD_STATE_KEY in state.array_records

    new_global = Net()
    net = model_with_own_head(ArrayRecord(new_global.state_dict()), state)
    for name, value in net.state_dict().items():
        source = trained if name.startswith("fc2.") else new_global
        torch.testing.assert_close(value, source.state_dict()[name])


def test_saving_again_overwrites_the_head():
    state = RecordDict()
    save_head(Net(), state)
    latest = Net()
    save_head(latest, state)
    restored = state[HEAD_STATE_KEY].to_torch_state_dict()
    torch.testing.assert_close(restored["weight"], latest.fc2.weight.detach())


def test_client_rng_depends_on_seed_round_and_partition():
    draws = {
        key: torch.rand(3, generator=client_generator(*key)).tolist()
        for key in [(42, 1, 0), (42, 1, 1), (42, 2, 0), (7, 1, 0)]
    }
    assert len({tuple(value) for value in draws.values()}) == 4
    assert torch.rand(3, generator=client_generator(42, 1, 0)).tolist() == draws[(42, 1, 0)]


def test_the_node_config_is_read_once_and_each_fault_is_one_clear_line():
    node = NodeConfig.from_node_config({"partition-id": 3, "num-partitions": 4, "head-dir": "~/heads"})
    assert node == NodeConfig(3, 4, Path("~/heads").expanduser())
    assert NodeConfig.from_node_config({"partition-id": 0, "num-partitions": 1}).head_dir is None
    with pytest.raises(ConfigError, match="node config key 'num-partitions' is missing or not an integer"):
        NodeConfig.from_node_config({"partition-id": 3})
    with pytest.raises(ConfigError, match="node config key 'partition-id' is missing or not an integer"):
        NodeConfig.from_node_config({"partition-id": "3", "num-partitions": 4})
    with pytest.raises(ConfigError, match="partition-id=5 num-partitions=2: partition 5 does not exist"):
        NodeConfig.from_node_config({"partition-id": 5, "num-partitions": 2})


@pytest.fixture
def run_config(tmp_path, monkeypatch) -> dict:
    """A run-config on a small generated data set, in a process set up as a ClientApp's."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    dataset = write_idx_dataset(tmp_path / "data", num_train=600, num_test=100)
    return {**default_run_config(), "dataset-path": str(dataset), "data-cache-dir": str(tmp_path / "cache")}


def test_evaluate_scores_the_own_head_and_the_global_head(tmp_path, run_config):
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=run_config,
    )
    global_arrays = ArrayRecord(Net().state_dict())

    def evaluate_now() -> dict:
        message = Message(
            content=RecordDict({"arrays": global_arrays, "config": ConfigRecord({"server-round": 1})}),
            dst_node_id=1,
            message_type="evaluate",
        )
        return dict(evaluate(message, context).content["metrics"])

    before_training = evaluate_now()
    assert before_training["eval_acc"] == before_training["eval_acc_global"]
    assert before_training["eval_loss"] == before_training["eval_loss_global"]

    own = Net()
    torch.nn.init.constant_(own.fc2.weight, 0.0)
    torch.nn.init.constant_(own.fc2.bias, 0.0)
    own.fc2.bias.data[3] = 1.0  # this head always answers class 3
    save_head(own, context.state)
    after_training = evaluate_now()
    assert after_training["eval_acc_global"] == before_training["eval_acc_global"]
    labels = load_partition_labels(run_config, tmp_path)
    assert after_training["eval_acc"] == pytest.approx(float((labels == 3).mean()))


def load_partition_labels(run_config: dict, tmp_path):
    config = AppConfig.from_run_config(run_config)
    return load_partition(config.data_source, config.partitioning(2), 0).val.labels.numpy()


def test_the_head_outlives_its_process_on_the_clients_disk(tmp_path, run_config, caplog):
    node_config = {"partition-id": 1, "num-partitions": 2, "head-dir": str(tmp_path / "heads")}

    def message(kind: str, lineage: str) -> Message:
        config = ConfigRecord({"server-round": 1, "lr": 0.1, "lineage": lineage})
        content = RecordDict({"arrays": ArrayRecord(Net().state_dict()), "config": config})
        return Message(content=content, dst_node_id=1, message_type=kind)

    def fresh_context() -> Context:  # what a restarted SuperNode hands its ClientApp
        return Context(
            run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config
        )

    trained_context = fresh_context()
    train(message("train", "run-a"), trained_context)
    head_file = tmp_path / "heads" / "run-a" / "partition-1-of-2.pt"
    trained_head = trained_context.state[HEAD_STATE_KEY].to_torch_state_dict()
    for name, value in torch.load(head_file, weights_only=True).items():
        torch.testing.assert_close(value, trained_head[name])

    with caplog.at_level(logging.INFO, logger="flwr"):
        restored = fresh_context()
        evaluate(message("evaluate", "run-a"), restored)
    assert f"Restored this client's head from {head_file}" in caplog.text
    torch.testing.assert_close(
        restored.state[HEAD_STATE_KEY].to_torch_state_dict()["weight"], trained_head["weight"]
    )

    other_run = fresh_context()
    metrics = evaluate(message("evaluate", "run-b"), other_run).content["metrics"]
    assert HEAD_STATE_KEY not in other_run.state  # a new lineage starts fresh
    assert metrics["eval_acc"] == metrics["eval_acc_global"]
