"""A run folder's files: their names, what resume.pt holds, and the checks every value
read back passes (run_folder.py reads a folder through them; outputs.py writes it).
"""

import json
import math
import re
import reprlib
import stat
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from pytorch_example.config import FEDAVG, STORED_HEAD, AppConfig, is_count, is_number
from pytorch_example.heads import LINEAGE_PATTERN
from pytorch_example.names import (
    CENTRAL_ACCURACY,
    CENTRAL_LOSS,
    CENTRAL_SECTION,
    CLIENTS_SECTION,
    GLOBAL_ACCURACY,
    LEGACY_SECTIONS,
    RESULT_SECTIONS,
    TRAIN_SECTION,
    Number,
    number_at,
)

# The keys added after resume-from existed, with what a run folder made before them was run
# with: the published example's stored heads, a refit on all train rows, FedAvg and no DP
# (the other values, unused by those, are the keys' first defaults).
LEGACY_SETTINGS = {
    "personalisation": STORED_HEAD,
    "head-refit-epochs": 5,
    "head-refit-rows": 0,
    "aggregation": FEDAVG,
    "update-norm-bound": 0.0,
    # They weighed a reply by at most the largest partition's rows, which the server no
    # longer computes: the bound by the round takes its place.
    "update-weight-bound": 3.0,
    "trim-fraction": 0.2,
    "num-malicious": 1,
    "multi-krum-keep": 0,
    "dp-noise-multiplier": 0.0,
    "dp-clipping-norm": 0.1,
    "dp-delta": 1e-5,
    "dp-max-epsilon": 0.0,
    "dp-population": 0,
    "dp-clipping-quantile": 0.0,
    "central-evaluation": True,
    "server-learning-rate": 1.0,
    "server-momentum": 0.0,
}


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

# What picks a run's best model: central accuracy, or without it the federated one.
SELECTING = (number_at(CENTRAL_SECTION, CENTRAL_ACCURACY), number_at(CLIENTS_SECTION, GLOBAL_ACCURACY))


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
    dp_clipping_norm: float | None = None  # the norm DP's next round clips at (privacy.py's `Clipping`)
    server_velocity: dict | None = None  # server-momentum's buffer, per model entry (server_step.py)
    initial_evaluation: dict | None = None  # the model's central scores before round 1

    def results(self) -> list[dict]:
        """What results.json holds: round 0 (the initial central evaluation), if the run
        had one, then each completed round."""
        if self.initial_evaluation is None:
            return self.round_results
        return [{"round": 0, CENTRAL_SECTION: self.initial_evaluation}, *self.round_results]


