"""SGD with momentum for `task.train`, without `torch.optim`'s first-step import."""

from collections.abc import Iterable

import torch
from torch.optim.sgd import sgd


class MomentumSGD:
    """`torch.optim.SGD(params, lr, momentum)`, run through PyTorch's functional `sgd`.

    A speed-up: the same update and the same numbers (a test compares them), but the
    class form imports `torch._dynamo` on its first step: 2.4 s that every fresh
    ClientApp process of a deployment would pay before its first batch
    (benchmarks/README.md#one-message-python--m-benchmarksmessage_cost).
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float) -> None:
        self.params = list(params)
        self.lr = lr
        self.momentum = momentum
        self.momentum_buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        with_grad = [index for index, param in enumerate(self.params) if param.grad is not None]
        buffers = [self.momentum_buffers[index] for index in with_grad]
        sgd(
            [self.params[index] for index in with_grad],
            [self.params[index].grad for index in with_grad],
            buffers,  # filled in on the first step, as torch.optim.SGD does
            weight_decay=0.0,
            momentum=self.momentum,
            lr=self.lr,
            dampening=0.0,
            nesterov=False,
            maximize=False,
        )
        for index, buffer in zip(with_grad, buffers, strict=True):
            self.momentum_buffers[index] = buffer
