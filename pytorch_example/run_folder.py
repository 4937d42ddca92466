"""The run folder's owner: it makes a new run's folder and locks it, and for `resume-from`
locks the folder, reads it back once (every file checked, run_files.py), and decides what
the resumed run goes on with, or refuses in one line, the folder left as it was.
outputs.py writes into the folder it gets from here.
"""

import fcntl
import os
from dataclasses import dataclass
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path

from flwr.common.logger import log

from pytorch_example.config import PARTITION_PATH_KEYS, AppConfig, ConfigError
from pytorch_example.run_files import (
    CONFIG_FILE,
    DAMAGED,
    RESUME_FILE,
    SHOWN,
    ResumeError,
    ResumeState,
    check_results_file,
    load_resume_state,
    privacy_problem,
    read_run_config,
)
from pytorch_example.task import Net

# Held by the process of the run writing into the folder (see `lock_run_folder`).
RUN_LOCK_FILE = ".run.lock"

# What decides each client's data and the model's meaning: a run resumed with other
# values would silently mix two experiments, so it is refused.
RESUME_MUST_MATCH = (
    "dataset-name",
    "dataset-path",
    "dirichlet-alpha",
    "partition-seed",
    "val-fraction",
    "personalisation",
    # What picks the best model: central accuracy, or without it the federated one.
    "central-evaluation",
    # The privacy a run's epsilon accounts for: another noise, clipping norm or delta would be
    # another mechanism, or another epsilon.
    "dp-noise-multiplier",
    "dp-clipping-norm",
    "dp-delta",
    "dp-population",
    "dp-clipping-quantile",
)
DP_ONLY = (
    "dp-clipping-norm",
    "dp-delta",
    "dp-population",
    "dp-clipping-quantile",
)  # without DP they change nothing


def resume_settings(config: AppConfig) -> dict:
    """The run-config values a resumed run must share with the run it continues."""
    keys = [key for key in RESUME_MUST_MATCH if config.dp_on or key not in DP_ONLY]
    return {key: config.run_config_value(key) for key in keys}


def resume_error(config: AppConfig, err: Exception) -> ConfigError:
    """`err`, what is wrong with the `resume-from` folder, as one line naming the key."""
    line = " ".join(str(err).split())
    return ConfigError(f"run-config key 'resume-from' = '{config.resume_from}' {line}")


@dataclass
class Resumed:
    """The folder `resume-from` names, locked for this run and read back once: what the
    run goes on with."""

    run_config: dict  # the run-config the run goes on with (`continued_run_config`)
    config: AppConfig  # the same, typed
    state: ResumeState  # where the folder stood
    lock: int | None  # see `lock_run_folder`; None once the run's outputs hold it

    def take_lock(self) -> int | None:
        """The folder's lock, now the caller's to release (`RunOutputs` holds it to its end)."""
        lock, self.lock = self.lock, None
        return lock

    def release(self) -> None:
        """Free the folder, if no one took its lock: a run refused after it was read."""
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None


def resume_run(run_config: dict, config: AppConfig, num_supernodes: int) -> Resumed:
    """Lock the folder `resume-from` names, read it once, and return what this run goes on
    with. A folder this run cannot continue (damaged, altered, still being written, or
    made with other settings) raises `ConfigError`, in one line, before anything is
    written; the folder is left as it was, and free."""
    lock = None
    try:
        # Locked before it is read: a run still going could write between the two.
        lock = lock_run_folder(config.resume_from, create=False)
        model_shapes = {key: tuple(array.shape) for key, array in Net().state_dict().items()}
        folder = read_run_folder(config.resume_from, model_shapes)
        run_config = continued_run_config(run_config, config, folder.run_config)
        config = AppConfig.from_run_config(run_config)
        state = continued_state(config, folder, num_supernodes)
        # A folder of a version without the lock file gets one now.
        lock = lock if lock is not None else lock_run_folder(config.resume_from, create=True)
        return Resumed(run_config, config, state, lock)
    except BaseException as err:
        if lock is not None:
            os.close(lock)  # refused, or failed: the folder stays free
        if isinstance(err, ResumeError):
            raise resume_error(config, err) from None
        raise


def continued_state(config: AppConfig, folder: "RunFolder", num_supernodes: int) -> ResumeState:
    """Where the resumed run starts: the folder's last completed round, if it was made with
    the settings `config` must share and has rounds left to run; else `ResumeError`."""
    settings = resume_settings(config)
    if changed := [
        f"{key} was {folder.config.run_config_value(key)!r}"
        for key, value in settings.items()
        if folder.config.run_config_value(key) != value
    ]:
        raise ResumeError(
            f"was made with other data, personalisation or privacy settings ({', '.join(changed)}): "
            "run with those"
        )
    resumed = folder.state
    resumed.settings = settings  # an older folder's state lacks the keys added since
    if resumed.round >= config.num_server_rounds:
        raise ResumeError(
            f"already finished round {resumed.round}: raise num-server-rounds above it to go on"
        )
    log(INFO, "Resuming %s after round %d of %d", config.resume_from, resumed.round, config.num_server_rounds)
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
    return resumed


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
    state = load_resume_state(run_dir, resume_settings(config), model_shapes)
    if problem := privacy_problem(state, config.dp_on):
        raise ResumeError(f"its {RESUME_FILE} {problem}{DAMAGED}")
    check_results_file(run_dir, state)
    return RunFolder(run_config, config, state)


def continued_run_config(run_config: dict, config: AppConfig, saved: dict) -> dict:
    """The run-config a resumed run goes on with: `saved`, that of the run it continues,
    but for the keys this command sets to other than their defaults. So `resume-from`
    alone continues a run as it was started."""
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
