"""The run-config, read and validated once into typed values.

Every knob lives in `[tool.flwr.app.config]` of `pyproject.toml`; both the ServerApp
and the ClientApp turn `context.run_config` into an `AppConfig` here, so a bad value
stops the run with one line that names the key, the value and the fix.
"""

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from flwr.app import UserConfig

from pytorch_example.files import DEFAULT_CACHE_DIR, resolve_path


class ConfigError(ValueError):
    """A run-config value the app cannot use; the message is one line for the user."""


def is_count(value) -> bool:
    """An int, and not a bool: TOML's and JSON's `true` is a bool that Python counts as 1."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or a float, and not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


# How a client makes its own model, and what it sends (client_app.py says each in full).
REFIT_HEAD = "refit-head"
PRIVATE_HEAD = "private-head"
STORED_HEAD = "stored-head"
PERSONALISATIONS = (REFIT_HEAD, PRIVATE_HEAD, STORED_HEAD)
PERSONALISATION_SAID = {  # for the ServerApp's log
    REFIT_HEAD: "clients train and send the whole model, and refit a head of their own at each evaluation",
    PRIVATE_HEAD: "clients train and send the body only, and refit a head of their own at each evaluation",
    STORED_HEAD: "clients train their own head with the body and send both (the published example)",
}

# How the server combines the train replies (trust.py maps each to a Flower strategy).
FEDAVG = "fedavg"
AGGREGATIONS = (FEDAVG, "trimmed-mean", "median", "krum", "multi-krum", "bulyan")

# The run-config keys a ClientApp reads, which every train and evaluate message carries
# (a resumed run's are those of the run it continues): its steps, batches, head refit,
# seeds, and how a simulation partition is cut. No path of the server's is among them.
CLIENT_KEYS = (
    "local-epochs",
    "batch-size",
    "eval-batch-size",
    "momentum",
    "personalisation",
    "head-refit-epochs",
    "head-refit-rows",
    "seed",
    "partition-seed",
    "val-fraction",
    "dirichlet-alpha",
    "dataset-name",
)
# Where a simulation partition's images lie, which its ClientApp reads from its own
# run-config: paths of the machine it runs on. A node with its own data reads neither.
PARTITION_PATH_KEYS = ("dataset-path", "data-cache-dir")


@dataclass(frozen=True)
class DataSource:
    """Where the images come from, and where they are cached, as the run-config says."""

    dataset_name: str
    dataset_path: Path | None
    data_cache_dir: Path


@dataclass(frozen=True)
class Partitioning:
    """How the train split is cut into clients' rows: the run-config's settings, and the
    number of partitions, which the federation decides."""

    num_partitions: int
    dirichlet_alpha: float
    partition_seed: int
    val_fraction: float


@dataclass(frozen=True)
class AppConfig:
    """All run-config keys, typed and checked. Field names are the keys in snake_case,
    and the defaults are pyproject.toml's (a test keeps them, and README's table, equal)."""

    num_server_rounds: int = 10
    fraction_train: float = 0.25
    fraction_evaluate: float = 0.5
    local_epochs: int = 1
    batch_size: int = 32
    eval_batch_size: int = 256
    learning_rate: float = 0.02
    momentum: float = 0.9
    personalisation: str = REFIT_HEAD
    head_refit_epochs: int = 5
    head_refit_rows: int = 128
    aggregation: str = FEDAVG
    update_norm_bound: float = 2.0
    update_weight_bound: float = 3.0
    trim_fraction: float = 0.2
    num_malicious: int = 1
    multi_krum_keep: int = 0
    dp_noise_multiplier: float = 0.0
    dp_clipping_norm: float = 0.1
    dp_clipping_quantile: float = 0.0
    dp_delta: float = 1e-5
    dp_max_epsilon: float = 0.0
    dp_population: int = 0
    lr_decay_rounds: tuple[int, ...] = (5,)
    lr_decay_factor: float = 0.5
    server_learning_rate: float = 1.0
    server_momentum: float = 0.0
    server_device: str = "cpu"
    central_evaluation: bool = True
    seed: int = 42
    partition_seed: int = 42
    dirichlet_alpha: float = 1.0
    val_fraction: float = 0.2
    dataset_name: str = "zalando-datasets/fashion_mnist"
    dataset_path: Path | None = None
    data_cache_dir: Path = DEFAULT_CACHE_DIR
    output_dir: Path = field(default_factory=lambda: resolve_path("outputs"))
    max_failed_rounds: int = 3
    round_timeout: float = 300.0
    resume_from: Path | None = None
    use_wandb: bool = True
    wandb_project: str = "pytorch-example"

    @classmethod
    def from_run_config(cls, run_config: UserConfig) -> "AppConfig":
        """Validate `run_config` and return it typed; raise `ConfigError` on bad input."""
        reader = _Reader(run_config)
        config = cls(
            num_server_rounds=reader.integer("num-server-rounds", minimum=1),
            fraction_train=reader.fraction("fraction-train"),
            fraction_evaluate=reader.fraction("fraction-evaluate", allow_zero=True),
            local_epochs=reader.integer("local-epochs", minimum=1),
            batch_size=reader.integer("batch-size", minimum=1),
            eval_batch_size=reader.integer("eval-batch-size", minimum=1),
            learning_rate=reader.positive("learning-rate"),
            momentum=reader.number("momentum", low=0.0, high=1.0, high_open=True),
            personalisation=reader.choice("personalisation", PERSONALISATIONS),
            head_refit_epochs=reader.integer("head-refit-epochs", minimum=1),
            head_refit_rows=reader.integer("head-refit-rows", minimum=0),
            aggregation=reader.choice("aggregation", AGGREGATIONS),
            update_norm_bound=reader.multiple("update-norm-bound"),
            update_weight_bound=reader.multiple("update-weight-bound"),
            trim_fraction=reader.number("trim-fraction", low=0.0, high=0.5, low_open=True, high_open=True),
            num_malicious=reader.integer("num-malicious", minimum=0),
            multi_krum_keep=reader.integer("multi-krum-keep", minimum=0),
            dp_noise_multiplier=reader.nonnegative("dp-noise-multiplier"),
            dp_clipping_norm=reader.positive("dp-clipping-norm"),
            dp_clipping_quantile=reader.number("dp-clipping-quantile", low=0.0, high=1.0, high_open=True),
            dp_delta=reader.number("dp-delta", low=0.0, high=1.0, low_open=True, high_open=True),
            dp_max_epsilon=reader.nonnegative("dp-max-epsilon"),
            dp_population=reader.integer("dp-population", minimum=0),
            lr_decay_rounds=reader.rounds("lr-decay-rounds"),
            lr_decay_factor=reader.positive("lr-decay-factor"),
            server_learning_rate=reader.positive("server-learning-rate"),
            server_momentum=reader.number("server-momentum", low=0.0, high=1.0, high_open=True),
            server_device=reader.device("server-device"),
            central_evaluation=reader.boolean("central-evaluation"),
            seed=reader.integer("seed", minimum=0),
            partition_seed=reader.integer("partition-seed", minimum=0),
            dirichlet_alpha=reader.positive("dirichlet-alpha"),
            val_fraction=reader.number("val-fraction", low=0.0, high=1.0, low_open=True, high_open=True),
            dataset_name=reader.text("dataset-name"),
            dataset_path=reader.optional_path("dataset-path"),
            data_cache_dir=reader.optional_path("data-cache-dir") or DEFAULT_CACHE_DIR,
            output_dir=reader.path("output-dir"),
            max_failed_rounds=reader.integer("max-failed-rounds", minimum=1),
            round_timeout=reader.positive("round-timeout"),
            resume_from=reader.optional_path("resume-from"),
            use_wandb=reader.boolean("use-wandb"),
            wandb_project=reader.text("wandb-project"),
        )
        if config.dataset_path is not None and not config.dataset_path.is_dir():
            raise ConfigError(
                f"run-config key 'dataset-path' = '{config.dataset_path}' is not a folder: "
                "point it at the folder holding the Fashion-MNIST .gz or parquet files"
            )
        config.check_privacy()
        config.check_evaluation()
        if config.resume_from is not None and not config.resume_from.is_dir():
            raise ConfigError(
                f"run-config key 'resume-from' = '{config.resume_from}' is not a folder: point it at "
                "the run folder to continue, outputs/<date>/<time>"
            )
        return config

    @classmethod
    def for_client(cls, run_config: UserConfig, sent: UserConfig, own_data: bool) -> "AppConfig":
        """What a ClientApp needs, read and checked: `CLIENT_KEYS` from the message
        (`sent`, else its run-config), and for a simulation partition (not `own_data`) the
        `PARTITION_PATH_KEYS` from its run-config. Every other key keeps its default: the
        server's paths and settings are not the client's to check."""
        settings = cls().as_run_config()
        for key in CLIENT_KEYS:
            settings[key] = sent[key] if key in sent else run_config.get(key, settings[key])
        if not own_data:
            settings |= {key: run_config[key] for key in PARTITION_PATH_KEYS if key in run_config}
        return cls.from_run_config(settings)

    def as_run_config(self) -> dict:
        """The run-config that reads as these values."""
        values = {}
        for setting in fields(self):
            value = getattr(self, setting.name)
            if value is None:
                value = ""
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = ",".join(str(part) for part in value)
            values[setting.name.replace("_", "-")] = value
        return values

    @property
    def dp_on(self) -> bool:
        return self.dp_noise_multiplier > 0

    def check_evaluation(self) -> None:
        """Refuse a run that would measure its global model nowhere."""
        if not self.central_evaluation and self.fraction_evaluate == 0:
            raise ConfigError(
                "run-config key 'central-evaluation' = false leaves only the clients to score the global "
                "model, but fraction-evaluate = 0: set fraction-evaluate > 0, or central-evaluation=true"
            )

    def check_privacy(self) -> None:
        """Refuse DP settings Flower's DP wrapper and accountant cannot honour."""
        if self.dp_max_epsilon > 0 and not self.dp_on:
            raise ConfigError(
                f"run-config key 'dp-max-epsilon' = {self.dp_max_epsilon:g} bounds nothing while "
                "dp-noise-multiplier = 0 (DP off): set dp-noise-multiplier > 0, or dp-max-epsilon = 0"
            )
        if self.dp_clipping_quantile and not self.dp_on:
            raise ConfigError(
                f"run-config key 'dp-clipping-quantile' = {self.dp_clipping_quantile:g} adapts DP's clipping "
                "norm while dp-noise-multiplier = 0 (DP off): set dp-noise-multiplier > 0, or "
                "dp-clipping-quantile = 0"
            )
        if self.dp_population and not self.dp_on:
            raise ConfigError(
                f"run-config key 'dp-population' = {self.dp_population} credits DP's sampling while "
                "dp-noise-multiplier = 0 (DP off): set dp-noise-multiplier > 0, or dp-population = 0"
            )
        if self.dp_on and self.aggregation != FEDAVG:
            raise ConfigError(
                f"run-config key 'aggregation' = '{self.aggregation}' cannot run with DP "
                "(dp-noise-multiplier > 0): the privacy account holds for a plain mean of clipped "
                'updates only; use aggregation="fedavg" or dp-noise-multiplier=0'
            )
        if self.dp_on and self.personalisation == PRIVATE_HEAD:
            raise ConfigError(
                f"run-config key 'personalisation' = '{PRIVATE_HEAD}' cannot run with DP "
                "(dp-noise-multiplier > 0): Flower's DP wrapper clips whole models, and a private-head "
                f'client sends the body only; use personalisation="{REFIT_HEAD}"'
            )

    def train_sample_size(self, num_supernodes: int) -> int:
        """How many SuperNodes FedAvg samples to train: `fraction-train` of them, at least 2."""
        return max(int(num_supernodes * self.fraction_train), 2)

    def run_config_value(self, key: str):
        """The typed value of run-config `key`, paths as strings."""
        value = getattr(self, key.replace("-", "_"))
        return str(value) if isinstance(value, Path) else value

    @property
    def data_source(self) -> DataSource:
        return DataSource(self.dataset_name, self.dataset_path, self.data_cache_dir)

    def partitioning(self, num_partitions: int) -> Partitioning:
        return Partitioning(num_partitions, self.dirichlet_alpha, self.partition_seed, self.val_fraction)

    def learning_rate_at(self, server_round: int) -> float:
        """Step schedule: multiply by `lr_decay_factor` at each round in `lr_decay_rounds`."""
        passed = sum(1 for milestone in self.lr_decay_rounds if milestone <= server_round)
        return self.learning_rate * self.lr_decay_factor**passed


