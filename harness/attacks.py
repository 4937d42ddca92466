"""A ClientApp that is this app's own, except on the SuperNodes told to misbehave.

Tests and benchmarks deploy it in place of `pytorch_example.client_app:app` (see
`copy_app(..., client_app=ATTACKS_CLIENT_APP)`). A client attacks when
- its SuperNode was started with the node config `attack="<name>"` (a deployment), or
- the run-config has `attack="<name>"` and its partition id is one of the
  round(`attack-fraction` x number of partitions) lowest (a simulation: pass
  `ATTACK_RUN_CONFIG` to `copy_app`, which adds the keys to the copy's run-config), or
- the run-config has `attack-partitions="<id>:<name>,..."`, naming its partition id.

It then sends a train reply changed as the attack says, or (`evaluate-without-rows`) an
evaluate reply without its row count; otherwise it evaluates honestly. Nothing here
ships with the app.

The colluding attacks (`alie`, `ipm`) are computed from the honest updates of every
partition attacking in the run (in a simulation only: a deployment's attacker knows no
other). Each attacker trains each of those partitions honestly on the model it
received, as that partition's client would, and they share the results through a
folder (`attack-pool-dir`, by default `<data-cache-dir>/attack-pool/<run id>`), so
each is trained once a round. That is perfect collusion, an upper bound on what separate
attackers can coordinate; they do not see the honest clients' updates.
"""

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from harness.synthetic_fmnist import NUM_CLASSES
from pytorch_example import client_app
from pytorch_example.config import AppConfig
from pytorch_example.data import ImageSet, Partition
from pytorch_example.files import save_atomically
from pytorch_example.names import ROWS_KEY
from pytorch_example.node_data import NodeConfig

ATTACKS_CLIENT_APP = "harness.attacks:app"
# Run-config keys `copy_app` adds for a simulation with attackers.
# `attack-pool-dir`: where colluders share their updates ("": <data-cache-dir>/attack-pool/<run id>).
ATTACK_RUN_CONFIG = {"attack": "", "attack-fraction": 0.0, "attack-partitions": "", "attack-pool-dir": ""}

SCALE = 100.0  # "scaled": the update sent 100 times longer
GAUSSIAN_STD = 1.0  # "gaussian": each weight moved by N(0, 1) noise instead of trained
HUGE = 1e30  # "huge-weights": every weight trained, x this (finite in float32, up to 3.4e38)
# byzfl's defaults: ALIE sends the colluders' mean update plus 1.5 standard deviations
# per weight; IPM sends their mean update x -2.
ALIE_TAU = 1.5
IPM_TAU = 2.0

State = dict[str, torch.Tensor]


@dataclass
class Seen:
    """What an attacker has to work with in a round."""

    trained: State  # the model it trained, honestly
    received: State  # the global model it was sent
    sampled: int  # how many clients a round samples, as the run-config and federation say
    colluders: Callable[[], list[State]]  # the honest updates of every attacking partition


def nan_weights(seen: Seen) -> State:
    """Every weight NaN: what a diverged or broken client sends."""
    return {name: torch.full_like(value, float("nan")) for name, value in seen.trained.items()}


def scaled(seen: Seen) -> State:
    """The honest update, `SCALE` times longer."""
    return {
        name: seen.received[name] + SCALE * (value - seen.received[name])
        for name, value in seen.trained.items()
    }


def sign_flip(seen: Seen) -> State:
    """The honest update, pointing the other way."""
    return {name: seen.received[name] - (value - seen.received[name]) for name, value in seen.trained.items()}


def gaussian(seen: Seen) -> State:
    """No training: the received model plus Gaussian noise."""
    return {
        name: seen.received[name] + GAUSSIAN_STD * torch.randn_like(seen.received[name])
        for name in seen.trained
    }


def huge_weights(seen: Seen) -> State:
    """Every weight it trained x `HUGE`: finite, so no shape check can refuse it."""
    return {name: HUGE * value for name, value in seen.trained.items()}


