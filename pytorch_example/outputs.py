"""The run folder and all a run leaves in it: config.json, results.json, resume.pt,
best checkpoints, the final model, figures, and its Weights & Biases run. A run opens
its folder here (new, or resumed), the strategy hands over each finished round, and
only this module writes into the folder. A folder read back to resume passes one
loader, `read_run_folder`, which checks all it reads before anything is written.
"""

import fcntl
import json
import math
import os
import re
import reprlib
import stat
import uuid
from dataclasses import dataclass, field, fields
from datetime import datetime
from logging import DEBUG, INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import Result
from flwr.supercore.exit import add_exit_handler

from pytorch_example import plots
from pytorch_example.config import LEGACY_SETTINGS, PARTITION_PATH_KEYS, AppConfig, ConfigError
from pytorch_example.files import save_atomically, save_json_atomically
from pytorch_example.heads import LINEAGE_PATTERN
from pytorch_example.task import Net

# Held by the process of the run writing into the folder (see `lock_run_folder`).
RUN_LOCK_FILE = ".run.lock"
# What a restart needs, rewritten after every round before results.json says it is done.
RESUME_FILE = "resume.pt"
CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
WANDB_ID_PATTERN = re.compile(r"[a-z0-9]{1,64}")
# The fix for a folder whose files are damaged, or disagree with each other.
DAMAGED = ": restore the folder, or start a new run"
# A value read from a damaged file, shown in an error: long enough for a file name.
SHOWN = reprlib.Repr()
SHOWN.maxstring = SHOWN.maxother = 80

# results.json sections, each from one of the `Result` fields Flower's strategies fill.
RESULT_SECTIONS = {
    "train_metrics": "train_metrics_clientapp",
    "evaluate_metrics_clientapp": "evaluate_metrics_clientapp",
    "evaluate_metrics_serverapp": "evaluate_metrics_serverapp",
}

CENTRAL_SECTION = "evaluate_metrics_serverapp"  # the test set's scores, round 0's too

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
    privacy_credited: int = 0  # of those, the rounds whose sampling epsilon credits (privacy.py)
    initial_evaluation: dict | None = None  # the model's central scores before round 1

    def results(self) -> list[dict]:
        """What results.json holds: round 0 (the initial central evaluation), if the run
        had one, then each completed round."""
        if self.initial_evaluation is None:
            return self.round_results
        return [{"round": 0, "evaluate_metrics_serverapp": self.initial_evaluation}, *self.round_results]


# resume.pt's fields: the first four in every version, the others added since.
STATE_FIELDS = {state_field.name for state_field in fields(ResumeState)}
REQUIRED_STATE_FIELDS = {"round", "arrays", "lineage", "settings"}


@dataclass(frozen=True)
class RunFolder:
    """A run folder that `resume-from` may continue, read back and checked as a whole."""

    run_config: dict  # its config.json, with the legacy value of each key added since
    config: AppConfig  # the same, typed (but its own `resume-from`: a folder may move)
    state: ResumeState


def read_run_folder(run_dir: Path, model_shapes: dict[str, tuple]) -> RunFolder:
    """The run `run_dir` holds, if its config.json, resume.pt and results.json are whole
    and agree with each other; else `ResumeError`, naming the file and what is wrong.
    `model_shapes`: this app's model, which resume.pt's arrays must be. Reads only."""
    run_config = read_run_config(run_dir)
    if not isinstance(run_config["resume-from"], str):
        shown = SHOWN.repr(run_config["resume-from"])
        raise ResumeError(f"its {CONFIG_FILE} holds resume-from = {shown}, not a path{DAMAGED}")
    try:
        # Its `resume-from` names the folder where it was written: only its type counts.
        config = AppConfig.from_run_config({**run_config, "resume-from": ""})
    except ConfigError as err:
        raise ResumeError(f"its {CONFIG_FILE} holds a value this app refuses ({err}){DAMAGED}") from None
    state = load_resume_state(run_dir, config.resume_settings(), model_shapes)
    if problem := _privacy_problem(state, config.dp_on):
        raise ResumeError(f"its {RESUME_FILE} {problem}{DAMAGED}")
    _check_results_file(run_dir, state)
    return RunFolder(run_config, config, state)


