"""The ServerApp: run-config in, federated training with central evaluation, outputs out."""

import sys
from logging import ERROR, INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from pytorch_example import task
from pytorch_example.client_app import LINEAGE_KEY
from pytorch_example.config import AppConfig, ConfigError, project_dir
from pytorch_example.data import ImageSet, load_test_set, prepare_partitions, train_split_size
from pytorch_example.outputs import RunOutputs, continued_run_config
from pytorch_example.rounds import ReplyGate, RoundLoop, RunFailed
from pytorch_example.trust import build_strategy, check_federation, privacy_ledger

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the run-config and the data, then train for `num-server-rounds` rounds."""
    # A local SuperLink started from another environment or project runs its own
    # Python and code: this line makes that plain.
    log(
        INFO,
        "ServerApp on %s, app from %s, paths relative to %s",
        sys.executable,
        Path(__file__).parent,
        project_dir(),
    )
    try:
        run_config = dict(context.run_config)
        config = AppConfig.from_run_config(run_config)
        if config.resume_from is not None:
            run_config = continued_run_config(run_config, config)
            config = AppConfig.from_run_config(run_config)
        check_server_device(config.server_device)
        num_supernodes = len(list(grid.get_node_ids()))
        log(INFO, "The federation has %d SuperNodes connected", num_supernodes)
        check_federation(config, num_supernodes)
        test_set, max_rows = prepare_data(config, num_supernodes)
        torch.manual_seed(config.seed)
        initial_arrays = ArrayRecord(task.Net().state_dict())
        outputs = RunOutputs.open(config, run_config, num_supernodes, initial_arrays)
        strategy = build_strategy(config, num_supernodes)
        privacy = privacy_ledger(config, num_supernodes, outputs.privacy_releases)
    except ConfigError as err:
        # One readable line first; re-raising marks the run failed with it as the reason.
        log(ERROR, "%s", err)
        raise

    # Central evaluation runs while the ClientApps evaluate (see rounds.py): one CPU
    # thread keeps it from fighting them for cores, at little cost on this small model.
    torch.set_num_threads(1)
    with outputs:
        gate = ReplyGate.for_run(config, initial_arrays, *max_rows)
        rounds = RoundLoop(config, outputs, gate, privacy)
        try:
            rounds.run(
                strategy,
                grid=grid,
                initial_arrays=outputs.arrays,
                # Clients read the run's settings from each message (a resumed run's may not
                # be their run-config's), and key the heads they keep on disk by its lineage.
                client_config=ConfigRecord({**run_config, LINEAGE_KEY: outputs.lineage}),
                evaluate_fn=central_evaluation(test_set, config),
                first_round=outputs.next_round,
            )
        except RunFailed as err:
            log(ERROR, "%s", err)
            raise


def prepare_data(config: AppConfig, num_supernodes: int) -> tuple[ImageSet, tuple[int, int]]:
    """Decode the data and cut it into one partition per SuperNode, before round 1.

    The ClientApps then only map the cached files; a setting the data cannot satisfy
    fails here, once, instead of in every ClientApp. Returns the test split and the
    most train and validation rows a client may claim: the largest partition's, or with
    no SuperNode yet to count, the whole train split.
    """
    # The test split is decoded (or mapped from the cache) once for the whole run.
    test_set = load_test_set(config.data_source)
    if num_supernodes > 0:
        return test_set, prepare_partitions(config.data_source, config.partitioning(num_supernodes))
    whole = train_split_size(config.data_source)
    return test_set, (whole, whole)


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
