"""The model and what is done with it: the CNN, batch augmentation, train, a head-only
refit, and test.

Data arrives as uint8 tensors (see `data.py`); augmentation and normalisation run on
whole tensors on the training device, so no Python code runs per image.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pytorch_example.data import ImageSet
from pytorch_example.momentum_sgd import MomentumSGD

# The reference example's normalisation constants, kept so accuracies stay comparable.
NORMALIZE_MEAN = 0.1307
NORMALIZE_STD = 0.3081
CROP_PADDING = 4
HEAD_KEYS = ("fc2.weight", "fc2.bias")  # the classification head's entries in `Net().state_dict()`
REFIT_FEATURE_BATCH = 256  # images per body pass when a refit computes features: bounds memory


class Net(nn.Module):
    """Small CNN for 28x28 grey images: a body (`conv1` to `fc1`) that turns an image into
    128 features, and `fc2`, the classification head (1,290 parameters) on top."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc1 = nn.Linear(32 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the body makes of `x`: the head's input."""
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return F.relu(self.fc1(x.flatten(1)))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 `[N, 28, 28]` -> normalised float `[N, 1, 28, 28]`."""
    return ((images.float() / 255.0 - NORMALIZE_MEAN) / NORMALIZE_STD).unsqueeze(1)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 28x28 crop of the zero-padded image and random horizontal flip, per image.

    The same distribution as torchvision's `RandomCrop(28, padding=4)` followed by
    `RandomHorizontalFlip()`, drawn for the whole batch at once. A speed-up: no Python
    runs per image (benchmarks/README.md#round-cost-python--m-benchmarksround_cost).
    """
    count, height, width = images.shape
    padded = F.pad(images, (CROP_PADDING,) * 4)
    # Every possible crop as a view [count, 9, 9, height, width]; pick one per image.
    windows = padded.unfold(1, height, 1).unfold(2, width, 1)
    offsets = torch.randint(0, 2 * CROP_PADDING + 1, (2, count), generator=generator).to(images.device)
    cropped = windows[torch.arange(count, device=images.device), offsets[0], offsets[1]]
    flip = (torch.rand(count, generator=generator) < 0.5).to(images.device).view(-1, 1, 1)
    return torch.where(flip, cropped.flip(-1), cropped)


@dataclass(frozen=True)
class SGD:
    """How a client takes its steps: SGD with momentum, in batches, on a device."""

    learning_rate: float
    momentum: float
    batch_size: int
    device: torch.device


def train(net: nn.Module, data: ImageSet, epochs: int, sgd: SGD, generator: torch.Generator) -> float:
    """Train `net`'s parameters that require a gradient with `sgd` on augmented `data`;
    return the mean loss over batches."""
    device, batch_size = sgd.device, sgd.batch_size
    net.to(device).train()
    trainable = [param for param in net.parameters() if param.requires_grad]
    optimizer = MomentumSGD(trainable, lr=sgd.learning_rate, momentum=sgd.momentum)
    images, labels = data.images.to(device), data.labels.to(device)
    loss_sum = torch.zeros((), device=device)
    num_batches = 0
    for _ in range(epochs):
        inputs = normalize(augment(images, generator))
        order = torch.randperm(len(labels), generator=generator).to(device)
        for batch in order.split(batch_size):
            loss = F.cross_entropy(net(inputs[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            num_batches += 1
    return (loss_sum / max(num_batches, 1)).item()


@torch.no_grad()
def fit_head(net: Net, data: ImageSet, rows: int, epochs: int, sgd: SGD, generator: torch.Generator) -> None:
    """Train only `net.fc2` with `sgd` on a sample of `rows` of `data` drawn with
    `generator` (all of them when `rows` is 0), the body fixed; `net` stays on `sgd.device`.

    The body runs once over the sample (no augmentation), and the epochs run on the head
    alone, a linear layer on 128 features: that one forward pass is most of the cost, so
    the sample bounds it (benchmarks/README.md#round-cost-python--m-benchmarksround_cost).
    The head's gradient is written out (softmax minus one-hot): autograd's bookkeeping
    would cost more than this layer's arithmetic. Same steps as `torch.optim.SGD` (tested).
    """
    sample = torch.randperm(len(data), generator=generator)[: rows or len(data)]
    features = body_features(net, data.images[sample], REFIT_FEATURE_BATCH, sgd.device)
    labels = data.labels[sample].to(sgd.device)
    head = net.fc2
    velocity = [torch.zeros_like(head.weight), torch.zeros_like(head.bias)]
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator).to(sgd.device)
        for batch in order.split(sgd.batch_size):
            inputs = features[batch]
            error = torch.softmax(head(inputs), 1)  # d(mean cross-entropy)/d(logits), x batch size
            error[torch.arange(len(batch), device=sgd.device), labels[batch]] -= 1
            error /= len(batch)
            gradients = (error.T @ inputs, error.sum(0))
            # SGD with momentum in place, as `MomentumSGD` steps: its per-step bookkeeping
            # would cost more than these two small updates.
            for param, gradient, step in zip((head.weight, head.bias), gradients, velocity, strict=True):
                param.sub_(step.mul_(sgd.momentum).add_(gradient), alpha=sgd.learning_rate)


@torch.no_grad()
def body_features(net: Net, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """What `net`'s body makes of `images`, `batch_size` at a time: its head's input.
    A client scores its global and its own model on the same features."""
    net.to(device).eval()
    return torch.cat([net.features(normalize(batch.to(device))) for batch in images.split(batch_size)])


@torch.no_grad()
def score(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Return mean cross-entropy loss and accuracy of `head` on `features`."""
    labels = labels.to(features.device)
    logits = head(features)
    loss = F.cross_entropy(logits, labels, reduction="sum").item() if len(labels) else 0.0
    count = max(len(labels), 1)
    return loss / count, (logits.argmax(1) == labels).sum().item() / count


def test(net: Net, data: ImageSet, batch_size: int, device: torch.device) -> tuple[float, float]:
    """Return mean cross-entropy loss and accuracy of `net` on `data`."""
    return score(net.fc2, body_features(net, data.images, batch_size, device), data.labels)