def read_run_config(run_dir: Path) -> dict:
    """`run_dir`'s config.json over `LEGACY_SETTINGS`, if it holds every run-config key
    (but those added since) and no other; else `ResumeError`."""
    saved = _read_json(run_dir / CONFIG_FILE)
    if not isinstance(saved, dict):
        raise ResumeError(f"its {CONFIG_FILE} holds a JSON {type(saved).__name__}, not a run-config{DAMAGED}")
    known = {config_field.name.replace("_", "-") for config_field in fields(AppConfig)}
    if unknown := sorted(saved.keys() - known):
        raise ResumeError(
            f"its {CONFIG_FILE} holds keys this app does not know ({', '.join(unknown)}){DAMAGED}"
        )
    if missing := sorted(known - saved.keys() - LEGACY_SETTINGS.keys()):
        raise ResumeError(f"its {CONFIG_FILE} lacks run-config keys ({', '.join(missing)}){DAMAGED}")
    return {**LEGACY_SETTINGS, **saved}


def load_resume_state(run_dir: Path, settings: dict, model_shapes: dict[str, tuple]) -> ResumeState:
    """The state `run_dir`'s resume.pt holds, every field checked; else `ResumeError`.

    `settings`: what its config.json implies (`AppConfig.resume_settings`), which
    resume.pt must repeat, but for keys added after it was written. `model_shapes`:
    this app's model, which its arrays must be.
    """
    path = run_dir / RESUME_FILE
    if not path.is_file():
        raise ResumeError(
            f"holds no {RESUME_FILE}: not a run folder of this app, or one that finished no round"
        )
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 (any unreadable file is the same to the user)
        raise ResumeError(f"its {RESUME_FILE} cannot be read ({_error_line(err)}){DAMAGED}") from None
    # Each check may rely on those before it.
    problem = (
        _fields_problem(saved)
        or _arrays_problem(saved["arrays"], model_shapes)
        or _rounds_problem(saved)
        or _initial_problem(saved.get("initial_evaluation"))
        or _best_problem(saved, run_dir)
        or _identity_problem(saved)
        or _settings_problem(saved["settings"], settings)
    )
    if problem:
        raise ResumeError(f"its {RESUME_FILE} {problem}")
    return ResumeState(**{**saved, "arrays": ArrayRecord(saved["arrays"])})


def _fields_problem(saved) -> str | None:
    if not isinstance(saved, dict) or not all(isinstance(key, str) for key in saved):
        return f"holds a {type(saved).__name__}, not a run's state{DAMAGED}"
    if missing := sorted(REQUIRED_STATE_FIELDS - saved.keys()):
        return f"lacks {', '.join(missing)}{DAMAGED}"
    if unknown := sorted(saved.keys() - STATE_FIELDS):
        return f"holds fields this app never writes ({', '.join(unknown)}){DAMAGED}"
    return None


def _arrays_problem(arrays, model_shapes: dict[str, tuple]) -> str | None:
    if not isinstance(arrays, dict) or not all(isinstance(array, torch.Tensor) for array in arrays.values()):
        return f"holds arrays that are not a model's tensors{DAMAGED}"
    if {key: tuple(array.shape) for key, array in arrays.items()} != model_shapes:
        return "holds a model that is not this app's model (different layers or shapes)"
    for key, array in arrays.items():
        if array.dtype != torch.float32 or array.layout != torch.strided:
            return f"holds {key} as {array.dtype}, not as dense torch.float32{DAMAGED}"
        if not torch.isfinite(array).all():
            return f"holds {key} with NaN or infinite values{DAMAGED}"
    return None