class _Reader:
    """Reads one key at a time and names it in every error."""

    def __init__(self, run_config: UserConfig) -> None:
        self.run_config = run_config

    def _get(self, key: str):
        if key not in self.run_config:
            raise ConfigError(
                f"run-config key '{key}' is missing: add it to [tool.flwr.app.config] "
                "in pyproject.toml or pass --run-config"
            )
        return self.run_config[key]

    def _fail(self, key: str, value, expected: str) -> ConfigError:
        return ConfigError(
            f"run-config key '{key}' = {value!r} is invalid: expected {expected} "
            f'(e.g. --run-config "{key}=...")'
        )

    def integer(self, key: str, minimum: int) -> int:
        value = self._get(key)
        if not is_count(value) or value < minimum:
            raise self._fail(key, value, f"an integer >= {minimum}")
        return value

    def number(
        self,
        key: str,
        low: float,
        high: float,
        low_open: bool = False,
        high_open: bool = False,
    ) -> float:
        value = self._get(key)
        in_range = is_number(value)
        if in_range:
            in_range = (value > low if low_open else value >= low) and (
                value < high if high_open else value <= high
            )
        if not in_range:
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise self._fail(key, value, f"a number in {interval}")
        return float(value)

    def multiple(self, key: str) -> float:
        """A factor of at least 1, or 0 for none."""
        value = self._get(key)
        if not is_number(value) or not (value == 0 or 1 <= value < math.inf):
            raise self._fail(key, value, "0 (no bound) or a number >= 1")
        return float(value)

    def fraction(self, key: str, allow_zero: bool = False) -> float:
        return self.number(key, low=0.0, high=1.0, low_open=not allow_zero)

    def positive(self, key: str) -> float:
        return self.number(key, low=0.0, high=float("inf"), low_open=True, high_open=True)

    def nonnegative(self, key: str) -> float:
        return self.number(key, low=0.0, high=float("inf"), high_open=True)

    def boolean(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise self._fail(key, value, "true or false")
        return value

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str) or not value.strip():
            raise self._fail(key, value, "a non-empty string")
        return value.strip()

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self._get(key)
        if value not in choices:
            raise ConfigError(
                f"run-config key '{key}' = {value!r} is invalid: expected "
                + " or ".join(f'"{choice}"' for choice in choices)
                + f" (e.g. --run-config \"{key}='{choices[0]}'\")"
            )
        return value

    def rounds(self, key: str) -> tuple[int, ...]:
        value = self._get(key)
        parts = [part.strip() for part in str(value).split(",") if part.strip()]
        if isinstance(value, bool) or not all(part.isdigit() and int(part) >= 1 for part in parts):
            raise self._fail(key, value, 'comma-separated round numbers >= 1, e.g. "5" or "5,8"')
        return tuple(sorted(int(part) for part in parts))

    def device(self, key: str) -> str:
        value = self.text(key)
        if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
            raise self._fail(key, value, '"cpu", "cuda" or "cuda:N"')
        return value

    def path(self, key: str) -> Path:
        return resolve_path(self.text(key))

    def optional_path(self, key: str) -> Path | None:
        value = self._get(key)
        if not isinstance(value, str):
            raise self._fail(key, value, 'a path, or "" for the default')
        return resolve_path(value) if value.strip() else None
