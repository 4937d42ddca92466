"""The personalised, stateful client: its head kept in a RecordDict across rounds."""

import logging
import shutil
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from harness.flower_processes import default_run_config
from harness.synthetic_fmnist import NUM_CLASSES, write_idx_dataset
from pytorch_example import client_app, task
from pytorch_example.client_app import (
    HEAD_STATE_KEY,
    client_generator,
    evaluate,
    global_model,
    put_own_head,
    train,
)
from pytorch_example.config import PERSONALISATIONS, AppConfig, ConfigError
from pytorch_example.data import ImageSet, Partition, load_partition
from pytorch_example.node_data import NodeConfig, export, load_node_partition
from pytorch_example.task import HEAD_KEYS, Net
from pytorch_example.task import train as train_model

CPU = torch.device("cpu")


def test_the_kept_head_replaces_the_global_head_only():
    state = RecordDict()
    own = Net()
    state[HEAD_STATE_KEY] = ArrayRecord(own.fc2.state_dict())
    new_global = Net()
    net = global_model(ArrayRecord(new_global.state_dict()))
    assert put_own_head(net, state)
    for name, value in net.state_dict().items():
        source = own if name in HEAD_KEYS else new_global
        torch.testing.assert_close(value, source.state_dict()[name])
    assert not put_own_head(net, RecordDict())


def test_client_rng_depends_on_seed_round_partition_and_stream():
    draws = {
        key: torch.rand(3, generator=client_generator(*key)).tolist()
        for key in [(42, 1, 0), (42, 1, 1), (42, 2, 0), (7, 1, 0), (42, 1, 0, 1)]
    }
    assert len({tuple(value) for value in draws.values()}) == 5
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
def run_config(tmp_path) -> dict:
    """A run-config on a small generated data set."""
    dataset = write_idx_dataset(tmp_path / "data", num_train=600, num_test=100)
    return {**default_run_config(), "dataset-path": str(dataset), "data-cache-dir": str(tmp_path / "cache")}


def client_context(run_config: dict, partition_id: int = 0, **node_config) -> Context:
    node_config = {"partition-id": partition_id, "num-partitions": 2, **node_config}
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)


def message(kind: str, arrays: ArrayRecord, server_round: int = 1, lineage: str = "a" * 32) -> Message:
    config = ConfigRecord({"server-round": server_round, "lr": 0.1, "lineage": lineage})
    return Message(content=RecordDict({"arrays": arrays, "config": config}), dst_node_id=1, message_type=kind)


def keep_constant_head(state: RecordDict, answer: int) -> None:
    """Give the client a head that always answers class `answer`."""
    own = Net()
    torch.nn.init.constant_(own.fc2.weight, 0.0)
    torch.nn.init.constant_(own.fc2.bias, 0.0)
    own.fc2.bias.data[answer] = 1.0
    state[HEAD_STATE_KEY] = ArrayRecord(own.fc2.state_dict())


def test_stored_head_evaluates_the_kept_head_as_it_is(tmp_path, run_config):
    run_config = {**run_config, "personalisation": "stored-head"}
    context = client_context(run_config)
    global_arrays = ArrayRecord(Net().state_dict())

    def evaluate_now() -> dict:
        return dict(evaluate(message("evaluate", global_arrays), context).content["metrics"])

    before_training = evaluate_now()
    assert before_training["eval_acc"] == before_training["eval_acc_global"]
    assert before_training["eval_loss"] == before_training["eval_loss_global"]

    keep_constant_head(context.state, answer=3)
    after_training = evaluate_now()
    assert after_training["eval_acc_global"] == before_training["eval_acc_global"]
    labels = load_partition_labels(run_config, tmp_path)
    assert after_training["eval_acc"] == pytest.approx(float((labels == 3).mean()))