def _rounds_problem(saved: dict) -> str | None:
    """Rounds 1..round in order; the DP releases they record never go back, nor past
    privacy_releases, which is at most one ahead (saved as a round releases)."""
    last_round, round_results = saved["round"], saved.get("round_results")
    if not _is_integer(last_round, low=0):
        return f"holds round = {SHOWN.repr(last_round)}, not a round number{DAMAGED}"
    if last_round == 0:
        return "says no round finished: there is nothing to continue, start a new run"
    if not isinstance(round_results, list) or len(round_results) != last_round:
        return f"holds round_results that are not rounds 1 to {last_round}{DAMAGED}"
    for number, entry in enumerate(round_results, start=1):
        if problem := _entry_problem(number, entry):
            return f"holds a round_results entry {number} that {problem}{DAMAGED}"
    try:
        json.dumps(round_results)  # what becomes results.json again
    except (TypeError, ValueError):
        return f"holds round_results that are not JSON{DAMAGED}"
    privacy_releases = saved.get("privacy_releases", 0)
    if not _is_integer(privacy_releases, low=0, high=last_round + 1):
        return f"holds privacy_releases = {SHOWN.repr(privacy_releases)}, not 0 to {last_round + 1}{DAMAGED}"
    credited = saved.get("privacy_credited", 0)
    if not _is_integer(credited, low=0, high=privacy_releases):
        return f"holds privacy_credited = {SHOWN.repr(credited)}, not 0 to {privacy_releases}{DAMAGED}"
    releases = [_releases(entry) for entry in round_results if "privacy" in entry]
    if releases != sorted(releases):
        return f"records DP releases that go backwards ({releases}){DAMAGED}"
    if releases and releases[-1] > privacy_releases:
        return (
            f"says {privacy_releases} DP round(s) were released, fewer than its round {len(round_results)} "
            f"records ({releases[-1]}), so epsilon would restart too low{DAMAGED}"
        )
    return None


def _initial_problem(initial) -> str | None:
    """None, or round 0's central scores: an accuracy and a loss, each in its range."""
    if initial is None:
        return None
    scores_ok = (
        isinstance(initial, dict)
        and set(initial) == {"accuracy", "loss"}
        and all(
            _is_number(value) and metric_range(name)[0] <= value <= metric_range(name)[1]
            for name, value in initial.items()
        )  # fmt: skip
    )
    if scores_ok:
        return None
    return f"holds initial_evaluation = {SHOWN.repr(initial)}, not round 0's scores{DAMAGED}"


def _entry_problem(number: int, entry) -> str | None:
    """What is wrong with round `number`'s results entry, or None."""
    if not isinstance(entry, dict) or not _is_integer(entry.get("round"), low=number, high=number):
        return f"is not round {number}'s"
    for section in (*RESULT_SECTIONS, "replies"):
        if section in entry and not isinstance(entry[section], dict):
            return f"holds {section} = {SHOWN.repr(entry[section])}, not a record of values"
    for section, key, what in (
        ("evaluate_metrics_serverapp", "accuracy", "central accuracy"),
        ("evaluate_metrics_clientapp", "eval_acc_global", "federated accuracy"),
    ):
        accuracy = entry.get(section, {}).get(key)
        if accuracy is not None and not (_is_number(accuracy) and 0 <= accuracy <= 1):
            return f"holds {what} {SHOWN.repr(accuracy)}, not a number in [0, 1]"
    for section in RESULT_SECTIONS:
        for name, value in entry.get(section, {}).items():
            low, high = metric_range(name)
            if not (_is_number(value) and low <= value <= high):  # NaN is in no range
                return f"holds {section} {name} = {SHOWN.repr(value)}, not a number in [{low}, {high}]"
    if "privacy" in entry and _releases(entry) is None:
        return f"holds privacy {SHOWN.repr(entry['privacy'])}, without a count of releases"
    if "privacy" in entry and not _is_integer(
        entry["privacy"].get("credited", 0), low=0, high=_releases(entry)
    ):
        return f"holds privacy {SHOWN.repr(entry['privacy'])}, crediting more rounds than it released"
    return None


