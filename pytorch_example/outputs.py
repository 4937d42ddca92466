"""The run folder and all a run leaves in it: config.json, results.json, resume.pt,
best checkpoints, the final model, figures, and its Weights & Biases run. A run opens
its folder here (new, or resumed), the strategy hands over each finished round, and
only this module writes into the folder. A folder read back to resume passes one
loader, run_folder.py's `read_run_folder`, which checks all it reads before anything
is written.
"""

import fcntl
import os
import uuid
from datetime import datetime
from logging import DEBUG, INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import Result
from flwr.supercore.exit import add_exit_handler

from pytorch_example import plots
from pytorch_example.config import PARTITION_PATH_KEYS, AppConfig, ConfigError
from pytorch_example.files import save_atomically, save_json_atomically
from pytorch_example.run_folder import (
    CENTRAL_SECTION,
    CONFIG_FILE,
    RESULT_SECTIONS,
    RESULTS_FILE,
    RESUME_FILE,
    ResumeError,
    ResumeState,
    checkpoint_name,
    read_run_folder,
    selection_accuracy,
)
from pytorch_example.task import Net

# Held by the process of the run writing into the folder (see `lock_run_folder`).
RUN_LOCK_FILE = ".run.lock"
# results.json names of the metrics -> the names they get in W&B.
WANDB_NAMES = {
    "train_metrics": {"train_loss": "train_loss"},
    "evaluate_metrics_clientapp": {
        "eval_loss": "federated_evaluate_loss",
        "eval_acc": "federated_evaluate_accuracy",
        "eval_loss_global": "federated_evaluate_loss_global_model",
        "eval_acc_global": "federated_evaluate_accuracy_global_model",
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


# The W&B summary of the best model, by what picked it.
BEST_WANDB_NAMES = {
    "central accuracy": "best_centralized_accuracy",
    "federated accuracy": "best_federated_evaluate_accuracy_global_model",
}


def without_float_noise(value):
    """A mean's last bits (0.9999999999999999 for 1.0) cut: 12 decimals keep every digit a
    score or loss means."""
    return round(value, 12) if isinstance(value, float) else value


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
        self.run_lock: int | None = None  # see `lock_run_folder`
        self.finished = False  # left the `with` block: figures drawn, W&B finished

    @classmethod
    def open(
        cls, config: AppConfig, run_config: dict, num_supernodes: int, initial_arrays: ArrayRecord
    ) -> "RunOutputs":
        """This run's folder: a new `<output-dir>/<date>/<time>`, or with `resume-from`
        that folder, continued after its last completed round. A folder this run cannot
        continue (damaged, altered, or made with other settings) raises `ConfigError`,
        in one line, and is left as it was."""
        wandb_project = config.wandb_project if config.use_wandb else None
        if config.resume_from is None:
            run_dir = create_run_dir(config.output_dir)
            log(INFO, "Outputs of this run go to %s", run_dir)
            outputs = cls(
                run_dir, run_config, wandb_project, config.resume_settings(), num_supernodes=num_supernodes
            )
            outputs.state.arrays = initial_arrays
            outputs.run_lock = lock_run_folder(run_dir, create=True)
            return outputs
        run_lock = None
        try:
            # Locked before it is read: a run still going could write between the two.
            run_lock = lock_run_folder(config.resume_from, create=False)
            outputs = cls._continued(config, run_config, num_supernodes, initial_arrays, wandb_project)
            # A folder of a version without the lock file gets one now.
            outputs.run_lock = run_lock or lock_run_folder(config.resume_from, create=True)
            return outputs
        except BaseException as err:
            if run_lock is not None:
                os.close(run_lock)  # refused, or failed: the folder stays free
            if isinstance(err, ResumeError):
                raise config.resume_error(err) from None
            raise

    @classmethod
    def _continued(
        cls,
        config: AppConfig,
        run_config: dict,
        num_supernodes: int,
        initial_arrays: ArrayRecord,
        wandb_project: str | None,
    ) -> "RunOutputs":
        """The outputs of the run `resume-from` names, checked; else `ResumeError` or `ConfigError`."""
        model_shapes = {key: tuple(array.shape) for key, array in initial_arrays.items()}
        folder = read_run_folder(config.resume_from, model_shapes)
        settings = config.resume_settings()
        if changed := [
            f"{key} was {folder.config.run_config_value(key)!r}"
            for key, value in settings.items()
            if folder.config.run_config_value(key) != value
        ]:
            raise config.resume_error(
                f"was made with other data, personalisation or privacy settings ({', '.join(changed)}): "
                "run with those"
            )
        resumed = folder.state
        resumed.settings = settings  # an older folder's state lacks the keys added since
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
        # Where simulated clients keep their heads (heads.py), on this machine.
        heads = config.data_cache_dir / "heads" / resumed.lineage
        kept = len(list(heads.glob(f"*-of-{num_supernodes}.pt")))
        log(INFO, "Each client restores its own head as it is first sampled: %d of %d kept for this run "
            "in %s (SuperNodes with their own data keep theirs on their own disks)",
            kept, num_supernodes, heads)  # fmt: skip
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
        save_json_atomically(self.run_dir / CONFIG_FILE, self.run_config)
        self.wandb_run = start_wandb(
            self.wandb_project, self.run_dir, self.run_config, self.state.wandb_run_id
        )
        if self.wandb_run is not None:
            self.state.wandb_run_id = self.wandb_run.id
        if self.state.round_results:
            # What the folder said when it was left, whatever happened after resume.pt.
            save_json_atomically(self.run_dir / RESULTS_FILE, self.state.results())
        # `flwr stop` ends this process from its signal handler, which never leaves the
        # `with` block: Flower runs its exit handlers first, so the figures are drawn then.
        add_exit_handler(self._draw_figures_unless_finished, run_before_force_exit=True)
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        try:
            self._finish(error_type)
        finally:
            if self.run_lock is not None:
                os.close(self.run_lock)  # the folder is free for a resume
                self.run_lock = None

    def _finish(self, error_type) -> None:
        # Nothing here may hide the run's own outcome: each step only warns.
        self._draw_figures()
        self.finished = True
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

    def _draw_figures(self) -> None:
        try:
            plots.plot_run(self.run_dir)
        except Exception as plot_error:  # noqa: BLE001
            log(WARNING, "Could not draw the figures of %s (%s)", self.run_dir, plot_error)

    def _draw_figures_unless_finished(self) -> None:
        if not self.finished:
            log(INFO, "The run was stopped: drawing the figures of its rounds so far in %s", self.run_dir)
            self._draw_figures()

    @property
    def privacy_releases(self) -> tuple[int, int]:
        """The DP rounds this run has released so far, and how many of them had their
        sampling credited (a resumed run's epsilon goes on from them)."""
        return self.state.privacy_releases, self.state.privacy_credited

    @property
    def started_with(self) -> int | None:
        """The SuperNodes connected when the run started (None in a folder from before that was kept)."""
        return self.state.num_supernodes

    def save_privacy_releases(self, releases: int, credited: int) -> None:
        """Note a DP round's release as soon as it happens, before the round is recorded."""
        self.state.privacy_releases, self.state.privacy_credited = releases, credited
        self._save_resume_state()

    def record_initial_evaluation(self, metrics: dict) -> None:
        """The model's central scores before round 1: results.json's round 0, W&B's step 0."""
        self.state.initial_evaluation = {name: without_float_noise(value) for name, value in metrics.items()}
        save_json_atomically(self.run_dir / RESULTS_FILE, self.state.results())
        if self.wandb_run is not None:
            names = WANDB_NAMES[CENTRAL_SECTION]
            self.wandb_run.log(
                {names[name]: value for name, value in metrics.items() if name in names}, step=0
            )

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
        and left out (and for train, those the gate's bound cut); `privacy` (with DP on)
        is epsilon so far, its delta, and the private rounds it counts. Returns the
        round's results.json entry.
        """
        round_result = {"round": server_round, "learning_rate": learning_rate, "replies": replies or {}}
        if privacy is not None:
            round_result["privacy"] = privacy
        for section, result_field in RESULT_SECTIONS.items():
            metrics = getattr(result, result_field).get(server_round, {})
            round_result[section] = {name: without_float_noise(value) for name, value in metrics.items()}
            log(DEBUG, "\t%s: %s", section, round_result[section])
        state = self.state
        state.round, state.arrays = server_round, result.arrays
        if privacy is not None:
            state.privacy_releases, state.privacy_credited = privacy["releases"], privacy["credited"]
        state.round_results = [*state.round_results, round_result]

        accuracy, measure = selection_accuracy(round_result)
        if accuracy is not None and accuracy > state.best_accuracy:
            checkpoint = self.run_dir / checkpoint_name(server_round, accuracy)
            save_model(checkpoint, result.arrays)
            state.best_accuracy, state.best_round, state.best_checkpoint = (
                accuracy,
                server_round,
                checkpoint.name,
            )
            log(DEBUG, "New best %s %.4f: saved %s", measure, accuracy, checkpoint.name)
            if self.wandb_run is not None:
                name = BEST_WANDB_NAMES[measure]
                self.wandb_run.summary[name] = accuracy
                self.wandb_run.summary[f"{name}_round"] = server_round

        # The restart state first: a crash between the two writes loses nothing, since a
        # resumed run rewrites results.json from it.
        self._save_resume_state()
        save_json_atomically(self.run_dir / RESULTS_FILE, state.results())

        if self.wandb_run is not None:
            series = {
                WANDB_NAMES[section][name]: value
                for section, names in WANDB_NAMES.items()
                for name, value in round_result[section].items()
                if name in names
            }
            if privacy is not None:
                series["privacy_epsilon"] = privacy["epsilon"]
                series["privacy_credited_rounds"] = privacy["credited"]
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
    defaults. So `resume-from` alone continues a run as it was started. A folder this
    run cannot continue raises `ConfigError`, in one line, before anything is written."""
    model_shapes = {key: tuple(array.shape) for key, array in Net().state_dict().items()}
    try:
        saved = read_run_folder(config.resume_from, model_shapes).run_config
    except ResumeError as err:
        raise config.resume_error(err) from None
    defaults = AppConfig()
    taken = {
        key: value
        for key, value in saved.items()
        if key in run_config
        and key != "resume-from"
        and value != run_config[key]
        and config.run_config_value(key) == defaults.run_config_value(key)
    }
    saved_paths = {key: taken[key] for key in PARTITION_PATH_KEYS if key in taken}
    if missing := {key: value for key, value in saved_paths.items() if not same_path(key, value, config)}:
        # A simulation's ClientApps read where the images (and their heads) lie from their
        # own run-config, this command's: they would cut other partitions, or lose their heads.
        named = " ".join(f"{key}='{value}'" for key, value in missing.items())
        raise ConfigError(
            f"run-config key '{next(iter(missing))}': the run in {config.resume_from} ran with {named}, "
            f"which a simulation's ClientApps read from this command's run-config: add {named} to "
            "--run-config"
        )
    if taken:
        settings = " ".join(f"{key}={value!r}" for key, value in taken.items())
        log(
            INFO,
            "Resuming with the settings in %s: %s (--run-config overrides them)",
            config.resume_from / CONFIG_FILE,
            settings,
        )
    return {**run_config, **taken}


def same_path(key: str, saved: str, config: AppConfig) -> bool:
    """Whether a path key's saved value reads as the same folder as `config`'s (a saved
    '~/.cache/pytorch-example' and a default "" do)."""
    saved_config = AppConfig.from_run_config({**config.as_run_config(), key: saved})
    return saved_config.run_config_value(key) == config.run_config_value(key)


def lock_run_folder(run_dir: Path, create: bool) -> int | None:
    """Lock `run_dir` for this process, for as long as it lives (the lock goes with it,
    however it ends). None when the folder has no lock file and `create` is False (no run
    of this version wrote it). `ResumeError` when another process holds the lock (a run
    still going there) or the lock file cannot be opened."""
    try:
        # Never through a link: a dangling one would have the lock create its target.
        flags = os.O_RDONLY | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
        descriptor = os.open(run_dir / RUN_LOCK_FILE, flags, 0o600)
    except FileNotFoundError:
        if create:
            raise
        return None
    except OSError as err:
        raise ResumeError(f"cannot be locked for this run ({RUN_LOCK_FILE}: {err.strerror})") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise ResumeError(
            "is the folder of a run that is still going: two runs would write over each other "
            "(`flwr stop <run-id>` ends it; `flwr ls` lists the runs)"
        ) from None
    return descriptor


def create_run_dir(output_dir: Path) -> Path:
    """A new `<output-dir>/<date>/<time>` folder; a suffix keeps same-second runs apart."""
    stamp = datetime.now()
    base = output_dir / stamp.strftime("%Y-%m-%d") / stamp.strftime("%H-%M-%S")
    for attempt in range(100):
        run_dir = base if attempt == 0 else base.with_name(f"{base.name}-{attempt}")
        try:
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            run_dir.mkdir(mode=0o700)  # its user's only, as every file in it
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
        log(  # what use-wandb=true is documented to do without credentials: no warning
            INFO,
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
