"""The server's step: how far the global model moves toward the round's aggregate.

By default all the way: the aggregate becomes the model (FedAvg). With
`server-learning-rate` and `server-momentum`, the server treats the model minus the
aggregate as a gradient and takes an SGD step with momentum on it, FedAvgM (Hsu et al.
2019); on DP's noisy mean, DP-FedAvgM (McMahan et al. 2018). Momentum sums the rounds'
updates, whose noise is independent from round to round while their direction is not.

The step reads only the released model and the aggregate, so with DP it is
post-processing: epsilon is the same with it as without. That is why it is not Flower's
`FedAvgM` (the same step, a test compares them): FedAvgM steps inside FedAvg's
aggregation, so under DP's wrapper its momentum would carry each round's mean before
the noise into the next rounds; and it steps on FedAvg's mean only, not a robust rule's.
"""

import torch
from flwr.app import Array, ArrayRecord

from pytorch_example.config import AppConfig
from pytorch_example.momentum_sgd import MomentumSGD


class ServerStep:
    """SGD with momentum on the server's pseudo-gradient, model minus aggregate.

    `velocity` (the momentum buffer, per model entry) goes on from a resumed run's; with
    `server-momentum` 0 there is none. A velocity once kept is never changed in place (each
    step works on copies), so the run's outputs may hold it beside its round's model.
    """

    def __init__(self, config: AppConfig, velocity: dict[str, torch.Tensor] | None = None) -> None:
        self.learning_rate = config.server_learning_rate
        self.momentum = config.server_momentum
        self.velocity = (velocity or {}) if self.momentum else {}  # resumed without momentum: none

    @property
    def moves_all_the_way(self) -> bool:
        """Whether the step is FedAvg's: the aggregate becomes the model."""
        return self.learning_rate == 1.0 and self.momentum == 0.0

    def description(self) -> str:
        """The step in words, for the ServerApp's log."""
        velocity = ", its velocity resumed" if self.velocity else ""
        return (
            f"SGD on model minus aggregate, learning rate {self.learning_rate:g}, momentum "
            f"{self.momentum:g}{velocity} (FedAvgM; with DP, on the released model: epsilon unchanged)"
        )

    def __call__(self, model: ArrayRecord, aggregate: ArrayRecord) -> ArrayRecord:
        """The model after one step toward `aggregate`. After a step that leaves a NaN or
        Inf (the round loop then drops its model) the velocity stays as it was."""
        if self.moves_all_the_way:
            return aggregate
        weights = {key: torch.tensor(array.numpy(), dtype=torch.float32) for key, array in model.items()}
        for key, weight in weights.items():
            weight.grad = weight - torch.from_numpy(aggregate[key].numpy()).float()
        optimizer = MomentumSGD(weights.values(), lr=self.learning_rate, momentum=self.momentum)
        # Copies: the step updates its buffers in place, and a failed step keeps the old.
        optimizer.momentum_buffers = [
            None if (velocity := self.velocity.get(key)) is None else velocity.clone() for key in weights
        ]
        optimizer.step()
        if self.momentum and all(torch.isfinite(weight).all() for weight in weights.values()):
            self.velocity = dict(zip(weights, optimizer.momentum_buffers, strict=True))
        return ArrayRecord({key: Array(weight.numpy()) for key, weight in weights.items()})
