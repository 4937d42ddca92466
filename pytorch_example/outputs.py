"""The run folder and all a run leaves in it: config.json, results.json, resume.pt,
best checkpoints, the final model, figures, and its Weights & Biases run. A run opens
its folder here (new, or resumed), the strategy hands over each finished round, and
only this module writes into the folder.
"""

import json
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from logging import DEBUG, INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import Result

from pytorch_example import plots
from pytorch_example.config import LEGACY_SETTINGS, AppConfig
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
        "eval_gain_share": "federated_evaluate_gain_share",
        "eval_gain_points_mean": "federated_evaluate_gain_points_mean",
        "eval_gain_points_min": "federated_evaluate_gain_points_min",
        "eval_gain_points_max": "federated_evaluate_gain_points_max",
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
    num_supernodes: int | None = None  # when the run started
    privacy_releases: int = 0  # DP rounds released, the round in progress included


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
    saved_settings = {**LEGACY_SETTINGS, **state.settings}
    changed = [
        f"{key} was {saved_settings.get(key)!r}"
        for key in settings
        if saved_settings.get(key) != settings[key]
    ]
    if changed:
        raise ResumeError(
            f"was made with other data, personalisation or privacy settings ({', '.join(changed)}): "
            "run with those"
        )
    return state


class RunOutputs:
    """The files and the W&B run of one run, in `run_dir`.

    `RunOutputs.open` makes a new run folder or continues the one `resume-from` names.
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
        num_supernodes: int | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.run_config = run_config
        self.wandb_project = wandb_project
        # A new run starts from nothing; a resumed one from where its folder stood.
        self.state = resumed or ResumeState(
            round=0,
            arrays=ArrayRecord(),
            lineage=uuid.uuid4().hex,
            settings=resume_settings or {},
            num_supernodes=num_supernodes,
        )
        self.wandb_run = None

    @classmethod
    def open(
        cls, config: AppConfig, run_config: dict, num_supernodes: int, initial_arrays: ArrayRecord
    ) -> "RunOutputs":
        """This run's folder: a new `<output-dir>/<date>/<time>`, or with `resume-from`
        that folder, continued after its last completed round. A folder this run cannot
        continue raises `ConfigError`, in one line."""
        wandb_project = config.wandb_project if config.use_wandb else None
        if config.resume_from is None:
            run_dir = create_run_dir(config.output_dir)
            log(INFO, "Outputs of this run go to %s", run_dir)
            outputs = cls(
                run_dir, run_config, wandb_project, config.resume_settings(), num_supernodes=num_supernodes
            )
            outputs.state.arrays = initial_arrays
            return outputs
        model_shapes = {key: tuple(array.shape) for key, array in initial_arrays.items()}
        try:
            resumed = load_resume_state(config.resume_from, config.resume_settings(), model_shapes)
        except ResumeError as err:
            raise config.resume_error(err) from None
        if resumed.round >= config.num_server_rounds:
            raise config.resume_error(
                f"already finished round {resumed.round}: raise num-server-rounds above it to go on"
            )
        log(
            INFO,
            "Resuming %s after round %d of %d",
            config.resume_from,
            resumed.round,
            config.num_server_rounds,
        )
        if resumed.num_supernodes not in (None, num_supernodes):
            # Clients key their heads by partition id and count, so none loads another's.
            log(
                WARNING,
                "This run started with %d SuperNodes and goes on with %d: the clients hold other rows "
                "than before, so each starts with a new head",
                resumed.num_supernodes,
                num_supernodes,
            )
        return cls(config.resume_from, run_config, wandb_project, resumed=resumed)

    @property
    def lineage(self) -> str:
        return self.state.lineage

    @property
    def arrays(self) -> ArrayRecord:
        """The model the next round starts from."""
        return self.state.arrays

    @property
    def next_round(self) -> int:
        return self.state.round + 1

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

    @property
    def privacy_releases(self) -> int:
        """How many DP rounds this run has released so far (a resumed run's epsilon goes on from them)."""
        return self.state.privacy_releases

    def save_privacy_releases(self, releases: int) -> None:
        """Note a DP round's release as soon as it happens, before the round is recorded."""
        self.state.privacy_releases = releases
        self._save_resume_state()

    def record_round(
        self,
        server_round: int,
        result: Result,
        learning_rate: float,
        replies: dict | None = None,
        privacy: dict | None = None,
    ) -> dict:
        """Append the round to results.json, checkpoint a new best model, log to W&B.

        `replies` counts, per phase, the messages sent and the replies received, failed
        and left out; `privacy` (with DP on) is epsilon so far, its delta, and the private
        rounds it counts. Returns the round's results.json entry.
        """
        round_result = {"round": server_round, "learning_rate": learning_rate, "replies": replies or {}}
        if privacy is not None:
            round_result["privacy"] = privacy
        for section, result_field in RESULT_SECTIONS.items():
            round_result[section] = dict(getattr(result, result_field).get(server_round, {}))
            log(DEBUG, "\t%s: %s", section, round_result[section])
        state = self.state
        state.round, state.arrays = server_round, result.arrays
        if privacy is not None:
            state.privacy_releases = privacy["releases"]
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
        self._save_resume_state()
        save_json_atomically(self.run_dir / "results.json", state.round_results)

        if self.wandb_run is not None:
            series = {
                WANDB_NAMES[section][name]: value
                for section, names in WANDB_NAMES.items()
                for name, value in round_result[section].items()
                if name in names
            }
            if privacy is not None:
                series["privacy_epsilon"] = privacy["epsilon"]
            self.wandb_run.log({**series, "learning_rate": learning_rate}, step=server_round)
        return round_result

    def _save_resume_state(self) -> None:
        resume = {**vars(self.state), "arrays": self.state.arrays.to_torch_state_dict()}
        save_atomically(self.run_dir / RESUME_FILE, lambda f: torch.save(resume, f))

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


def continued_run_config(run_config: dict, config: AppConfig) -> dict:
    """The run-config a resumed run goes on with: that of the run it continues (its
    folder's config.json), but for the keys this command sets to other than their
    defaults. So `resume-from` alone continues a run as it was started."""
    saved_path = config.resume_from / "config.json"
    try:
        saved = {**LEGACY_SETTINGS, **json.loads(saved_path.read_text())}
    except (OSError, ValueError):
        return run_config  # not a run folder: RunOutputs.open says so in one line
    defaults = AppConfig()
    taken = {
        key: value
        for key, value in saved.items()
        if key in run_config
        and key != "resume-from"
        and value != run_config[key]
        and config.run_config_value(key) == defaults.run_config_value(key)
    }
    if taken:
        settings = " ".join(f"{key}={value!r}" for key, value in taken.items())
        log(INFO, "Resuming with the settings in %s: %s (--run-config overrides them)", saved_path, settings)
    return {**run_config, **taken}


def create_run_dir(output_dir: Path) -> Path:
    """A new `<output-dir>/<date>/<time>` folder; a suffix keeps same-second runs apart."""
    stamp = datetime.now()
    base = output_dir / stamp.strftime("%Y-%m-%d") / stamp.strftime("%H-%M-%S")
    for attempt in range(100):
        run_dir = base if attempt == 0 else base.with_name(f"{base.name}-{attempt}")
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a fresh run folder under {base.parent}")


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