def metric_range(name: str) -> tuple[float, float]:
    """What a results.json metric can be, by its name: a loss is never negative (a
    diverged model's may be infinite), a score is a share, a gain is in points."""
    if name.endswith("loss") or "loss_" in name:
        return 0.0, math.inf
    if "gain_points" in name:
        return -100.0, 100.0
    if "acc" in name or name.endswith("share"):
        return 0.0, 1.0
    return 0.0, math.inf  # a count (an older folder's mean of row counts)


def _releases(entry) -> int | None:
    """How many DP rounds results entry `entry` says were released so far, if it says."""
    privacy = entry.get("privacy") if isinstance(entry, dict) else None
    releases = privacy.get("releases") if isinstance(privacy, dict) else None
    return releases if _is_integer(releases, low=0) else None


def selection_accuracy(entry: dict) -> tuple[float | None, str]:
    """What picks a run's best model in a round's results entry, and what it is: central
    accuracy; without central evaluation, the global model's accuracy on the clients'
    validation rows (a run has one or the other in every round: see `central-evaluation`)."""
    central = (entry.get("evaluate_metrics_serverapp") or {}).get("accuracy")
    if central is not None:
        return central, "central accuracy"
    return (entry.get("evaluate_metrics_clientapp") or {}).get("eval_acc_global"), "federated accuracy"


# The W&B summary of the best model, by what picked it.
BEST_WANDB_NAMES = {
    "central accuracy": "best_centralized_accuracy",
    "federated accuracy": "best_federated_evaluate_accuracy_global_model",
}


def _best_problem(saved: dict, run_dir: Path) -> str | None:
    """The best round is the first with the highest accuracy that picks the best model,
    and its checkpoint a file of the folder, by the name it was saved under: W&B uploads
    that file."""
    best = float("-inf"), None
    for number, entry in enumerate(saved["round_results"], start=1):
        accuracy, _ = selection_accuracy(entry)
        if accuracy is not None and accuracy > best[0]:
            best = accuracy, number
    saved_best = saved.get("best_accuracy", float("-inf")), saved.get("best_round")
    if not _is_number(saved_best[0]) or not (saved_best[1] is None or _is_integer(saved_best[1], low=1)):
        return f"holds best_accuracy, best_round = {SHOWN.repr(saved_best)}{DAMAGED}"
    if saved_best != best:
        return (
            f"says its best round is {saved_best[1]} at accuracy {saved_best[0]}, but its round_results "
            f"say {best[1]} at {best[0]}{DAMAGED}"
        )
    checkpoint = None if best[1] is None else checkpoint_name(best[1], best[0])
    if saved.get("best_checkpoint") != checkpoint:
        return f"names best_checkpoint {SHOWN.repr(saved.get('best_checkpoint'))}, not {checkpoint}{DAMAGED}"
    if checkpoint is not None and not _is_regular_file(run_dir / checkpoint):
        return f"names best checkpoint {checkpoint}, which is not a file in the folder{DAMAGED}"
    return None


def _identity_problem(saved: dict) -> str | None:
    """The lineage names the clients' head folders; the W&B id, the W&B run to go on with."""
    lineage, wandb_run_id = saved["lineage"], saved.get("wandb_run_id")
    if not isinstance(lineage, str) or not LINEAGE_PATTERN.fullmatch(lineage):
        return f"holds lineage {SHOWN.repr(lineage)}, not a run id (32 lowercase hex digits){DAMAGED}"
    if wandb_run_id is not None and not (
        isinstance(wandb_run_id, str) and WANDB_ID_PATTERN.fullmatch(wandb_run_id)
    ):
        return f"holds wandb_run_id {SHOWN.repr(wandb_run_id)}, not a W&B run id{DAMAGED}"
    num_supernodes = saved.get("num_supernodes")
    if num_supernodes is not None and not _is_integer(num_supernodes, low=0):
        return f"holds num_supernodes = {SHOWN.repr(num_supernodes)}, not a count{DAMAGED}"
    return None