def replacement(seen: Seen) -> State:
    """Model replacement: g + (W / w)(t - g), which a weighted mean over W rows, w of them
    its own, turns into the target t; here t = 0 (a model that says nothing), and W / w
    the number of clients a round samples (as if all held as many rows)."""
    return {name: (1 - seen.sampled) * seen.received[name] for name in seen.trained}


def alie(seen: Seen) -> State:
    """ "A little is enough" (Baruch et al., 2019), byzfl's: the colluders' mean update
    plus `ALIE_TAU` of their standard deviations, per weight: within the spread of honest
    updates, so per-weight rules keep it, yet all of it pushes one way."""
    from byzfl import ALittleIsEnough  # noqa: PLC0415 (byzfl takes 3 s to import; two attacks use it)

    return from_pool(seen, ALittleIsEnough(tau=ALIE_TAU))


def ipm(seen: Seen) -> State:
    """Inner-product manipulation (Xie et al., 2020), byzfl's: the colluders' mean update
    x -`IPM_TAU`, so that the aggregate's inner product with the true update shrinks."""
    from byzfl import InnerProductManipulation  # noqa: PLC0415 (as in `alie`)

    return from_pool(seen, InnerProductManipulation(tau=IPM_TAU))


def from_pool(seen: Seen, attack: Callable[[np.ndarray], np.ndarray]) -> State:
    """The received model plus `attack` of the colluders' updates, stacked flat."""
    updates = seen.colluders()
    if len(updates) < 2:  # one update has no spread: ALIE's would be NaN, and the gate would drop it
        raise ValueError(f"{len(updates)} colluding partition(s): the colluding attacks need 2 or more")
    names = list(seen.trained)
    stacked = np.stack(
        [np.concatenate([update[name].flatten().numpy() for name in names]) for update in updates]
    )
    vector = torch.from_numpy(np.asarray(attack(stacked), dtype=np.float32))
    sent, start = {}, 0
    for name in names:
        size = seen.received[name].numel()
        sent[name] = seen.received[name] + vector[start : start + size].reshape(seen.received[name].shape)
        start += size
    return sent


UPDATE_ATTACKS = {
    "nan-weights": nan_weights,
    "scaled": scaled,
    "sign-flip": sign_flip,
    "gaussian": gaussian,
    "huge-weights": huge_weights,
    "replacement": replacement,
    "alie": alie,
    "ipm": ipm,
}
COLLUDING = ("alie", "ipm")
LABEL_FLIP = "label-flip"  # trains honestly on labels c -> 9 - c, then sends what it trained
EXTRA_METRIC = "extra-metric"  # an honest train reply with one metric key more
EVALUATE_WITHOUT_ROWS = "evaluate-without-rows"  # an honest evaluate reply without num-examples
ATTACKS = (*UPDATE_ATTACKS, LABEL_FLIP, EXTRA_METRIC, EVALUATE_WITHOUT_ROWS)

app = ClientApp()


def attack_of(context: Context) -> str | None:
    """The attack this client runs, or None."""
    attack = context.node_config.get("attack")
    if attack is None:
        node = NodeConfig.from_node_config(context.node_config)
        if node.partition_id is None:  # a node of its own data: the run-config names no partition of it
            return None
        attack = attackers(context.run_config, node.num_partitions).get(node.partition_id)
    elif attack in COLLUDING:
        raise ValueError(f"attack={attack!r} colludes with the run's other attackers: simulation only")
    if attack is not None and attack not in ATTACKS:
        raise ValueError(f"attack={attack!r}: not one of {sorted(ATTACKS)}")
    return attack


def attackers(run_config, num_partitions: int) -> dict[int, str]:
    """The partitions the run-config makes attack, with their attacks (a simulation's)."""
    if run_config.get("attack-partitions"):
        chosen = (part.split(":") for part in str(run_config["attack-partitions"]).split(","))
        return {int(partition): attack for partition, attack in chosen}
    if run_config.get("attack"):
        count = round(float(run_config["attack-fraction"]) * num_partitions)
        return dict.fromkeys(range(count), str(run_config["attack"]))
    return {}