@pytest.mark.parametrize("personalisation", ["refit-head", "private-head"])
def test_a_refit_head_is_fit_to_the_current_body_from_the_kept_head(run_config, personalisation):
    run_config = {**run_config, "personalisation": personalisation}
    global_arrays = ArrayRecord(Net().state_dict())

    def refit(state: RecordDict | None = None) -> tuple[dict, dict]:
        context = client_context(run_config)
        if state is not None:
            context.state = state
        # No lineage: the head stays in memory, so each call starts from `state` alone.
        reply = evaluate(message("evaluate", global_arrays, server_round=3, lineage=""), context)
        metrics = dict(reply.content["metrics"])
        return metrics, context.state[HEAD_STATE_KEY].to_torch_state_dict()

    metrics, head = refit()
    # The refit's draws come from the run's seed, round and partition: a rerun gives the same head.
    assert metrics["eval_acc"] != metrics["eval_acc_global"]
    for name, value in refit()[1].items():
        torch.testing.assert_close(value, head[name], rtol=0, atol=0)
    # The refit starts from the kept head, not the global one.
    kept = RecordDict()
    keep_constant_head(kept, answer=3)
    warm_head = refit(kept)[1]
    assert not torch.equal(warm_head["bias"], head["bias"])
    # Trained on this client's rows, the head at least learns which labels it sees most.
    config = AppConfig.from_run_config(run_config)
    rows = load_partition(config.data_source, config.partitioning(2), 0)
    majority_share = float(torch.bincount(rows.val.labels, minlength=10).max()) / len(rows.val)
    assert metrics["eval_acc"] >= majority_share - 0.05


@pytest.mark.parametrize("personalisation", PERSONALISATIONS)
def test_what_leaves_a_client_is_what_personalisation_says(run_config, personalisation):
    """The reply's arrays, and what the kept head does to them, for each setting."""
    run_config = {**run_config, "personalisation": personalisation}
    global_arrays = ArrayRecord(Net().state_dict())

    def train_reply(kept_head_answer: int | None) -> dict[str, torch.Tensor]:
        context = client_context(run_config)
        if kept_head_answer is not None:
            keep_constant_head(context.state, kept_head_answer)
        reply = train(message("train", global_arrays), context)
        assert set(reply.content.keys()) == {"arrays", "metrics"}
        return reply.content["arrays"].to_torch_state_dict()

    sent = train_reply(kept_head_answer=3)
    body_keys = set(global_arrays.keys()) - set(HEAD_KEYS)
    if personalisation == "private-head":
        assert set(sent) == body_keys
    else:
        assert set(sent) == set(global_arrays.keys())
    # Only stored-head trains, and so sends, the client's own head.
    other = train_reply(kept_head_answer=7)
    differs = any(not torch.equal(sent[key], other[key]) for key in sent)
    assert differs == (personalisation == "stored-head")

    evaluated = evaluate(message("evaluate", global_arrays), client_context(run_config))
    assert set(evaluated.content.keys()) == {"metrics"}
    assert set(evaluated.content["metrics"].keys()) == {
        "eval_loss", "eval_acc", "eval_loss_global", "eval_acc_global", "num-examples"
    }  # fmt: skip


def test_private_head_trains_the_body_against_the_global_head_held_still(run_config):
    """What `train` sends is exactly the body that SGD gives with the received head frozen,
    whatever head the client keeps."""
    run_config = {**run_config, "personalisation": "private-head"}
    start = Net()
    context = client_context(run_config)
    keep_constant_head(context.state, answer=3)
    sent = train(message("train", ArrayRecord(start.state_dict())), context).content["arrays"]

    expected = Net()
    expected.load_state_dict(start.state_dict())
    expected.fc2.requires_grad_(False)
    config = AppConfig.from_run_config(run_config)
    rows = load_partition(config.data_source, config.partitioning(2), 0)
    generator = client_generator(config.seed, 1, 0)
    sgd = task.SGD(learning_rate=0.1, momentum=config.momentum, batch_size=config.batch_size, device=CPU)
    train_model(expected, rows.train, config.local_epochs, sgd, generator)
    for key, value in sent.to_torch_state_dict().items():
        torch.testing.assert_close(value, expected.state_dict()[key], rtol=0, atol=0)
    assert torch.equal(expected.fc2.weight, start.fc2.weight)


def test_a_refit_follows_the_body_it_is_fit_to(run_config):
    """The same kept head, refit under two bodies, becomes two heads: the refit reads
    the current body's features, not stale ones."""
    heads = []
    for body_seed in (1, 2):
        torch.manual_seed(body_seed)
        arrays = ArrayRecord(Net().state_dict())
        context = client_context(run_config)
        keep_constant_head(context.state, answer=3)
        evaluate(message("evaluate", arrays, lineage=""), context)
        heads.append(context.state[HEAD_STATE_KEY].to_torch_state_dict()["weight"])
    assert not torch.equal(heads[0], heads[1])


