"""A ClientApp that is this app's own, except on the SuperNodes told to misbehave.

Tests and benchmarks deploy it in place of `pytorch_example.client_app:app` (see
`copy_app(..., client_app=ATTACKS_CLIENT_APP)`). A client attacks when
- its SuperNode was started with the node config `attack="<name>"` (a deployment), or
- the run-config has `attack="<name>"` and its partition id is one of the
  round(`attack-fraction` x number of partitions) lowest (a simulation: pass
  `ATTACK_RUN_CONFIG` to `copy_app`, which adds both keys to the copy's run-config).

- the run-config has `attack-partitions="<id>:<name>,..."`, naming its partition id.

It then sends a train reply changed as the attack says, or (`evaluate-without-rows`) an
evaluate reply without its row count; otherwise it evaluates honestly. Nothing here
ships with the app.
"""

from unittest import mock

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from harness.synthetic_fmnist import NUM_CLASSES
from pytorch_example import client_app
from pytorch_example.config import NodeConfig
from pytorch_example.data import ImageSet, Partition

ATTACKS_CLIENT_APP = "harness.attacks:app"
# Run-config keys `copy_app` adds for a simulation with attackers.
ATTACK_RUN_CONFIG = {"attack": "", "attack-fraction": 0.0, "attack-partitions": ""}

SCALE = 100.0  # "scaled": the update sent 100 times longer
GAUSSIAN_STD = 1.0  # "gaussian": each weight moved by N(0, 1) noise instead of trained


def nan_weights(sent: dict[str, torch.Tensor], received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every weight NaN: what a diverged or broken client sends."""
    return {name: torch.full_like(value, float("nan")) for name, value in sent.items()}


def scaled(sent: dict[str, torch.Tensor], received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The honest update, `SCALE` times longer (model replacement)."""
    return {name: received[name] + SCALE * (value - received[name]) for name, value in sent.items()}


def sign_flip(sent: dict[str, torch.Tensor], received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The honest update, pointing the other way."""
    return {name: received[name] - (value - received[name]) for name, value in sent.items()}


def gaussian(sent: dict[str, torch.Tensor], received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """No training: the received model plus Gaussian noise."""
    return {name: received[name] + GAUSSIAN_STD * torch.randn_like(received[name]) for name in sent}


UPDATE_ATTACKS = {"nan-weights": nan_weights, "scaled": scaled, "sign-flip": sign_flip, "gaussian": gaussian}
LABEL_FLIP = "label-flip"  # trains honestly on labels c -> 9 - c, then sends what it trained
EXTRA_METRIC = "extra-metric"  # an honest train reply with one metric key more
EVALUATE_WITHOUT_ROWS = "evaluate-without-rows"  # an honest evaluate reply without num-examples
ATTACKS = (*UPDATE_ATTACKS, LABEL_FLIP, EXTRA_METRIC, EVALUATE_WITHOUT_ROWS)

app = ClientApp()


def attack_of(context: Context) -> str | None:
    """The attack this client runs, or None."""
    attack = context.node_config.get("attack")
    if attack is None and context.run_config.get("attack-partitions"):
        node = NodeConfig.from_node_config(context.node_config)
        chosen = dict(part.split(":") for part in str(context.run_config["attack-partitions"]).split(","))
        attack = chosen.get(str(node.partition_id))
    elif attack is None and context.run_config.get("attack"):
        node = NodeConfig.from_node_config(context.node_config)
        attackers = round(float(context.run_config["attack-fraction"]) * node.num_partitions)
        attack = context.run_config["attack"] if node.partition_id < attackers else None
    if attack is not None and attack not in ATTACKS:
        raise ValueError(f"attack={attack!r}: not one of {sorted(ATTACKS)}")
    return attack


def flip_labels(partition: Partition) -> Partition:
    train = partition.train
    return Partition(ImageSet(train.images, NUM_CLASSES - 1 - train.labels), partition.val)


@app.train()
def train(msg: Message, context: Context) -> Message:
    attack = attack_of(context)
    if attack == LABEL_FLIP:
        honest_partition = client_app.local_partition
        with mock.patch.object(
            client_app, "local_partition", lambda config, node: flip_labels(honest_partition(config, node))
        ):
            return client_app.train(msg, context)
    reply = client_app.train(msg, context)
    if attack not in UPDATE_ATTACKS and attack != EXTRA_METRIC or reply.has_error():
        return reply
    if attack == EXTRA_METRIC:
        reply.content["metrics"]["train_accuracy"] = 0.5
        return reply
    received = msg.content["arrays"].to_torch_state_dict()
    sent = reply.content["arrays"].to_torch_state_dict()
    reply.content["arrays"] = ArrayRecord(UPDATE_ATTACKS[attack](sent, received))
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    reply = client_app.evaluate(msg, context)
    if attack_of(context) == EVALUATE_WITHOUT_ROWS and not reply.has_error():
        del reply.content["metrics"][client_app.ROWS_KEY]
    return reply
