"""The ClientApp: trains and evaluates the global model with this client's own head.

Each client keeps its classification head (`fc2`) in `context.state`, which Flower
carries from one message to the next for the whole run: the head this client trained
last time replaces the global one before training and before evaluating.
"""

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pytorch_example import task
from pytorch_example.config import AppConfig, ConfigError
from pytorch_example.data import DataError, Partition, load_partition

HEAD_STATE_KEY = "classification-head"

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this client's partition and send it back."""
    config = AppConfig.from_run_config(context.run_config)
    partition_id, partition = local_partition(config, context)
    server_round = int(msg.content["config"]["server-round"])

    net = model_with_own_head(msg.content["arrays"], context.state)
    train_loss = task.train(
        net,
        partition.train,
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        learning_rate=float(msg.content["config"]["lr"]),
        momentum=config.momentum,
        device=device(),
        generator=client_generator(config.seed, server_round, partition_id),
    )
    save_head(net, context.state)

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
    config = AppConfig.from_run_config(context.run_config)
    _, partition = local_partition(config, context)

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


def local_partition(config: AppConfig, context: Context) -> tuple[int, Partition]:
    """This node's partition id and data, as its node config names them."""
    partition_id = node_setting(context, "partition-id")
    num_partitions = node_setting(context, "num-partitions")
    try:
        return partition_id, load_partition(config.data_settings(num_partitions), partition_id)
    except DataError as err:
        if err.setting == "num_partitions":
            raise ConfigError(
                f"node config partition-id={partition_id} num-partitions={num_partitions}: {err}"
            ) from None
        raise config.data_error(err) from None


def node_setting(context: Context, key: str) -> int:
    """An integer from the node config (`partition-id`, `num-partitions`), or one clear error."""
    try:
        return int(context.node_config[key])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            f"node config key '{key}' is missing or not an integer: start the SuperNode "
            f'with --node-config "partition-id=<i> num-partitions=<n>"'
        ) from None


def client_generator(seed: int, server_round: int, partition_id: int) -> torch.Generator:
    """RNG for batch order and augmentation: reproducible whatever runs in parallel."""
    state = np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def device() -> torch.device:
    """CUDA when this ClientApp was given a GPU, otherwise CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