def test_the_refit_learns_from_the_train_rows_never_the_validation_rows_it_is_scored_on(
    run_config, monkeypatch
):
    """The client's validation rows are its train images, each labelled as the next class:
    a head refit on them would score them well, one refit on the train rows badly."""
    config = AppConfig.from_run_config(run_config)
    train_rows = load_partition(config.data_source, config.partitioning(2), 0).train
    relabelled = ImageSet(train_rows.images, (train_rows.labels + 1) % NUM_CLASSES)
    refit_rows = []
    fit_head = task.fit_head

    def recording_fit_head(net, data, *settings):
        refit_rows.append(data)
        fit_head(net, data, *settings)

    monkeypatch.setattr(task, "fit_head", recording_fit_head)
    torch.manual_seed(1)  # over bodies from seeds 0..11: 0.01 to 0.15 scored, 0.52 to 0.71 had it read val
    global_arrays = ArrayRecord(Net().state_dict())

    def refit_and_score(partition: Partition) -> float:
        monkeypatch.setattr(client_app, "local_partition", lambda config, node: (partition, "rows", 0))
        reply = evaluate(message("evaluate", global_arrays, lineage=""), client_context(run_config))
        return float(reply.content["metrics"]["eval_acc"])

    scored = refit_and_score(Partition(train=train_rows, val=relabelled))
    assert len(refit_rows) == 1
    assert torch.equal(refit_rows[0].images, train_rows.images)
    assert torch.equal(refit_rows[0].labels, train_rows.labels)
    # What a refit on the validation rows scores: the same client, its train rows relabelled too.
    assert refit_and_score(Partition(train=relabelled, val=relabelled)) > 0.5
    assert scored < 0.3


def load_partition_labels(run_config: dict, tmp_path):
    config = AppConfig.from_run_config(run_config)
    return load_partition(config.data_source, config.partitioning(2), 0).val.labels.numpy()


@pytest.mark.parametrize(("personalisation", "kind"), [("stored-head", "train"), ("refit-head", "evaluate")])
def test_the_head_outlives_its_process_on_the_clients_disk(
    tmp_path, run_config, caplog, personalisation, kind
):
    """stored-head keeps the head it trained; refit-head the head it refit."""
    run_config = {**run_config, "personalisation": personalisation}
    node_config = {"head-dir": str(tmp_path / "heads")}
    arrays = ArrayRecord(Net().state_dict())

    kept_context = client_context(run_config, partition_id=1, **node_config)
    (train if kind == "train" else evaluate)(message(kind, arrays), kept_context)
    head_file = tmp_path / "heads" / ("a" * 32) / "partition-1-of-2.pt"
    kept_head = kept_context.state[HEAD_STATE_KEY].to_torch_state_dict()
    for name, value in torch.load(head_file, weights_only=True).items():
        torch.testing.assert_close(value, kept_head[name])

    # What a restarted SuperNode hands its ClientApp: an empty state.
    with caplog.at_level(logging.INFO, logger="flwr"):
        restored = client_context(run_config, partition_id=1, **node_config)
        evaluate(message("evaluate", arrays), restored)
    assert f"Restored this client's head from {head_file}" in caplog.text
    if personalisation == "stored-head":
        torch.testing.assert_close(
            restored.state[HEAD_STATE_KEY].to_torch_state_dict()["weight"], kept_head["weight"]
        )

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flwr"):
        evaluate(
            message("evaluate", arrays, lineage="b" * 32),
            client_context(run_config, partition_id=1, **node_config),
        )
    assert "Restored" not in caplog.text  # a new lineage starts fresh

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flwr"):  # a run resumed on a federation of 3
        evaluate(message("evaluate", arrays), client_context(run_config, partition_id=1, **node_config,
                                                            **{"num-partitions": 3}))  # fmt: skip
    assert "Restored" not in caplog.text  # partition 1 of 3 holds other rows than 1 of 2
    refit = (tmp_path / "heads" / ("a" * 32) / "partition-1-of-3.pt").is_file()
    assert refit == (personalisation == "refit-head")  # under its own name, beside 1 of 2's


# A SuperNode with its own data folder, and none of the server's paths.


