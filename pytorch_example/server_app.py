"""The ServerApp: run-config in, federated training with central evaluation, outputs out."""

import sys
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from pytorch_example import task
from pytorch_example.check import check_server_device
from pytorch_example.config import CLIENT_KEYS, PERSONALISATION_SAID, AppConfig, ConfigError
from pytorch_example.data import ImageSet, load_test_set, prepare_partitions
from pytorch_example.data_cache import has_split
from pytorch_example.files import project_dir
from pytorch_example.gate import ReplyGate
from pytorch_example.names import CENTRAL_ACCURACY, CENTRAL_LOSS, LINEAGE_KEY
from pytorch_example.outputs import RunOutputs
from pytorch_example.privacy import run_ledger
from pytorch_example.rounds import RoundLoop, RunFailed
from pytorch_example.run_folder import resume_run
from pytorch_example.server_step import ServerStep
from pytorch_example.trust import build_strategy, check_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the run-config and the data, then train for `num-server-rounds` rounds."""
    # A local SuperLink started from another environment runs its own Python: say which.
    log(INFO, "ServerApp on %s, app from %s, paths relative to %s",
        sys.executable, Path(__file__).parent, project_dir())  # fmt: skip
    resumed = None
    try:
        run_config = dict(context.run_config)
        config = AppConfig.from_run_config(run_config)
        num_supernodes = len(list(grid.get_node_ids()))
        log(INFO, "The federation has %d SuperNodes connected", num_supernodes)
        if config.resume_from is not None:  # the run it continues has the say
            resumed = resume_run(run_config, config, num_supernodes)
            run_config, config = resumed.run_config, resumed.config
        check_server_device(config.server_device)
        check_federation(config, num_supernodes)
        run_ledger(config, grid, num_supernodes)  # DP's budget, before a new run's folder is made
        personalisation = config.personalisation
        log(INFO, "Personalisation '%s': %s", personalisation, PERSONALISATION_SAID[personalisation])

        evaluate_fn = None
        if config.central_evaluation:
            evaluate_fn = central_evaluation(load_test_set(config.data_source), config)
        else:
            log(INFO, "No central evaluation (central-evaluation=false): the best checkpoint follows "
                "the clients' scores of the global model on their validation rows")  # fmt: skip
        if (config.central_evaluation or config.dataset_path) and has_split(config.data_source, "train"):
            # A speed-up for a simulation: decoded and cut into partitions once, for every
            # ClientApp that holds one (those with their own data never read them).
            prepare_partitions(config.data_source, config.partitioning(num_supernodes))
        torch.manual_seed(config.seed)
        initial_arrays = ArrayRecord(task.Net().state_dict())
        outputs = RunOutputs.open(config, run_config, num_supernodes, initial_arrays, resumed)
        privacy = run_ledger(config, grid, num_supernodes, outputs)
        strategy = build_strategy(config, num_supernodes, privacy.clipping if privacy else None)
        gate = ReplyGate.for_run(config, initial_arrays)
        server_step = ServerStep(config, outputs.server_velocity)
        if not server_step.moves_all_the_way:
            log(INFO, "Server step: %s", server_step.description())
        rounds = RoundLoop(config, strategy, grid, outputs, gate, privacy, server_step)

        # Central evaluation overlaps the ClientApps' (rounds.py): one CPU thread keeps it
        # from fighting them for cores, at little cost on this small model.
        torch.set_num_threads(1)
        with outputs:
            rounds.run(
                outputs.arrays,
                client_config=client_settings(run_config, outputs.lineage),
                evaluate_fn=evaluate_fn,
                first_round=outputs.next_round,
            )
    except (ConfigError, RunFailed):
        # Re-raised, it marks the run failed with its one line as the reason, and Flower
        # logs it with its traceback: none, for the app's own refusals (this process
        # ends with the run), so the reason is the line above Flower's `Exit Code`.
        sys.tracebacklimit = 0
        raise
    finally:
        if resumed is not None:
            resumed.release()  # refused before its outputs took the folder: free again


def client_settings(run_config: dict, lineage: str) -> ConfigRecord:
    """What every train and evaluate message carries: the settings a ClientApp reads (a
    resumed run's may not be its run-config's) and the lineage it keys its kept heads by;
    none of the server's paths."""
    return ConfigRecord({**{key: run_config[key] for key in CLIENT_KEYS}, LINEAGE_KEY: lineage})


def central_evaluation(test_set: ImageSet, config: AppConfig):
    """Evaluate a global model on the test split, on `server-device`."""
    device = torch.device(config.server_device)
    net = task.Net()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        net.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = task.test(net, test_set, config.eval_batch_size, device)
        return MetricRecord({CENTRAL_ACCURACY: accuracy, CENTRAL_LOSS: loss})

    return evaluate