def _settings_problem(saved_settings, settings: dict) -> str | None:
    """resume.pt repeats the settings its config.json implies (one written before a key
    was added lacks that key)."""
    if not isinstance(saved_settings, dict):
        return f"holds settings {SHOWN.repr(saved_settings)}, not a dict{DAMAGED}"
    missing = settings.keys() - saved_settings.keys() - LEGACY_SETTINGS.keys()
    unknown = saved_settings.keys() - settings.keys()
    differ = {key for key in settings.keys() & saved_settings.keys() if saved_settings[key] != settings[key]}
    if disagree := sorted(map(str, missing | unknown | differ)):
        return f"and its {CONFIG_FILE} disagree on {', '.join(disagree)}{DAMAGED}"
    return None


def _privacy_problem(state: ResumeState, dp_on: bool) -> str | None:
    """With DP on, every round says what it spent so far; with DP off, none does."""
    recorded = ["privacy" in entry for entry in state.round_results]
    if not dp_on and (state.privacy_releases or any(recorded)):
        return f"records DP releases, but its {CONFIG_FILE} has DP off (dp-noise-multiplier = 0)"
    if dp_on and not all(recorded):
        return f"lacks the privacy spent in some rounds, though its {CONFIG_FILE} has DP on"
    trained = sum(1 for entry in state.round_results if entry.get("train_metrics"))
    if dp_on and trained > state.privacy_releases:
        return f"records {trained} round(s) that trained under DP, but {state.privacy_releases} release(s)"
    return None


def _check_results_file(run_dir: Path, state: ResumeState) -> None:
    """results.json holds resume.pt's rounds, or all but the last (resume.pt is written
    first), after round 0 if the run had it."""
    path = run_dir / RESULTS_FILE
    if not path.exists() and len(state.round_results) == 1 and state.initial_evaluation is None:
        return  # killed between the two writes of round 1
    results = _read_json(path)
    if not isinstance(results, list):
        raise ResumeError(f"its {RESULTS_FILE} holds a JSON {type(results).__name__}, not rounds{DAMAGED}")
    released = max((_releases(entry) or 0 for entry in results), default=0)
    if released > state.privacy_releases:
        raise ResumeError(
            f"its {RESULTS_FILE} says {released} DP round(s) were released, its {RESUME_FILE} only "
            f"{state.privacy_releases}, so epsilon would restart too low{DAMAGED}"
        )
    # Compared as JSON text: a NaN loss equals itself there.
    if json.dumps(results) not in (json.dumps(state.results()), json.dumps(state.results()[:-1])):
        first = 0 if state.initial_evaluation is not None else 1
        raise ResumeError(
            f"its {RESULTS_FILE} holds other rounds than its {RESUME_FILE} ({first} to {state.round}, or to "
            f"{state.round - 1}){DAMAGED}"
        )


def _read_json(path: Path):
    """The JSON in `path`, or `ResumeError` saying why there is none."""
    if not path.is_file():
        raise ResumeError(f"holds no {path.name}: not a run folder of this app, or a damaged one")
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as err:
        raise ResumeError(f"its {path.name} cannot be read ({_error_line(err)}){DAMAGED}") from None


def without_float_noise(value):
    """A mean's last bits (0.9999999999999999 for 1.0) cut: 12 decimals keep every digit a
    score or loss means."""
    return round(value, 12) if isinstance(value, float) else value


def checkpoint_name(server_round: int, accuracy: float) -> str:
    """The file name of a best checkpoint."""
    return f"best_model_round_{server_round}_acc_{accuracy:.4f}.pt"


def _is_integer(value, low: int, high: int | None = None) -> bool:
    in_range = isinstance(value, int) and not isinstance(value, bool) and low <= value
    return in_range and (high is None or value <= high)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_regular_file(path: Path) -> bool:
    """A plain file of the folder's own: not a symbolic link, nor a hard link (another name
    of a file that may lie anywhere, which W&B would upload as the best model)."""
    try:
        status = path.lstat()
    except OSError:
        return False
    return stat.S_ISREG(status.st_mode) and status.st_nlink == 1


def _error_line(err: Exception) -> str:
    """The error's type and the first line of its message (torch.load's run on)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


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