def test_a_node_config_names_its_own_folder_or_a_partition_not_both(tmp_path):
    mine, heads = str(tmp_path / "mine"), str(tmp_path / "h")
    node = NodeConfig.from_node_config({"dataset-path": mine, "head-dir": heads})
    assert (node.dataset_path, node.partition_id, node.head_dir) == (tmp_path / "mine", None, tmp_path / "h")
    both = {"dataset-path": mine, "partition-id": 0, "num-partitions": 2}
    with pytest.raises(ConfigError, match="'dataset-path' and 'partition-id': a SuperNode holds its own"):
        NodeConfig.from_node_config(both)
    with pytest.raises(ConfigError, match='start the SuperNode with --node-config "dataset-path='):
        NodeConfig.from_node_config({})
    with pytest.raises(ConfigError, match="node config key 'dataset-path' = '' is invalid: expected a"):
        NodeConfig.from_node_config({"dataset-path": ""})


@pytest.fixture
def own_folder(run_config, tmp_path) -> Path:
    """Partition 1 of 2 of the run's data, exported as a SuperNode's own folder."""
    config = AppConfig.from_run_config(run_config)
    [_, folder] = export(config.data_source, config.partitioning(2), tmp_path / "exported")
    return folder


def test_a_node_with_its_own_folder_trains_on_its_rows_and_reads_no_server_path(
    run_config, own_folder, tmp_path
):
    """The run-config's paths are the server's: here none of them exists on this node."""
    server_paths = {
        "dataset-path": "/srv/server-only/fmnist",
        "data-cache-dir": "/srv/server-only/cache",
        "output-dir": "/srv/server-only/outputs",
        "resume-from": "/srv/server-only/outputs/2026-12-07/10-00-00",
    }
    node_config = {"dataset-path": str(own_folder), "data-cache-dir": str(tmp_path / "node-cache")}
    context = Context(
        run_id=1,
        node_id=1,
        node_config=node_config,
        state=RecordDict(),
        run_config={**run_config, **server_paths},
    )
    reply = train(message("train", ArrayRecord(Net().state_dict())), context)
    config = AppConfig.from_run_config(run_config)
    simulated = load_partition(config.data_source, config.partitioning(2), 1)
    assert reply.content["metrics"]["num-examples"] == len(simulated.train)
    evaluate(message("evaluate", reply.content["arrays"]), context)
    _, rows_key = load_node_partition(own_folder, tmp_path / "node-cache", 0.2, 42)
    heads = list((tmp_path / "node-cache" / "heads").rglob("*.pt"))
    assert [head.name for head in heads] == [f"own-data-{rows_key[:16]}.pt"]
    assert not Path("/srv/server-only").exists()


def test_an_own_data_clients_head_and_draws_follow_its_rows_not_their_path(run_config, own_folder, tmp_path):
    """The same rows at another path: the same head file and the same draws; other rows
    at the same path: another head, so no client loads a head trained on other rows."""
    config = AppConfig.for_client(run_config, {}, own_data=True)

    def named(folder):
        node = NodeConfig.from_node_config(
            {"dataset-path": str(folder), "data-cache-dir": str(tmp_path / "c")}
        )
        return client_app.local_partition(config, node)[1:]

    moved = shutil.copytree(own_folder, tmp_path / "elsewhere" / "mine")
    assert named(moved) == named(own_folder)
    shutil.rmtree(moved)
    other = AppConfig.from_run_config(run_config)
    shutil.copytree(export(other.data_source, other.partitioning(2), tmp_path / "again")[0], moved)
    assert named(moved)[0] != named(own_folder)[0] and named(moved)[1] != named(own_folder)[1]


def test_a_client_reads_its_settings_from_the_message_before_its_run_config(run_config):
    sent = {"local-epochs": 3, "batch-size": 7, "output-dir": 12}  # a server key: never read
    config = AppConfig.for_client({**run_config, "batch-size": 64}, sent, own_data=True)
    assert (config.local_epochs, config.batch_size) == (3, 7)
    assert config.dataset_path is None  # with its own data, the run's data path is not its to read
    with pytest.raises(ConfigError, match="run-config key 'batch-size' = 0 is invalid"):
        AppConfig.for_client(run_config, {"batch-size": 0}, own_data=True)
