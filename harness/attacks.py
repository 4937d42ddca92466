"""A ClientApp that is this app's own, except on the SuperNodes told to misbehave.

Tests and benchmarks deploy it in place of `pytorch_example.client_app:app` (see
`copy_app(..., client_app=ATTACKS_CLIENT_APP)`): a SuperNode started with the node
config `attack="<name>"` trains honestly, then changes its train reply as the attack
says. Nothing here ships with the app.
"""

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from pytorch_example import client_app

ATTACKS_CLIENT_APP = "harness.attacks:app"


def nan_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every weight NaN: what a diverged or broken client sends."""
    return {name: torch.full_like(value, float("nan")) for name, value in weights.items()}


ATTACKS = {"nan-weights": nan_weights}

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = client_app.train(msg, context)
    attack = context.node_config.get("attack")
    if attack is None:
        return reply
    if attack not in ATTACKS:
        raise ValueError(f"node config attack={attack!r}: not one of {sorted(ATTACKS)}")
    weights = reply.content["arrays"].to_torch_state_dict()
    reply.content["arrays"] = ArrayRecord(ATTACKS[attack](weights))
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return client_app.evaluate(msg, context)
