"""A scripted Grid for the round loop's tests: every node answers at once, as told."""

from pathlib import Path

import torch
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict

from harness.local_grid import LocalGrid
from pytorch_example.config import AppConfig
from pytorch_example.gate import ReplyGate
from pytorch_example.outputs import RunOutputs
from pytorch_example.privacy import Clipping, PrivacyLedger
from pytorch_example.rounds import RoundLoop
from pytorch_example.task import Net
from pytorch_example.trust import build_strategy

MAX_TRAIN_ROWS = 1000  # the most train rows a client of these tests holds
MAX_VAL_ROWS = 250


class ScriptedGrid(LocalGrid):
    """Stands in for Flower's Grid: every node answers at once, as `answer` says.

    `answer(server_round, message)` returns a reply's content, or an exception to
    send back as the error a crashed ClientApp would.
    """

    def __init__(self, num_nodes: int, answer) -> None:
        super().__init__(range(1, num_nodes + 1))
        self.answer = answer
        self.sent: list[tuple[str, dict]] = []  # type and config, as pushed

    def push_messages(self, messages):
        messages = list(messages)
        for message in messages:
            self.sent.append((message.metadata.message_type, dict(message.content["config"])))
        return super().push_messages(messages)

    def reply_to(self, message: Message) -> Message:
        server_round = int(message.content["config"]["server-round"])
        answer = self.answer(server_round, message)
        if isinstance(answer, Exception):
            return message.create_error_reply(Error(code=0, reason=f"Traceback...\n{answer!r}"))
        return Message(answer, reply_to=message)


def is_train(message: Message) -> bool:
    return message.metadata.message_type.startswith("train")


def trained(message: Message) -> RecordDict:
    """What this app's ClientApp sends: the model back unchanged with 10 train rows, or
    node n's scores, 0.1 x n with its own head and 0.1 with the global one, on 5 x n rows."""
    if is_train(message):
        return RecordDict(
            {
                "arrays": message.content["arrays"],
                "metrics": MetricRecord({"train_loss": 1.0, "num-examples": 10}),
            }
        )
    node = message.metadata.dst_node_id
    return RecordDict(
        {
            "metrics": MetricRecord(
                {
                    "eval_loss": 1.0,
                    "eval_acc": 0.1 * node,
                    "eval_loss_global": 2.0,
                    "eval_acc_global": 0.1,
                    "num-examples": 5 * node,
                }
            )
        }
    )


def shifted(message: Message, by: float) -> RecordDict:
    """A train reply that moves every weight of the received model by `by`."""
    content = trained(message)
    state = message.content["arrays"].to_torch_state_dict()
    content["arrays"] = ArrayRecord({key: value + by for key, value in state.items()})
    return content


def honest(server_round: int, message: Message) -> RecordDict:
    return trained(message)


def every_node_moves_the_model(by: float):
    """The answer of a federation whose every train reply moves each weight of the model
    it got by `by`; evaluate replies as `trained` says."""

    def answer(server_round: int, message: Message) -> RecordDict:
        return shifted(message, by=by) if is_train(message) else trained(message)

    return answer


def config_for(**overrides) -> AppConfig:
    """Test settings: 3 rounds, the learning rate halved at round 2, a 5 s round timeout."""
    settings = {"num_server_rounds": 3, "round_timeout": 5.0, "lr_decay_rounds": (2,), **overrides}
    return AppConfig(**settings)


def run_rounds(
    run_dir: Path,
    config: AppConfig,
    grid: ScriptedGrid,
    first_round: int = 1,
    privacy_releases: int = 0,
    initial: ArrayRecord | None = None,
    evaluate_fn=None,
    clipping_norm: float | None = None,
):
    """The app's round loop, strategy and gate over `grid`, recording into `run_dir`."""
    num_nodes = len(grid.node_ids)
    start = initial if initial is not None else ArrayRecord(Net().state_dict())
    outputs = RunOutputs(run_dir, {}, wandb_project=None)
    outputs.state.privacy_releases = privacy_releases
    gate = ReplyGate.for_run(config, start)
    # As in a deployment: sampling credited only where dp-population declares the population.
    sample_size = config.train_sample_size(num_nodes)
    privacy = None
    if config.dp_on:
        clipping = Clipping(config, sample_size, clipping_norm)
        population = config.dp_population or None
        privacy = PrivacyLedger(config, population, sample_size, privacy_releases, 0, clipping)
    strategy = build_strategy(config, num_nodes, privacy.clipping if privacy else None)
    rounds = RoundLoop(config, strategy, grid, outputs, gate, privacy)
    return rounds.run(start, first_round=first_round, evaluate_fn=evaluate_fn)


def mean_shift(start: ArrayRecord, end: ArrayRecord) -> float:
    """How far `end` lies from `start`, the mean over every weight."""
    before, after = start.to_torch_state_dict(), end.to_torch_state_dict()
    return float(torch.cat([(after[key] - before[key]).flatten() for key in before]).mean())
