"""FedAvg with a learning-rate schedule, and the only writer of a run's outputs.

After every round it rewrites `results.json`, saves a checkpoint when the central
accuracy reaches a new best, and logs the round to Weights & Biases.
"""

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from pytorch_example.data import save_atomically

# How often the ServerApp asks for replies. Flower's own `send_and_receive` waits 3 s
# between asks in a deployment (100 ms in simulation), which a round pays twice.
REPLY_POLL_INTERVAL_S = 0.05

# results.json names of the metrics -> the names they get in W&B.
WANDB_NAMES = {
    "train_metrics": {"train_loss": "train_loss"},
    "evaluate_metrics_clientapp": {
        "eval_loss": "federated_evaluate_loss",
        "eval_acc": "federated_evaluate_accuracy",
    },
    "evaluate_metrics_serverapp": {
        "loss": "centralized_loss",
        "accuracy": "centralized_accuracy",
    },
}


class CustomFedAvg(FedAvg):
    """FedAvg that decays the learning rate and records every round in `run_dir`.

    Parameters
    ----------
    run_dir : Path
        Folder of this run's outputs; created by the caller.
    run_config : dict
        The run-config the ServerApp received, saved as `config.json`.
    learning_rate_at : Callable[[int], float]
        Learning rate clients use in a given round (sent as `lr`).
    wandb_project : str | None
        W&B project to log to, or None for no W&B.
    **fedavg_kwargs
        Passed to `FedAvg` (fractions, minimum node counts, ...).
    """

    def __init__(
        self,
        run_dir: Path,
        run_config: dict,
        learning_rate_at: Callable[[int], float],
        wandb_project: str | None,
        **fedavg_kwargs,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        self.run_dir = run_dir
        self.run_config = run_config
        self.learning_rate_at = learning_rate_at
        self.wandb_project = wandb_project
        self.best_accuracy = float("-inf")
        self.round_results: list[dict] = []
        self.wandb_run = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send this round's learning rate with the usual FedAvg train messages."""
        lr = self.learning_rate_at(server_round)
        if server_round > 1 and lr != self.learning_rate_at(server_round - 1):
            log(INFO, "Learning rate is now %g", lr)
        config["lr"] = lr
        return super().configure_train(server_round, arrays, config, grid)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run `num_rounds` rounds as `FedAvg.start` does, recording each one.

        Returns the `Result` with the final model and every round's metrics; the final
        model is also saved as `final_model.pt`.
        """
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        self.summary()
        self._write_json("config.json", self.run_config)
        self.wandb_run = self._start_wandb()

        result = Result(arrays=initial_arrays)
        if evaluate_fn and (initial := evaluate_fn(0, initial_arrays)) is not None:
            log(INFO, "Initial central evaluation: %s", initial)
            result.evaluate_metrics_serverapp[0] = initial

        started = time.monotonic()
        try:
            # One background thread: central evaluation overlaps the clients' evaluation.
            with ThreadPoolExecutor(max_workers=1) as background:
                for server_round in range(1, num_rounds + 1):
                    log(INFO, "")
                    log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
                    self._run_round(
                        grid, server_round, result, train_config, evaluate_config, evaluate_fn,
                        timeout, background,
                    )
                    self._record_round(server_round, result)
                    log(INFO, "Round %s done, %.1fs since the first round began",
                        server_round, time.monotonic() - started)
            final_model = self.run_dir / "final_model.pt"
            save_model(final_model, result.arrays)
            log(INFO, "Final model saved to %s", final_model)
        finally:
            if self.wandb_run is not None:
                self.wandb_run.finish()
        return result

    def _run_round(
        self,
        grid: Grid,
        server_round: int,
        result: Result,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
        timeout: float,
        background: ThreadPoolExecutor,
    ) -> None:
        """Train, then evaluate on the clients and centrally; store it all in `result`."""
        train_replies = send_and_receive(
            grid, self.configure_train(server_round, result.arrays, train_config, grid), timeout
        )
        arrays, train_metrics = self.aggregate_train(server_round, train_replies)
        if arrays is not None:
            result.arrays = arrays
        if train_metrics is not None:
            result.train_metrics_clientapp[server_round] = train_metrics

        # The clients' evaluation is mostly waiting on messages, so the ServerApp's
        # cores are free for the central evaluation meanwhile.
        central = background.submit(evaluate_fn, server_round, result.arrays) if evaluate_fn else None
        evaluate_replies = send_and_receive(
            grid, self.configure_evaluate(server_round, result.arrays, evaluate_config, grid), timeout
        )
        if (evaluate_metrics := self.aggregate_evaluate(server_round, evaluate_replies)) is not None:
            result.evaluate_metrics_clientapp[server_round] = evaluate_metrics
        if central is not None and (central_metrics := central.result()) is not None:
            result.evaluate_metrics_serverapp[server_round] = central_metrics

    def _record_round(self, server_round: int, result: Result) -> None:
        """Append the round to results.json, checkpoint a new best model, log to W&B."""
        round_result = {
            "round": server_round,
            "train_metrics": dict(result.train_metrics_clientapp.get(server_round, {})),
            "evaluate_metrics_clientapp": dict(result.evaluate_metrics_clientapp.get(server_round, {})),
            "evaluate_metrics_serverapp": dict(result.evaluate_metrics_serverapp.get(server_round, {})),
        }
        for section in ("train_metrics", "evaluate_metrics_clientapp", "evaluate_metrics_serverapp"):
            log(INFO, "\t%s: %s", section, round_result[section])
        self.round_results.append(round_result)
        self._write_json("results.json", self.round_results)

        accuracy = round_result["evaluate_metrics_serverapp"].get("accuracy")
        if accuracy is not None and accuracy > self.best_accuracy:
            self.best_accuracy = accuracy
            checkpoint = self.run_dir / f"best_model_round_{server_round}_acc_{accuracy:.4f}.pt"
            save_model(checkpoint, result.arrays)
            log(INFO, "New best central accuracy %.4f: saved %s", accuracy, checkpoint.name)

        if self.wandb_run is not None:
            self.wandb_run.log(
                {
                    WANDB_NAMES[section][name]: value
                    for section, names in WANDB_NAMES.items()
                    for name, value in round_result[section].items()
                    if name in names
                },
                step=server_round,
            )

    def _write_json(self, name: str, content) -> None:
        data = json.dumps(content, indent=4).encode()
        save_atomically(self.run_dir / name, lambda f: f.write(data))

    def _start_wandb(self):
        """A W&B run in `run_dir`; offline when no credentials exist, never a prompt."""
        if self.wandb_project is None:
            return None
        import wandb  # noqa: PLC0415 (costs a second; only when W&B is on)

        mode = os.environ.get("WANDB_MODE")
        if mode is None and not wandb.login(prompt=False, verify=False):
            mode = "offline"
            log(
                WARNING,
                "No W&B credentials (`wandb login` or WANDB_API_KEY): logging offline "
                "under %s; upload it later with `wandb sync`",
                self.run_dir / "wandb",
            )
        settings = {
            "project": self.wandb_project,
            "name": f"{self.run_dir.parent.name}/{self.run_dir.name}",
            "dir": self.run_dir,
            "config": self.run_config,
        }
        try:
            return wandb.init(**settings, mode=mode)
        except wandb.Error as err:
            # An unreachable or refusing W&B server must not cost the federated run.
            log(WARNING, "W&B did not start (%s): logging offline under %s", err, self.run_dir / "wandb")
            return wandb.init(**settings, mode="offline")


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """`Grid.send_and_receive`, checking for replies every `REPLY_POLL_INTERVAL_S`."""
    # A message the SuperLink did not accept has no ID and will never get a reply.
    pending = {message_id for message_id in grid.push_messages(messages) if message_id}
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        arrived = list(grid.pull_messages(pending))
        replies.extend(arrived)
        pending -= {reply.metadata.reply_to_message_id for reply in arrived}
        if pending:
            time.sleep(REPLY_POLL_INTERVAL_S)
    return replies


def save_model(path: Path, arrays: ArrayRecord) -> None:
    """Save `arrays` as a PyTorch state_dict, all or nothing."""
    save_atomically(path, lambda f: torch.save(arrays.to_torch_state_dict(), f))
