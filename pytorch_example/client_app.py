"""The ClientApp: trains the global model, and keeps a model of its own.

A client's own model is the global body with its own classification head (`fc2`). It
keeps that head in `context.state`, which Flower carries from one message to the next
while its SuperNode lives, and on its own disk, which outlives a restarted SuperNode
and a resumed run. The run-config's `personalisation` decides how the head is made and
what leaves the client each round:

- `refit-head` (default): train the global model as received, as FedAvg does, and send
  it back whole: body and the update of the *global* head. At each evaluation, refit
  the own head to the current body: head-only SGD on this client's train rows, starting
  from the head it kept. The own head never leaves the client.
- `private-head`: train the body only, against the global head, which stays the
  initial model's for the whole run (FedBABU); send the body only. The own head is
  refit as above. No head leaves the client.
- `stored-head`: the published example. Swap the kept head into the global model, train
  the whole, send the whole (the own head is averaged into the global one), keep the
  trained head, and evaluate with it as it is.

Beside the arrays, a train reply carries `train_loss` and `num-examples`; an evaluate
reply carries scores and a row count only. The server takes a reply only when it is
exactly that (rounds.py), and DP's clipping and noise happen there (trust.py).
"""

import re
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from pytorch_example import task
from pytorch_example.config import PRIVATE_HEAD, STORED_HEAD, AppConfig, ConfigError, NodeConfig
from pytorch_example.data import Partition, load_partition
from pytorch_example.files import save_atomically

# The keys of the messages this ClientApp reads and the replies it sends.
LR_KEY = "lr"  # in train and evaluate messages: the round's learning rate
LINEAGE_KEY = "lineage"  # in every message: the run (and its resumptions) heads are kept for
ROWS_KEY = "num-examples"  # in every reply: the rows trained on or scored
TRAIN_METRIC_KEYS = ("train_loss", ROWS_KEY)
EVALUATE_METRIC_KEYS = ("eval_loss", "eval_acc", "eval_loss_global", "eval_acc_global", ROWS_KEY)

HEAD_STATE_KEY = "classification-head"
REFIT_STREAM = 1  # the refit's random draws, apart from training's in the same round

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this client's partition; send back what
    `personalisation` lets leave the client."""
    config = run_settings(msg, context)
    node = NodeConfig.from_node_config(context.node_config)
    partition = local_partition(config, node)
    server_round = int(msg.content["config"]["server-round"])

    net = global_model(msg.content["arrays"])
    heads = HeadStore(config, node, msg)
    if config.personalisation == STORED_HEAD:
        heads.restore_into(context.state)
        put_own_head(net, context.state)
    if config.personalisation == PRIVATE_HEAD:
        net.fc2.requires_grad_(False)  # the global head stays as the server holds it
    train_loss = task.train(
        net,
        partition.train,
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        learning_rate=float(msg.content["config"][LR_KEY]),
        momentum=config.momentum,
        device=device(),
        generator=client_generator(config.seed, server_round, node.partition_id),
    )
    if config.personalisation == STORED_HEAD:
        keep_head(net, context.state, heads)

    metrics = {"train_loss": train_loss, ROWS_KEY: len(partition.train)}
    reply = RecordDict(
        {"arrays": ArrayRecord(sent_arrays(net, config.personalisation)), "metrics": MetricRecord(metrics)}
    )
    return Message(content=reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score this client's validation rows with the global model (`eval_*_global`) and
    with its own model (`eval_*`); only metrics leave the client."""
    config = run_settings(msg, context)
    node = NodeConfig.from_node_config(context.node_config)
    partition = local_partition(config, node)
    server_round = int(msg.content["config"]["server-round"])
    heads = HeadStore(config, node, msg)
    heads.restore_into(context.state)

    net = global_model(msg.content["arrays"])
    global_loss, global_acc = task.test(net, partition.val, config.eval_batch_size, device())
    if config.personalisation == STORED_HEAD:
        # Before a client has trained it has no head of its own: both scores are the global model's.
        own_loss, own_acc = global_loss, global_acc
        if put_own_head(net, context.state):
            own_loss, own_acc = task.test(net, partition.val, config.eval_batch_size, device())
    else:
        put_own_head(net, context.state)  # a client's first refit starts from the global head
        task.fit_head(
            net,
            partition.train,
            epochs=config.head_refit_epochs,
            batch_size=config.batch_size,
            learning_rate=float(msg.content["config"][LR_KEY]),
            momentum=config.momentum,
            device=device(),
            generator=client_generator(config.seed, server_round, node.partition_id, REFIT_STREAM),
        )
        keep_head(net, context.state, heads)
        own_loss, own_acc = task.test(net, partition.val, config.eval_batch_size, device())
    metrics = {
        "eval_loss": own_loss,
        "eval_acc": own_acc,
        "eval_loss_global": global_loss,
        "eval_acc_global": global_acc,
        ROWS_KEY: len(partition.val),
    }
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def run_settings(msg: Message, context: Context) -> AppConfig:
    """The run's settings, as the ServerApp sends them with each message."""
    return AppConfig.from_run_config({**context.run_config, **msg.content["config"]})