def colluders_of(msg: Message, context: Context, attack: str) -> Callable[[], list[State]]:
    """The honest updates, this round, of every partition that runs `attack`: trained
    here, or read from the folder where another attacker saved them."""

    def updates() -> list[State]:
        node = NodeConfig.from_node_config(context.node_config)
        partitions = [
            p for p, name in attackers(context.run_config, node.num_partitions).items() if name == attack
        ]
        config = AppConfig.for_client(context.run_config, msg.content["config"], own_data=False)
        default_pool = config.data_cache_dir / "attack-pool" / str(context.run_id)
        pool = Path(context.run_config.get("attack-pool-dir") or default_pool)
        pool.mkdir(parents=True, exist_ok=True)
        received = msg.content["arrays"].to_torch_state_dict()
        return [
            honest_update(msg, context, partition, node.num_partitions, pool, received)
            for partition in partitions
        ]

    return updates


def honest_update(
    msg: Message, context: Context, partition: int, num_partitions: int, pool: Path, received: State
) -> State:
    """What partition `partition`'s client would send this round, minus the model sent."""
    digest = hashlib.sha256()
    for name, value in received.items():
        digest.update(name.encode() + value.numpy().tobytes())
    digest.update(
        repr(sorted(dict(msg.content["config"]).items())).encode() + f"{partition}/{num_partitions}".encode()
    )
    path = pool / f"{digest.hexdigest()}.pt"
    try:
        return torch.load(path, weights_only=True)
    except FileNotFoundError:
        pass  # not trained yet this round
    # Its own head folder: a stored-head colleague keeps its head, which must not be the real client's.
    node_config = {
        **context.node_config,
        "partition-id": partition,
        "num-partitions": num_partitions,
        "head-dir": str(pool / "heads"),
    }
    node_config.pop("attack", None)
    colleague = Context(
        run_id=context.run_id,
        node_id=0,
        node_config=node_config,
        state=RecordDict(),
        run_config=context.run_config,
    )
    trained = client_app.train(msg, colleague).content["arrays"].to_torch_state_dict()
    update = {name: value - received[name] for name, value in trained.items()}
    buffer = io.BytesIO()
    torch.save(update, buffer)
    save_atomically(path, lambda file: file.write(buffer.getvalue()))
    return update


def flip_labels(partition: Partition, *named) -> tuple:
    """`local_partition`'s partition, its train labels c -> 9 - c; its name and stream as they were."""
    train = partition.train
    return Partition(ImageSet(train.images, NUM_CLASSES - 1 - train.labels), partition.val), *named


@app.train()
def train(msg: Message, context: Context) -> Message:
    attack = attack_of(context)
    if attack == LABEL_FLIP:
        honest_partition = client_app.local_partition
        with mock.patch.object(
            client_app, "local_partition", lambda config, node: flip_labels(*honest_partition(config, node))
        ):
            return client_app.train(msg, context)
    reply = client_app.train(msg, context)
    if attack not in UPDATE_ATTACKS and attack != EXTRA_METRIC or reply.has_error():
        return reply
    if attack == EXTRA_METRIC:
        reply.content["metrics"]["train_accuracy"] = 0.5
        return reply
    node = NodeConfig.from_node_config(context.node_config)
    seen = Seen(
        trained=reply.content["arrays"].to_torch_state_dict(),
        received=msg.content["arrays"].to_torch_state_dict(),
        # As the run samples from the simulation's SuperNodes; a deployment's node does not
        # know how many there are (2, the least).
        sampled=max(int((node.num_partitions or 0) * float(context.run_config["fraction-train"])), 2),
        colluders=colluders_of(msg, context, attack),
    )
    reply.content["arrays"] = ArrayRecord(UPDATE_ATTACKS[attack](seen))
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    reply = client_app.evaluate(msg, context)
    if attack_of(context) == EVALUATE_WITHOUT_ROWS and not reply.has_error():
        del reply.content["metrics"][ROWS_KEY]
    return reply
