"""What a run leaves behind: config.json, results.json, best checkpoints, the final
model, figures, and its Weights & Biases run. The strategy hands over each finished
round; only this module writes into the run folder.
"""

import os
import uuid
from dataclasses import dataclass, field
from logging import DEBUG, INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import Result

from pytorch_example import plots
from pytorch_example.files import save_atomically, save_json_atomically

# What a restart needs, rewritten after every round before results.json says it is done.
RESUME_FILE = "resume.pt"

# results.json sections, each from one of the `Result` fields Flower's strategies fill.
RESULT_SECTIONS = {
    "train_metrics": "train_metrics_clientapp",
    "evaluate_metrics_clientapp": "evaluate_metrics_clientapp",
    "evaluate_metrics_serverapp": "evaluate_metrics_serverapp",
}

# results.json names of the metrics -> the names they get in W&B.
WANDB_NAMES = {
    "train_metrics": {"train_loss": "train_loss"},
    "evaluate_metrics_clientapp": {
        "eval_loss": "federated_evaluate_loss",
        "eval_acc": "federated_evaluate_accuracy",
        "eval_loss_global": "federated_evaluate_loss_global_head",
        "eval_acc_global": "federated_evaluate_accuracy_global_head",
        "eval_acc_min": "federated_evaluate_accuracy_min",
        "eval_acc_median": "federated_evaluate_accuracy_median",
        "eval_acc_max": "federated_evaluate_accuracy_max",
        "eval_acc_std": "federated_evaluate_accuracy_std",
    },
    "evaluate_metrics_serverapp": {
        "loss": "centralized_loss",
        "accuracy": "centralized_accuracy",
    },
}


class ResumeError(ValueError):
    """A folder this run cannot continue; the message is one line for the user."""


@dataclass
class ResumeState:
    """Where a run stood after its last completed round."""

    round: int
    arrays: ArrayRecord
    lineage: str  # the same across a run and its resumptions: clients key their heads by it
    settings: dict  # the run-config values a continuation must share
    round_results: list[dict] = field(default_factory=list)
    best_accuracy: float = float("-inf")
    best_round: int | None = None
    best_checkpoint: str | None = None
    wandb_run_id: str | None = None


def load_resume_state(run_dir: Path, settings: dict, model_shapes: dict[str, tuple]) -> ResumeState:
    """The state `run_dir` was left in, if this run can continue it; else `ResumeError`."""
    path = run_dir / RESUME_FILE
    if not path.is_file():
        raise ResumeError(
            f"holds no {RESUME_FILE}: not a run folder of this app, or one that finished no round"
        )
    try:
        saved = torch.load(path, weights_only=True)
        state = ResumeState(**{**saved, "arrays": ArrayRecord(saved["arrays"])})
    except Exception as err:  # noqa: BLE001 (any unreadable file is the same to the user)
        raise ResumeError(f"its {RESUME_FILE} cannot be read ({type(err).__name__}: {err})") from None
    shapes = {key: tuple(array.shape) for key, array in state.arrays.items()}
    if shapes != model_shapes:
        raise ResumeError("its model is not this app's model (different layers or shapes)")
    changed = [
        f"{key} was {state.settings.get(key)!r}"
        for key in settings
        if state.settings.get(key) != settings[key]
    ]
    if changed:
        raise ResumeError(f"was made with other data settings ({', '.join(changed)}): run with those")
    return state


