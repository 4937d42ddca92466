"""Why FedAvg stayed at chance on very unlike data with learning rate 0.1 (the old default).

    python -m benchmarks.skew [--alpha 0.1] [--rounds 6] [--settings "0.1,0.9 0.02,0.9 0.1,0.0"]

Runs the app's FedAvg round in one process (its data path, `task.train` and the default
run-config: 12 of 50 clients a round, one local epoch, the learning-rate schedule;
weights averaged by rows) on the generated data the benchmarks use, for each
`learning-rate,momentum` pair, and prints per round:

- central accuracy of the averaged model (on 2,000 test images);
- the share of those images the averaged model puts in its most predicted class;
- the share the clients' own trained models put in their partition's two commonest
  classes (1.0: each client's model has forgotten every class it does not hold);
- the mean norm of the clients' updates and their mean pairwise cosine.
"""

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import torch

from harness.synthetic_fmnist import write_idx_dataset
from pytorch_example import task
from pytorch_example.client_app import client_generator
from pytorch_example.config import AppConfig, DataSource
from pytorch_example.data import load_partition, load_test_set

CPU = torch.device("cpu")
NUM_PARTITIONS = 50
CLIENTS_PER_ROUND = 12
TEST_IMAGES = 2_000


@torch.inference_mode()
def predictions(net: task.Net, images: torch.Tensor) -> torch.Tensor:
    net.eval()
    return net(task.normalize(images)).argmax(1)


def flat(net: task.Net) -> torch.Tensor:
    return torch.cat([param.detach().flatten() for param in net.parameters()])


def run(source: DataSource, alpha: float, learning_rate: float, momentum: float, rounds: int) -> None:
    """The default run-config but for alpha, learning rate and momentum."""
    config = AppConfig(dirichlet_alpha=alpha, learning_rate=learning_rate, momentum=momentum)
    partitioning = config.partitioning(NUM_PARTITIONS)
    partitions = [load_partition(source, partitioning, index) for index in range(NUM_PARTITIONS)]
    test = load_test_set(source)
    images, labels = test.images[:TEST_IMAGES], test.labels[:TEST_IMAGES]
    torch.manual_seed(config.seed)
    global_net = task.Net()
    rng = np.random.default_rng(config.seed)  # which clients a round samples
    for server_round in range(1, rounds + 1):
        lr = config.learning_rate_at(server_round)
        start = flat(global_net)
        states, weights, updates, own_classes = [], [], [], []
        for client in rng.choice(NUM_PARTITIONS, CLIENTS_PER_ROUND, replace=False):
            rows = partitions[client].train
            net = copy.deepcopy(global_net)
            generator = client_generator(config.seed, server_round, int(client))
            sgd = task.SGD(lr, momentum, config.batch_size, CPU)
            task.train(net, rows, config.local_epochs, sgd, generator)
            commonest = torch.topk(torch.bincount(rows.labels, minlength=10), 2).indices
            own_classes.append(torch.isin(predictions(net, images), commonest).float().mean().item())
            updates.append(flat(net) - start)
            states.append(net.state_dict())
            weights.append(len(rows))
        shares = np.array(weights, dtype=float) / sum(weights)
        averaged = {
            key: sum(share * state[key] for share, state in zip(shares, states, strict=True))
            for key in states[0]
        }
        global_net.load_state_dict(averaged)
        directions = torch.stack([update / update.norm() for update in updates])
        cosines = (directions @ directions.T)[~torch.eye(len(updates), dtype=torch.bool)]
        predicted = predictions(global_net, images)
        print(
            f"| {learning_rate}, {momentum} | {server_round} | {(predicted == labels).float().mean():.3f} | "
            f"{torch.bincount(predicted, minlength=10).max().item() / len(predicted):.2f} | "
            f"{np.mean(own_classes):.2f} | {np.mean([update.norm().item() for update in updates]):.1f} | "
            f"{cosines.mean():.2f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--settings", default="0.1,0.9 0.02,0.9 0.1,0.0", help="learning-rate,momentum pairs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="skew-") as tmp:
        folder = write_idx_dataset(Path(tmp) / "fmnist-idx", 60_000, 10_000, noise=200.0)
        source = DataSource("generated", folder, Path(tmp) / "cache")
        print(
            "| learning rate, momentum | round | central accuracy | most predicted class | "
            "clients' predictions in their 2 commonest classes | update norm | update cosine |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for setting in args.settings.split():
            learning_rate, momentum = (float(value) for value in setting.split(","))
            run(source, args.alpha, learning_rate, momentum, args.rounds)


if __name__ == "__main__":
    main()
