"""The ServerApp: run-config in, federated training with central evaluation, outputs out."""

from datetime import datetime
from logging import ERROR, INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from pytorch_example import task
from pytorch_example.config import AppConfig, ConfigError
from pytorch_example.data import DataError, ImageSet, ensure_partitions, load_test_set
from pytorch_example.outputs import ResumeError, ResumeState, RunOutputs, load_resume_state
from pytorch_example.strategy import CustomFedAvg, RunFailed

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the run-config and the data, then train for `num-server-rounds` rounds."""
    try:
        config = AppConfig.from_run_config(context.run_config)
        check_server_device(config.server_device)
        num_supernodes = len(list(grid.get_node_ids()))
        log(INFO, "The federation has %d SuperNodes connected", num_supernodes)
        test_set = prepare_data(config, num_supernodes)
        resumed = resume_state(config)
    except ConfigError as err:
        # One readable line first; re-raising marks the run failed with it as the reason.
        log(ERROR, "%s", err)
        raise

    torch.manual_seed(config.seed)
    # Central evaluation runs while the ClientApps evaluate (see the strategy): one CPU
    # thread keeps it from fighting them for cores, at little cost on this small model.
    torch.set_num_threads(1)
    if resumed is None:
        initial_arrays, first_round = ArrayRecord(task.Net().state_dict()), 1
        run_dir = create_run_dir(config.output_dir)
        log(INFO, "Outputs of this run go to %s", run_dir)
    else:
        initial_arrays, first_round, run_dir = resumed.arrays, resumed.round + 1, config.resume_from
        log(INFO, "Resuming %s after round %d of %d", run_dir, resumed.round, config.num_server_rounds)

    wandb_project = config.wandb_project if config.use_wandb else None
    with RunOutputs(
        run_dir, dict(context.run_config), wandb_project, config.resume_settings(), resumed
    ) as outputs:
        strategy = CustomFedAvg(
            outputs=outputs,
            learning_rate_at=config.learning_rate_at,
            max_failed_rounds=config.max_failed_rounds,
            fraction_train=config.fraction_train,
            fraction_evaluate=config.fraction_evaluate,
        )
        # Clients key the heads they keep on disk by the run's lineage.
        client_config = ConfigRecord({"lineage": outputs.lineage})
        try:
            strategy.start(
                grid=grid,
                initial_arrays=initial_arrays,
                num_rounds=config.num_server_rounds,
                timeout=config.round_timeout,
                train_config=client_config,
                evaluate_config=ConfigRecord(dict(client_config)),
                evaluate_fn=central_evaluation(test_set, config),
                first_round=first_round,
            )
        except RunFailed as err:
            log(ERROR, "%s", err)
            raise


def resume_state(config: AppConfig) -> ResumeState | None:
    """Where the run to continue stood, or None for a new run; one line if it cannot."""
    if config.resume_from is None:
        return None
    model_shapes = {key: tuple(value.shape) for key, value in task.Net().state_dict().items()}
    try:
        resumed = load_resume_state(config.resume_from, config.resume_settings(), model_shapes)
    except ResumeError as err:
        raise config.resume_error(err) from None
    if resumed.round >= config.num_server_rounds:
        raise config.resume_error(
            f"already finished round {resumed.round}: raise num-server-rounds above it to go on"
        )
    return resumed


def prepare_data(config: AppConfig, num_supernodes: int) -> ImageSet:
    """Decode the data and cut it into one partition per SuperNode, before round 1.

    The ClientApps then only map the cached files; a setting the data cannot satisfy
    fails here, once, instead of in every ClientApp.
    """
    try:
        # The test split is decoded (or mapped from the cache) once for the whole run.
        test_set = load_test_set(config.data_settings(num_partitions=max(num_supernodes, 1)))
        if num_supernodes > 0:
            ensure_partitions(config.data_settings(num_partitions=num_supernodes))
    except DataError as err:
        raise config.data_error(err) from None
    return test_set


def central_evaluation(test_set: ImageSet, config: AppConfig):
    """Evaluate a global model on the test split, on `server-device`."""
    device = torch.device(config.server_device)
    net = task.Net()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        net.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = task.test(net, test_set, config.eval_batch_size, device)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    return evaluate


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