class RunOutputs:
    """The files and the W&B run of one run, in `run_dir`.

    Use it as a context manager around the whole run: entering writes `config.json`
    and starts W&B; leaving draws the figures, gives W&B the best checkpoint and
    finishes W&B with the run's outcome (exit code 1 when an exception, a Ctrl-C
    included, ended the run).
    """

    def __init__(
        self,
        run_dir: Path,
        run_config: dict,
        wandb_project: str | None,
        resume_settings: dict | None = None,
        resumed: ResumeState | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.run_config = run_config
        self.wandb_project = wandb_project
        # A new run starts from nothing; a resumed one from where its folder stood.
        self.state = resumed or ResumeState(
            round=0, arrays=ArrayRecord(), lineage=uuid.uuid4().hex, settings=resume_settings or {}
        )
        self.wandb_run = None

    @property
    def lineage(self) -> str:
        return self.state.lineage

    def __enter__(self) -> "RunOutputs":
        save_json_atomically(self.run_dir / "config.json", self.run_config)
        self.wandb_run = start_wandb(
            self.wandb_project, self.run_dir, self.run_config, self.state.wandb_run_id
        )
        if self.wandb_run is not None:
            self.state.wandb_run_id = self.wandb_run.id
        if self.state.round_results:
            # What the folder said when it was left, whatever happened after resume.pt.
            save_json_atomically(self.run_dir / "results.json", self.state.round_results)
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        # Nothing here may hide the run's own outcome: each step only warns.
        try:
            plots.plot_run(self.run_dir)
        except Exception as plot_error:  # noqa: BLE001
            log(WARNING, "Could not draw the figures of %s (%s)", self.run_dir, plot_error)
        if self.wandb_run is None:
            return
        try:
            if self.state.best_checkpoint is not None:
                self._log_best_checkpoint()
        except Exception as artifact_error:  # noqa: BLE001
            log(WARNING, "W&B did not take the best checkpoint (%s)", artifact_error)
        try:
            self.wandb_run.finish(exit_code=0 if error_type is None else 1)
        except Exception as finish_error:  # noqa: BLE001
            log(WARNING, "W&B could not finish its run cleanly (%s)", finish_error)

    def record_round(
        self, server_round: int, result: Result, learning_rate: float, replies: dict | None = None
    ) -> dict:
        """Append the round to results.json, checkpoint a new best model, log to W&B.

        `replies` counts, per phase, the messages sent and the replies received, failed
        and left out. Returns the round's results.json entry.
        """
        round_result = {"round": server_round, "learning_rate": learning_rate, "replies": replies or {}}
        for section, result_field in RESULT_SECTIONS.items():
            round_result[section] = dict(getattr(result, result_field).get(server_round, {}))
            log(DEBUG, "\t%s: %s", section, round_result[section])
        state = self.state
        state.round, state.arrays = server_round, result.arrays
        state.round_results = [*state.round_results, round_result]

        accuracy = round_result["evaluate_metrics_serverapp"].get("accuracy")
        if accuracy is not None and accuracy > state.best_accuracy:
            checkpoint = self.run_dir / f"best_model_round_{server_round}_acc_{accuracy:.4f}.pt"
            save_model(checkpoint, result.arrays)
            state.best_accuracy, state.best_round, state.best_checkpoint = (
                accuracy,
                server_round,
                checkpoint.name,
            )
            log(DEBUG, "New best central accuracy %.4f: saved %s", accuracy, checkpoint.name)
            if self.wandb_run is not None:
                self.wandb_run.summary["best_centralized_accuracy"] = accuracy
                self.wandb_run.summary["best_centralized_accuracy_round"] = server_round

        # The restart state first: a crash between the two writes loses nothing, since a
        # resumed run rewrites results.json from it.
        resume = {**vars(state), "arrays": result.arrays.to_torch_state_dict()}
        save_atomically(self.run_dir / RESUME_FILE, lambda f: torch.save(resume, f))
        save_json_atomically(self.run_dir / "results.json", state.round_results)

        if self.wandb_run is not None:
            series = {
                WANDB_NAMES[section][name]: value
                for section, names in WANDB_NAMES.items()
                for name, value in round_result[section].items()
                if name in names
            }
            self.wandb_run.log({**series, "learning_rate": learning_rate}, step=server_round)
        return round_result

    def _log_best_checkpoint(self) -> None:
        """The best checkpoint as a W&B model artifact, with its round and accuracy."""
        import wandb  # noqa: PLC0415 (only when W&B is on)

        artifact = wandb.Artifact(
            f"best-model-{self.wandb_run.id}",
            type="model",
            metadata={"accuracy": self.state.best_accuracy, "round": self.state.best_round},
        )
        artifact.add_file(str(self.run_dir / self.state.best_checkpoint))
        self.wandb_run.log_artifact(artifact, aliases=["best"])

    def save_final_model(self, arrays: ArrayRecord) -> None:
        final_model = self.run_dir / "final_model.pt"
        save_model(final_model, arrays)
        log(INFO, "Final model saved to %s", final_model)


def save_model(path: Path, arrays: ArrayRecord) -> None:
    """Save `arrays` as a PyTorch state_dict, all or nothing."""
    save_atomically(path, lambda f: torch.save(arrays.to_torch_state_dict(), f))


def start_wandb(project: str | None, run_dir: Path, run_config: dict, run_id: str | None = None):
    """A W&B run in `run_dir`, or the run `run_id` continued; offline when no
    credentials exist, never a prompt."""
    if project is None:
        return None
    import wandb  # noqa: PLC0415 (costs a second; only when W&B is on)

    mode = os.environ.get("WANDB_MODE")
    if mode is None and not wandb.login(prompt=False, verify=False):
        mode = "offline"
        log(
            WARNING,
            "No W&B credentials (`wandb login` or WANDB_API_KEY): logging offline "
            "under %s; upload it later with `wandb sync`",
            run_dir / "wandb",
        )
    settings = {
        "project": project,
        "name": f"{run_dir.parent.name}/{run_dir.name}",
        "dir": run_dir,
        "config": run_config,
        "id": run_id,
        "resume": "allow" if run_id else None,
    }
    try:
        return wandb.init(**settings, mode=mode)
    except wandb.Error as err:
        # An unreachable or refusing W&B server must not cost the federated run.
        log(WARNING, "W&B did not start (%s): logging offline under %s", err, run_dir / "wandb")
        return wandb.init(**settings, mode="offline")