# resume.pt's fields: the first four in every version, the others added since.
STATE_FIELDS = {state_field.name for state_field in fields(ResumeState)}
REQUIRED_STATE_FIELDS = {"round", "arrays", "lineage", "settings"}


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
    if isinstance(saved, dict) and "round_results" in saved:
        saved["round_results"] = current_sections(saved["round_results"])
    # Each check may rely on those before it.
    problem = (
        _fields_problem(saved)
        or _arrays_problem(saved["arrays"], model_shapes)
        or _velocity_problem(saved.get("server_velocity"), model_shapes)
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


def _velocity_problem(velocity, model_shapes: dict[str, tuple]) -> str | None:
    """None, or server-momentum's buffer: one finite tensor per model entry, as the model's."""
    if velocity is None or _arrays_problem(velocity, model_shapes) is None:
        return None
    return f"holds a server_velocity that is not one finite tensor per model entry{DAMAGED}"


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
    norm = saved.get("dp_clipping_norm")
    if norm is not None and not _is_norm(norm):
        return f"holds dp_clipping_norm = {SHOWN.repr(norm)}, not a clipping norm{DAMAGED}"
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
        and set(initial) == {CENTRAL_ACCURACY, CENTRAL_LOSS}
        and all(
            is_number(value) and metric_range(name)[0] <= value <= metric_range(name)[1]
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
    for selecting in SELECTING:
        accuracy = entry.get(selecting.section, {}).get(selecting.key)
        if accuracy is not None and not (is_number(accuracy) and 0 <= accuracy <= 1):
            return f"holds {selecting.words} {SHOWN.repr(accuracy)}, not a number in [0, 1]"
    for section in RESULT_SECTIONS:
        for name, value in entry.get(section, {}).items():
            low, high = metric_range(name)
            if not (is_number(value) and low <= value <= high):  # NaN is in no range
                return f"holds {section} {name} = {SHOWN.repr(value)}, not a number in [{low}, {high}]"
    if "privacy" in entry and _releases(entry) is None:
        return f"holds privacy {SHOWN.repr(entry['privacy'])}, without a count of releases"
    if "privacy" in entry and not _is_integer(
        entry["privacy"].get("credited", 0), low=0, high=_releases(entry)
    ):
        return f"holds privacy {SHOWN.repr(entry['privacy'])}, crediting more rounds than it released"
    if (
        "privacy" in entry
        and "clipping_norm" in entry["privacy"]
        and not _is_norm(entry["privacy"]["clipping_norm"])
    ):
        return f"holds privacy {SHOWN.repr(entry['privacy'])}, with a clipping norm that is none"
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


def selection_accuracy(entry: dict) -> tuple[float | None, Number]:
    """What picks a run's best model in a round's results entry, and which number it is:
    central accuracy; without central evaluation, the global model's accuracy on the
    clients' validation rows (a run has one or the other in every round: see
    `central-evaluation`)."""
    central, federated = SELECTING
    accuracy = (entry.get(central.section) or {}).get(central.key)
    if accuracy is not None:
        return accuracy, central
    return (entry.get(federated.section) or {}).get(federated.key), federated


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
    if not is_number(saved_best[0]) or not (saved_best[1] is None or _is_integer(saved_best[1], low=1)):
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


def privacy_problem(state: ResumeState, dp_on: bool) -> str | None:
    """With DP on, every round says what it spent so far; with DP off, none does."""
    recorded = ["privacy" in entry for entry in state.round_results]
    if not dp_on and (state.privacy_releases or any(recorded)):
        return f"records DP releases, but its {CONFIG_FILE} has DP off (dp-noise-multiplier = 0)"
    if dp_on and not all(recorded):
        return f"lacks the privacy spent in some rounds, though its {CONFIG_FILE} has DP on"
    trained = sum(1 for entry in state.round_results if entry.get(TRAIN_SECTION))
    if dp_on and trained > state.privacy_releases:
        return f"records {trained} round(s) that trained under DP, but {state.privacy_releases} release(s)"
    return None


def check_results_file(run_dir: Path, state: ResumeState) -> None:
    """results.json holds resume.pt's rounds, or all but the last (resume.pt is written
    first), after round 0 if the run had it."""
    path = run_dir / RESULTS_FILE
    if not path.exists() and len(state.round_results) == 1 and state.initial_evaluation is None:
        return  # killed between the two writes of round 1
    results = current_sections(_read_json(path))
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


def current_sections(entries):
    """Round entries under today's section names (an older folder's `train_metrics`);
    anything else as it is, for the checks to refuse."""
    if not isinstance(entries, list):
        return entries
    return [
        {LEGACY_SECTIONS.get(key, key): value for key, value in entry.items()}
        if isinstance(entry, dict)
        else entry
        for entry in entries
    ]


def _read_json(path: Path):
    """The JSON in `path`, or `ResumeError` saying why there is none."""
    if not path.is_file():
        raise ResumeError(f"holds no {path.name}: not a run folder of this app, or a damaged one")
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as err:
        raise ResumeError(f"its {path.name} cannot be read ({_error_line(err)}){DAMAGED}") from None


def checkpoint_name(server_round: int, accuracy: float) -> str:
    """The file name of a best checkpoint."""
    return f"best_model_round_{server_round}_acc_{accuracy:.4f}.pt"


def _is_integer(value, low: int, high: int | None = None) -> bool:
    in_range = is_count(value) and low <= value
    return in_range and (high is None or value <= high)


def _is_norm(value) -> bool:
    return is_number(value) and 0 < value < math.inf


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
