"""The ClientApp: trains the global model, and keeps a model of its own.

A client's own model is the global body under its own classification head (`fc2`). It
keeps that head in `context.state`, which Flower carries from one message to the next
while its SuperNode lives (and on its disk, heads.py, for a restart or a resumed run).
`personalisation` decides how the head is made and what leaves (docs/personalisation.md):
`refit-head` (default) trains and sends the whole model, and refits its own head to the
current body at each evaluation; `private-head` does the same but trains and sends the
body only (FedBABU); `stored-head`, the published example, trains its own head with the
body and sends both.

Replies carry exactly what the server's reply gate expects (rounds.py): train, the
arrays, `train_loss` and `num-examples`; evaluate, four scores and `num-examples`.
"""

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pytorch_example import task
from pytorch_example.config import PRIVATE_HEAD, STORED_HEAD, AppConfig
from pytorch_example.data import Partition, load_partition
from pytorch_example.heads import HeadStore
from pytorch_example.names import (
    GLOBAL_ACCURACY,
    GLOBAL_LOSS,
    LINEAGE_KEY,
    LR_KEY,
    OWN_ACCURACY,
    OWN_LOSS,
    ROWS_KEY,
    TRAIN_LOSS,
)
from pytorch_example.node_data import NodeConfig, load_node_partition

HEAD_STATE_KEY = "classification-head"
REFIT_STREAM = 1  # the refit's random draws, apart from training's in the same round

app = ClientApp()


@dataclass
class ClientRound:
    """What a message gives this client to work with."""

    config: AppConfig  # the run's settings, as the ServerApp sends them
    partition: Partition  # this node's rows
    net: task.Net  # the global model, as received
    sgd: task.SGD  # this round's learning rate, on this client's device
    heads: HeadStore  # its own head on disk
    seed: tuple[int, int, int]  # run seed, round, its rows' stream: what its random draws follow


def setup(msg: Message, context: Context) -> ClientRound:
    """Read the message and node config, and put this client's head from disk into
    `context.state` when a fresh SuperNode's state has none."""
    sent = msg.content["config"]
    node = NodeConfig.from_node_config(context.node_config)
    config = AppConfig.for_client(context.run_config, sent, own_data=node.dataset_path is not None)
    if node.cache_dir is not None:  # the node's own cache, wherever the run-config's lies
        config = dataclasses.replace(config, data_cache_dir=node.cache_dir)
    partition, rows_name, stream = local_partition(config, node)
    heads = HeadStore(node.head_dir or config.data_cache_dir / "heads", sent.get(LINEAGE_KEY), rows_name)
    if HEAD_STATE_KEY not in context.state and (kept := heads.load()) is not None:
        context.state[HEAD_STATE_KEY] = ArrayRecord(kept)
    sgd = task.SGD(float(sent[LR_KEY]), config.momentum, config.batch_size, device())
    seed = (config.seed, int(sent["server-round"]), stream)
    return ClientRound(config, partition, global_model(msg.content["arrays"]), sgd, heads, seed)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this client's partition; send back what
    `personalisation` lets leave the client."""
    client = setup(msg, context)
    net, personalisation = client.net, client.config.personalisation
    if personalisation == STORED_HEAD:
        put_own_head(net, context.state)
    if personalisation == PRIVATE_HEAD:
        net.fc2.requires_grad_(False)  # the global head stays as the server holds it
    generator = client_generator(*client.seed)
    train_loss = task.train(net, client.partition.train, client.config.local_epochs, client.sgd, generator)
    if personalisation == STORED_HEAD:
        keep_head(net, context.state, client.heads)

    arrays = net.state_dict()
    if personalisation == PRIVATE_HEAD:
        arrays = {key: value for key, value in arrays.items() if key not in task.HEAD_KEYS}
    metrics = {TRAIN_LOSS: train_loss, ROWS_KEY: len(client.partition.train)}
    return Message(
        RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)}), reply_to=msg
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score this client's validation rows with the global model (`eval_*_global`) and
    with its own model (`eval_*`); only metrics leave the client."""
    client = setup(msg, context)
    net, val, config = client.net, client.partition.val, client.config
    # Both models share the body: one pass over the validation rows scores both heads.
    val_features = task.body_features(net, val.images, config.eval_batch_size, client.sgd.device)
    global_loss, global_acc = task.score(net.fc2, val_features, val.labels)
    has_own_head = put_own_head(net, context.state)  # the first refit starts from the global head
    if config.personalisation != STORED_HEAD:
        generator = client_generator(*client.seed, REFIT_STREAM)
        task.fit_head(net, client.partition.train, config.head_refit_rows, config.head_refit_epochs,
                      client.sgd, generator)  # fmt: skip
        keep_head(net, context.state, client.heads)
    # With stored-head, a client that has not trained yet has no head of its own: both
    # scores are the global model's.
    own_loss, own_acc = global_loss, global_acc
    if has_own_head or config.personalisation != STORED_HEAD:
        own_loss, own_acc = task.score(net.fc2, val_features, val.labels)
    metrics = {
        OWN_LOSS: own_loss,
        OWN_ACCURACY: own_acc,
        GLOBAL_LOSS: global_loss,
        GLOBAL_ACCURACY: global_acc,
        ROWS_KEY: len(val),
    }
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def global_model(global_arrays: ArrayRecord) -> task.Net:
    net = task.Net()
    net.load_state_dict(global_arrays.to_torch_state_dict())
    return net


def put_own_head(net: task.Net, state: RecordDict) -> bool:
    """Swap in the head this client keeps in `state`; False if it has none yet."""
    if HEAD_STATE_KEY not in state:
        return False
    net.fc2.load_state_dict(state[HEAD_STATE_KEY].to_torch_state_dict())
    return True


def keep_head(net: task.Net, state: RecordDict, heads: HeadStore) -> None:
    """Keep `net`'s head as this client's own, in `state` and on disk."""
    state[HEAD_STATE_KEY] = ArrayRecord(net.fc2.state_dict())
    heads.save(net.fc2.state_dict())


def local_partition(config: AppConfig, node: NodeConfig) -> tuple[Partition, str, int]:
    """This node's rows, what names them (its head file's name) and its stream of random
    draws: those of the partition its config names (its id), or its own folder's (named
    and seeded by a hash of the rows, so by what it holds, not where)."""
    if node.dataset_path is None:
        partitioning = config.partitioning(node.num_partitions)
        partition = load_partition(config.data_source, partitioning, node.partition_id)
        return partition, f"partition-{node.partition_id}-of-{node.num_partitions}", node.partition_id
    # Its cache is its own: the node config's, else the default on its machine (for_client).
    partition, rows_key = load_node_partition(
        node.dataset_path, config.data_cache_dir, config.val_fraction, config.partition_seed
    )
    return partition, f"own-data-{rows_key[:16]}", int(rows_key[:8], 16)


def client_generator(seed: int, server_round: int, partition_id: int, stream: int = 0) -> torch.Generator:
    """RNG for batch order and augmentation (`stream` 0) or a head refit (`REFIT_STREAM`):
    reproducible whatever runs in parallel. (SeedSequence ignores trailing zeros, so
    stream 0 draws what it drew before streams existed.)"""
    state = np.random.SeedSequence([seed, server_round, partition_id, stream]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def device() -> torch.device:
    """CUDA when this ClientApp was given a GPU, otherwise CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
