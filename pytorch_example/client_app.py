"""The ClientApp: trains and evaluates the global model with this client's own head.

Each client keeps its classification head (`fc2`) in `context.state`, which Flower
carries from one message to the next while its SuperNode lives, and on its own disk,
which outlives a restarted SuperNode and a resumed run: the head this client trained
last time replaces the global one before training and before evaluating. The trained
model goes back to the server whole, this head included, and is averaged there.
"""

from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from pytorch_example import task
from pytorch_example.config import AppConfig, NodeConfig
from pytorch_example.data import Partition, load_partition
from pytorch_example.files import save_atomically

HEAD_STATE_KEY = "classification-head"

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this client's partition and send it back."""
    config = run_settings(msg, context)
    node = NodeConfig.from_node_config(context.node_config)
    partition = local_partition(config, node)
    server_round = int(msg.content["config"]["server-round"])

    heads = HeadStore(config, node, msg)
    heads.restore_into(context.state)
    net = model_with_own_head(msg.content["arrays"], context.state)
    train_loss = task.train(
        net,
        partition.train,
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        learning_rate=float(msg.content["config"]["lr"]),
        momentum=config.momentum,
        device=device(),
        generator=client_generator(config.seed, server_round, node.partition_id),
    )
    save_head(net, context.state)
    heads.save(net)

    reply = RecordDict(
        {
            "arrays": ArrayRecord(net.state_dict()),
            "metrics": MetricRecord({"train_loss": train_loss, "num-examples": len(partition.train)}),
        }
    )
    return Message(content=reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received model on this client's validation rows, twice: with this
    client's own head (`eval_*`) and with the global head (`eval_*_global`)."""
    config = run_settings(msg, context)
    node = NodeConfig.from_node_config(context.node_config)
    partition = local_partition(config, node)
    HeadStore(config, node, msg).restore_into(context.state)

    net = global_model(msg.content["arrays"])
    global_loss, global_acc = task.test(net, partition.val, config.eval_batch_size, device())
    # Before a client has trained it has no head of its own: both scores are the global model's.
    own_loss, own_acc = global_loss, global_acc
    if put_own_head(net, context.state):
        own_loss, own_acc = task.test(net, partition.val, config.eval_batch_size, device())
    metrics = {
        "eval_loss": own_loss,
        "eval_acc": own_acc,
        "eval_loss_global": global_loss,
        "eval_acc_global": global_acc,
        "num-examples": len(partition.val),
    }
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def run_settings(msg: Message, context: Context) -> AppConfig:
    """The run's settings, as the ServerApp sends them with each message."""
    return AppConfig.from_run_config({**context.run_config, **msg.content["config"]})


def global_model(global_arrays: ArrayRecord) -> task.Net:
    net = task.Net()
    net.load_state_dict(global_arrays.to_torch_state_dict())
    return net


def put_own_head(net: task.Net, state: RecordDict) -> bool:
    """Swap in the head this client saved in `state`; False if it has none yet."""
    if HEAD_STATE_KEY not in state:
        return False
    net.fc2.load_state_dict(state[HEAD_STATE_KEY].to_torch_state_dict())
    return True


def model_with_own_head(global_arrays: ArrayRecord, state: RecordDict) -> task.Net:
    """The global model, with the head this client saved in `state` if it has one."""
    net = global_model(global_arrays)
    put_own_head(net, state)
    return net


def save_head(net: task.Net, state: RecordDict) -> None:
    """Keep this client's head for the next round it takes part in."""
    state[HEAD_STATE_KEY] = ArrayRecord(net.fc2.state_dict())


class HeadStore:
    """This client's head on its own disk: `<head-dir>/<lineage>/partition-<id>-of-<n>.pt`.

    `head-dir` comes from the node config, else `<data-cache-dir>/heads`. The lineage
    (sent by the ServerApp) is the same for a run and its resumptions, which must keep
    its data settings; with the partition id and count, the name holds all that
    decides the client's rows. So a resumed run finds its heads, a new run starts
    fresh, and no client loads a head trained on other rows.
    """

    def __init__(self, config: AppConfig, node: NodeConfig, msg: Message) -> None:
        head_dir = node.head_dir or config.data_cache_dir / "heads"
        lineage = msg.content["config"].get("lineage")
        # Without a lineage (a ServerApp other than this app's) heads stay in memory only.
        self.path = None
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


def client_generator(seed: int, server_round: int, partition_id: int) -> torch.Generator:
    """RNG for batch order and augmentation: reproducible whatever runs in parallel."""
    state = np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def device() -> torch.device:
    """CUDA when this ClientApp was given a GPU, otherwise CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
