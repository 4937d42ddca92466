"""Checks of a run-config beyond its values, and the command that runs them before a run:

    python -m pytorch_example.check "num-server-rounds=5 aggregation='median'"

says what a run would refuse (what Flower would not read, a key the app lacks, each
value, with `dataset-path` the partitioner) without starting one.
"""

import argparse
import difflib
import re
import sys
from pathlib import Path

import click
import torch
from flwr.common.config import flatten_dict, get_project_config, parse_config_args

from pytorch_example.config import AppConfig, ConfigError
from pytorch_example.privacy import Clipping


def check_server_device(server_device: str) -> None:
    """Fail with one line when `server-device` names a GPU this ServerApp cannot see."""
    if server_device == "cpu":
        return
    index = int(server_device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"run-config key 'server-device' = '{server_device}' but the ServerApp sees "
            f'{torch.cuda.device_count()} CUDA device(s): use server-device="cpu"'
        )


# What Flower reads from a `--run-config` string as `key=value` (flwr.common.config).
RUN_CONFIG_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")
CHECKED_SUPERNODES = 50  # the local-simulation federation's size, which the checker assumes


def main() -> None:
    """Check a `--run-config` against this project's keys and values without starting a
    run: what Flower would not read, a key the app does not have, and each value, as a
    run's first check does. With `dataset-path` set, also the partitioner, as the run
    does before round 1 (for `--supernodes`, default 50); a `resume-from` folder is
    checked by the run itself."""
    parser = argparse.ArgumentParser(prog="python -m pytorch_example.check", description=main.__doc__)
    parser.add_argument("pairs", nargs="*", help='what --run-config gets, e.g. "seed=1" (one or more)')
    parser.add_argument("--supernodes", type=int, default=CHECKED_SUPERNODES, help="partitions to check")
    args = parser.parse_args()
    try:
        config = checked_run_config(" ".join(args.pairs))
        checked = "keys and values"
        if config.dp_on:  # DP's clipping, at the sample the federation's size gives
            Clipping(config, config.train_sample_size(args.supernodes))
        if config.dataset_path is not None:  # as the run checks it before round 1
            from pytorch_example.data import prepare_partitions  # noqa: PLC0415 (torch and datasets: slow)

            prepare_partitions(config.data_source, config.partitioning(args.supernodes))
            checked += f", and dirichlet-alpha's {args.supernodes} partitions of {config.dataset_path}"
        else:
            checked += "; not the partitioner, which needs dataset-path here (the checker reads no Hub)"
    except (ConfigError, click.ClickException, OSError, ValueError) as err:  # a broken pyproject.toml too
        message = err.format_message() if isinstance(err, click.ClickException) else str(err)
        sys.exit(f"error: {message}")
    print(f"run-config OK: {checked}")


def checked_run_config(pairs: str) -> "AppConfig":
    """The run-config these `--run-config` pairs give over this project's defaults;
    `ConfigError` naming the first key or pair a run would refuse."""
    defaults = flatten_dict(get_project_config(Path.cwd())["tool"]["flwr"]["app"]["config"])
    if unread := RUN_CONFIG_PAIR.sub("", pairs).split():
        raise ConfigError(f"{' '.join(unread)!r} is not key=value: Flower would skip it")
    for key, value in RUN_CONFIG_PAIR.findall(pairs):
        try:
            parse_config_args([f"{key}={value}"])
        except click.ClickException:
            hint = f"\"{key}='{value}'\"" if value[:1] not in "'\"" else f"{key}={value}"
            raise ConfigError(
                f"run-config key '{key}' = {value} is not a value Flower reads (a string needs quotes "
                f"inside the pairs' own: --run-config {hint})"
            ) from None
    overrides = parse_config_args([pairs])
    for key in overrides.keys() - defaults.keys():
        close = difflib.get_close_matches(key, defaults, n=1)
        hint = f": did you mean '{close[0]}'?" if close else " (pyproject.toml, [tool.flwr.app.config])"
        raise ConfigError(f"run-config key '{key}' is not one of this app's{hint}")
    config = AppConfig.from_run_config({**defaults, **overrides})
    check_server_device(config.server_device)
    return config


if __name__ == "__main__":
    main()