def global_model(global_arrays: ArrayRecord) -> task.Net:
    net = task.Net()
    net.load_state_dict(global_arrays.to_torch_state_dict())
    return net


def sent_arrays(net: task.Net, personalisation: str) -> dict[str, torch.Tensor]:
    """The part of the trained model that goes to the server: all of it, or (with
    `private-head`) all but the head."""
    arrays = net.state_dict()
    if personalisation == PRIVATE_HEAD:
        arrays = {key: value for key, value in arrays.items() if key not in task.HEAD_KEYS}
    return arrays


def put_own_head(net: task.Net, state: RecordDict) -> bool:
    """Swap in the head this client keeps in `state`; False if it has none yet."""
    if HEAD_STATE_KEY not in state:
        return False
    net.fc2.load_state_dict(state[HEAD_STATE_KEY].to_torch_state_dict())
    return True


def keep_head(net: task.Net, state: RecordDict, heads: "HeadStore") -> None:
    """Keep `net`'s head as this client's own, in `state` and on disk."""
    state[HEAD_STATE_KEY] = ArrayRecord(net.fc2.state_dict())
    heads.save(net)


class HeadStore:
    """This client's head on its own disk: `<head-dir>/<lineage>/partition-<id>-of-<n>.pt`.

    `head-dir` comes from the node config, else `<data-cache-dir>/heads`. The lineage
    (sent by the ServerApp) is the same for a run and its resumptions, which must keep
    its data and personalisation settings; with the partition id and count, the name
    holds all that decides the client's rows. So a resumed run finds its heads, a new run starts
    fresh, and no client loads a head trained on other rows.
    """

    def __init__(self, config: AppConfig, node: NodeConfig, msg: Message) -> None:
        head_dir = node.head_dir or config.data_cache_dir / "heads"
        lineage = msg.content["config"].get(LINEAGE_KEY)
        # Without a lineage (a ServerApp other than this app's) heads stay in memory only.
        self.path = None
        if lineage and not re.fullmatch(r"[0-9a-f]{32}", str(lineage)):
            # It names a folder: anything but a plain run id could lead outside head-dir.
            raise ConfigError(f"message key '{LINEAGE_KEY}' = {lineage!r} is not a run id (32 hex digits)")
        if lineage:
            name = f"partition-{node.partition_id}-of-{node.num_partitions}.pt"
            self.path = head_dir / str(lineage) / name

    def restore_into(self, state: RecordDict) -> None:
        """Put the head from disk into `state` when `state` has none (a fresh SuperNode)."""
        if self.path is None or HEAD_STATE_KEY in state or not self.path.is_file():
            return
        state[HEAD_STATE_KEY] = ArrayRecord(torch.load(self.path, weights_only=True))
        log(INFO, "Restored this client's head from %s", self.path)

    def save(self, net: task.Net) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        head = net.fc2.state_dict()
        save_atomically(self.path, lambda file: torch.save(head, file))


def local_partition(config: AppConfig, node: NodeConfig) -> Partition:
    """The data of the partition this node's config names."""
    partitioning = config.partitioning(node.num_partitions)
    return load_partition(config.data_source, partitioning, node.partition_id)


def client_generator(seed: int, server_round: int, partition_id: int, stream: int = 0) -> torch.Generator:
    """RNG for batch order and augmentation (`stream` 0) or a head refit (`REFIT_STREAM`):
    reproducible whatever runs in parallel. (SeedSequence ignores trailing zeros, so
    stream 0 draws what it drew before streams existed.)"""
    state = np.random.SeedSequence([seed, server_round, partition_id, stream]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def device() -> torch.device:
    """CUDA when this ClientApp was given a GPU, otherwise CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
