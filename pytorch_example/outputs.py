"""All a run leaves in its folder: config.json, results.json, resume.pt, best
checkpoints, the final model, figures, and its Weights & Biases run. The folder comes
from run_folder.py (new, or resumed and checked); the round loop hands over each
finished round, and only this module writes into the folder.
"""

import os
import uuid
from logging import DEBUG, INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import Result
from flwr.supercore.exit import add_exit_handler

from pytorch_example import plots
from pytorch_example.config import AppConfig
from pytorch_example.files import save_atomically, save_json_atomically
from pytorch_example.names import CENTRAL_SECTION, RESULT_SECTIONS, wandb_series
from pytorch_example.run_files import (
    CONFIG_FILE,
    RESULTS_FILE,
    RESUME_FILE,
    ResumeState,
    checkpoint_name,
    selection_accuracy,
)
from pytorch_example.run_folder import Resumed, create_run_dir, lock_run_folder, resume_settings


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
        settings: dict | None = None,
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
            settings=settings or {},
            num_supernodes=num_supernodes,
        )
        self.wandb_run = None
        self.run_lock: int | None = None  # see `lock_run_folder`
        self.finished = False  # left the `with` block: figures drawn, W&B finished

    @classmethod
    def open(
        cls,
        config: AppConfig,
        run_config: dict,
        num_supernodes: int,
        initial_arrays: ArrayRecord,
        resumed: Resumed | None = None,
    ) -> "RunOutputs":
        """This run's outputs: in a new `<output-dir>/<date>/<time>` folder, or `resumed`'s
        (run_folder.py's `resume_run`), after its last completed round."""
        wandb_project = config.wandb_project if config.use_wandb else None
        if resumed is not None:
            outputs = cls(config.resume_from, run_config, wandb_project, resumed=resumed.state)
            outputs.run_lock = resumed.take_lock()
            return outputs
        run_dir = create_run_dir(config.output_dir)
        log(INFO, "Outputs of this run go to %s", run_dir)
        settings = resume_settings(config)
        outputs = cls(run_dir, run_config, wandb_project, settings, num_supernodes=num_supernodes)
        outputs.state.arrays = initial_arrays
        outputs.run_lock = lock_run_folder(run_dir, create=True)
        return outputs

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

    @property
    def clipping_norm(self) -> float | None:
        """The norm DP's next round clips at, if a round released so far (adaptive
        clipping moves it; a resumed run goes on from it)."""
        return self.state.dp_clipping_norm

    @property
    def server_velocity(self) -> dict | None:
        """server-momentum's buffer after the last completed round (a resumed run goes on from it)."""
        return self.state.server_velocity

    def save_privacy_releases(self, releases: int, credited: int, clipping_norm: float) -> None:
        """Note a DP round's release as soon as it happens, before the round is recorded,
        and the norm the next round clips at."""
        self.state.privacy_releases, self.state.privacy_credited = releases, credited
        self.state.dp_clipping_norm = clipping_norm
        self._save_resume_state()

    def record_initial_evaluation(self, metrics: dict) -> None:
        """The model's central scores before round 1: results.json's round 0, W&B's step 0."""
        self.state.initial_evaluation = {name: without_float_noise(value) for name, value in metrics.items()}
        save_json_atomically(self.run_dir / RESULTS_FILE, self.state.results())
        if self.wandb_run is not None:
            self.wandb_run.log(wandb_series({"round": 0, CENTRAL_SECTION: metrics}), step=0)

    def record_round(
        self,
        server_round: int,
        result: Result,
        learning_rate: float,
        replies: dict | None = None,
        privacy: dict | None = None,
        server_velocity: dict | None = None,
    ) -> dict:
        """Append the round to results.json, checkpoint a new best model, log to W&B.

        `replies` counts, per phase, the messages sent and the replies received, failed
        and left out (and for train, those the gate's bound cut); `privacy` (with DP on)
        is epsilon so far, its delta, and the private rounds it counts;
        `server_velocity`, server-momentum's buffer that goes with the round's model.
        Returns the round's results.json entry.
        """
        round_result = {"round": server_round, "learning_rate": learning_rate, "replies": replies or {}}
        if privacy is not None:
            round_result["privacy"] = privacy
        for section in RESULT_SECTIONS:
            metrics = getattr(result, section).get(server_round, {})
            round_result[section] = {name: without_float_noise(value) for name, value in metrics.items()}
            log(DEBUG, "\t%s: %s", section, round_result[section])
        state = self.state
        state.round, state.arrays = server_round, result.arrays
        state.server_velocity = server_velocity or None
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
            log(DEBUG, "New best %s %.4f: saved %s", measure.words, accuracy, checkpoint.name)
            if self.wandb_run is not None:
                name = f"best_{measure.wandb}"
                self.wandb_run.summary[name] = accuracy
                self.wandb_run.summary[f"{name}_round"] = server_round

        # The restart state first: a crash between the two writes loses nothing, since a
        # resumed run rewrites results.json from it.
        self._save_resume_state()
        save_json_atomically(self.run_dir / RESULTS_FILE, state.results())

        if self.wandb_run is not None:
            self.wandb_run.log(wandb_series(round_result), step=server_round)
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
