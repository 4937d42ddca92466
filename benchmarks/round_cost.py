"""What a round costs: the app under `flwr run` against the bare arithmetic it does.

    python -m benchmarks.round_cost [--rounds 11] [--repeats 3] [--deployment-rounds 4]
        [--superexec-polls 1,0.1] [--set 'personalisation="stored-head"']

On a generated Fashion-MNIST-shaped set (60,000 train + 10,000 test images, IDX files
read through `dataset-path`, the path real data takes) it measures, on this machine:

- simulation: 50 SuperNodes, the default run-config (12 train and 25 evaluate
  clients a round, central evaluation on 10,000 images);
- deployment: 2 SuperNodes on loopback, each holding half of the data, every client
  training and evaluating every round.

For each it prints two compute floors (the same work as a plain PyTorch loop on tensors
already in memory, with the same parallelism and no Flower): the round without the
head refit (train, score the global and the own head, central evaluation) and with it,
timed in the same rounds; in simulation, just before and just after each app run, averaged.
Then the app's steady-state seconds per round (first round excluded: it starts workers
and fills the data cache), its ratio to each floor, and the peak memory of all
processes involved. For deployment it also prints how long each fresh ClientApp process
lives, watched from outside through /proc, once per SuperExec poll interval asked for.
"""

import argparse
import functools
import os
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.personalisation import run_config_pairs
from harness.flower_processes import LocalFederation, RoundLandings, copy_app, default_run_config
from harness.synthetic_fmnist import write_idx_dataset
from pytorch_example import task
from pytorch_example.config import STORED_HEAD, AppConfig
from pytorch_example.data import Partition, load_partition, load_test_set

# The simulation federation's per-ClientApp CPUs (pyproject.toml, local-simulation).
SIMULATION_CPUS_PER_CLIENT = 1


# --- The floor: the same arithmetic, plain PyTorch, no Flower -------------------------


def _worker_init() -> None:
    torch.set_num_threads(1)


def _client(job) -> tuple[AppConfig, int, Partition, task.Net]:
    """A floor job's settings and partition id, that partition's rows (from the warm
    cache), and the model the client was sent."""
    config, num_partitions, partition_id, state = job
    partition = load_partition(config.data_source, config.partitioning(num_partitions), partition_id)
    net = task.Net()
    net.load_state_dict(state)
    return config, partition_id, partition, net


def _floor_train(job) -> tuple[dict, int]:
    config, _, partition, net = _client(job)
    optimizer = torch.optim.SGD(net.parameters(), lr=config.learning_rate, momentum=config.momentum)
    inputs, labels = task.normalize(partition.train.images), partition.train.labels
    for _ in range(config.local_epochs):
        for batch in torch.randperm(len(labels)).split(config.batch_size):
            loss = F.cross_entropy(net(inputs[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.state_dict(), len(labels)


def _floor_evaluate(job) -> None:
    """One evaluating client without the refit: one body pass over its validation rows,
    scored by the global and by its own head (the same head here: the arithmetic is)."""
    config, _, partition, net = _client(job)
    features = task.body_features(net, partition.val.images, config.eval_batch_size, torch.device("cpu"))
    task.score(net.fc2, features, partition.val.labels)
    task.score(net.fc2, features, partition.val.labels)


def _floor_refit(job) -> None:
    """What the refit adds to an evaluating client: `task.fit_head`, as the app calls it."""
    config, partition_id, partition, net = _client(job)
    sgd = task.SGD(config.learning_rate, config.momentum, config.batch_size, torch.device("cpu"))
    generator = torch.Generator().manual_seed(partition_id)
    task.fit_head(net, partition.train, config.head_refit_rows, config.head_refit_epochs, sgd, generator)


def compute_floors(
    config: AppConfig,
    num_partitions: int,
    train_per_round: int,
    evaluate_per_round: int,
    workers: int,
    rounds: int,
) -> tuple[float, float]:
    """Seconds per round of the same training, evaluation and averaging without Flower,
    and the same with each evaluating client's head refit too (when `config` refits).

    Clients run on `workers` single-threaded processes, as the federation runs them;
    loading a partition from the warm cache is timed too (it is milliseconds). The refit
    is timed in the same rounds, as a pass of its own over the evaluating clients, so
    both floors see the machine at the same moments.
    """
    test_set = load_test_set(config.data_source)
    refits = config.personalisation != STORED_HEAD
    rng = np.random.default_rng(0)
    net = task.Net()
    bare, refit = [], []
    with ProcessPoolExecutor(workers, initializer=_worker_init) as pool:
        list(pool.map(_worker_init_probe, range(workers)))  # workers up before timing
        for _ in range(rounds):
            started = time.perf_counter()
            state = net.state_dict()
            train_ids = rng.choice(num_partitions, train_per_round, replace=False)
            replies = list(
                pool.map(_floor_train, [(config, num_partitions, int(p), state) for p in train_ids])
            )
            total = sum(count for _, count in replies)
            net.load_state_dict(
                {name: sum(s[name] * (count / total) for s, count in replies) for name in state}
            )
            evaluate_ids = rng.choice(num_partitions, evaluate_per_round, replace=False)
            evaluate_jobs = [(config, num_partitions, int(p), net.state_dict()) for p in evaluate_ids]
            list(pool.map(_floor_evaluate, evaluate_jobs))
            task.test(net, test_set, config.eval_batch_size, torch.device("cpu"))
            bare.append(time.perf_counter() - started)
            started = time.perf_counter()
            if refits:
                list(pool.map(_floor_refit, evaluate_jobs))
            refit.append(bare[-1] + time.perf_counter() - started)
    steady = slice(1, None) if rounds > 1 else slice(None)
    return float(np.mean(bare[steady])), float(np.mean(refit[steady]))


def _worker_init_probe(_: int) -> int:
    return os.getpid()


def floors_around(run, *shape, **named_shape) -> tuple[tuple[float, float], dict]:
    """`compute_floors` just before and just after `run()`, averaged (the machine's speed
    drifts by several percent over minutes), and what `run()` returned."""
    before = compute_floors(*shape, **named_shape)
    result = run()
    after = compute_floors(*shape, **named_shape)
    return ((before[0] + after[0]) / 2, (before[1] + after[1]) / 2), result


# --- The app: real `flwr run` -----------------------------------------------------------


class ProcessWatch:
    """Samples, from outside, the processes under given roots: the peak of their summed
    RSS, and how long each ClientApp process lived (start from the kernel's record,
    end when it was last seen, so within one sampling interval)."""

    SAMPLE_INTERVAL_S = 0.1

    def __init__(self, root_pids: list[int]) -> None:
        self.root_pids = root_pids
        self.peak_bytes = 0
        self.clientapps: dict[int, list[float]] = {}  # pid -> [started, last seen]
        self._commands: dict[tuple[int, int], bool] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        ticks = os.sysconf("SC_CLK_TCK")
        while not self._stop.wait(self.SAMPLE_INTERVAL_S):
            now = time.clock_gettime(time.CLOCK_BOOTTIME)
            children: dict[int, list[int]] = {}
            rss: dict[int, int] = {}
            started: dict[int, int] = {}
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    children.setdefault(int(fields[1]), []).append(int(entry.name))
                    started[int(entry.name)] = int(fields[19])
                    rss[int(entry.name)] = int((entry / "statm").read_text().split()[1]) * page
                except (OSError, ValueError, IndexError):
                    continue
            tree, todo = set(), list(self.root_pids)
            while todo:
                pid = todo.pop()
                if pid not in tree:
                    tree.add(pid)
                    todo.extend(children.get(pid, []))
            self.peak_bytes = max(self.peak_bytes, sum(rss.get(pid, 0) for pid in tree))
            for pid in tree:
                if self._is_clientapp(pid, started.get(pid, -1)):
                    self.clientapps.setdefault(pid, [started[pid] / ticks, now])[1] = now

    def _is_clientapp(self, pid: int, started: int) -> bool:
        key = (pid, started)
        if key not in self._commands:
            try:
                self._commands[key] = b"flwr-clientapp" in Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                self._commands[key] = False
        return self._commands[key]

    def stop(self) -> tuple[float, list[float]]:
        """Peak GiB, and each ClientApp process's lifetime in seconds."""
        self._stop.set()
        self._thread.join()
        return self.peak_bytes / 2**30, [end - start for start, end in self.clientapps.values()]


def run_app(
    root: Path, run_config: dict, node_configs, federation_config, superexec_poll_s: float = 0.1
) -> dict:
    """Run the app for `rounds` rounds; time each round as its results.json entry lands."""
    federation = LocalFederation(root, node_configs, superexec_poll_s)
    watch = ProcessWatch(federation.pids())
    landings = RoundLandings(Path(run_config["output-dir"]))
    try:
        started = time.perf_counter()
        log, record = federation.run(copy_app(root / "app"), run_config, federation_config)
        wall = time.perf_counter() - started
    finally:
        round_done = landings.stop()
        peak_gib, clientapp_lifetimes = watch.stop()
        federation.stop()
    if record["status"] != "finished:completed":
        raise RuntimeError(f"the run ended {record['status']}:\n{log[-3000:]}")
    times = [round_done[r] for r in sorted(round_done)]
    steady = np.diff(times) if len(times) > 1 else np.array([wall])
    return {
        "rounds": len(times),
        "first_round_s": times[0] - started if times else wall,
        "steady_s": float(np.mean(steady)),
        "wall_s": wall,
        "peak_gib": peak_gib,
        "clientapp_lifetimes_s": clientapp_lifetimes,
    }


def report(name: str, runs: list[tuple[float, float, dict]]) -> None:
    """Print one benchmark; with several repeats, medians and each repeat's ratios.
    A run is (floor without the refit, floor with it, the app's figures)."""
    bare = np.array([floor for floor, _, _ in runs])
    refit = np.array([floor for _, floor, _ in runs])
    apps = [app for _, _, app in runs]
    steady = np.array([app["steady_s"] for app in apps])
    print(f"\n== {name}" + (f" (median of {len(runs)} repeats)" if len(runs) > 1 else ""))
    print(f"floor without the refit {np.median(bare):7.2f} s/round")
    print(f"floor with the refit    {np.median(refit):7.2f} s/round")
    print(f"app (steady state)      {np.median(steady):7.2f} s/round   (rounds 2..{apps[0]['rounds']})")
    print(f"ratio app/floor without {np.median(steady / bare):7.2f}")
    print(f"ratio app/floor with    {np.median(steady / refit):7.2f}")
    if len(runs) > 1:
        for index, (run_bare, run_refit, app) in enumerate(zip(bare, refit, steady, strict=True), start=1):
            print(
                f"  repeat {index}: floors {run_bare:.2f} / {run_refit:.2f}, app {app:.2f},"
                f" ratios {app / run_bare:.2f} / {app / run_refit:.2f}"
            )
    print(
        f"first round             {np.median([a['first_round_s'] for a in apps]):7.2f} s"
        " (workers start, cache fills)"
    )
    print(f"whole flwr run          {np.median([a['wall_s'] for a in apps]):7.2f} s")
    print(f"peak memory, all procs  {max(a['peak_gib'] for a in apps):7.2f} GiB")
    lifetimes = np.array([s for a in apps for s in a["clientapp_lifetimes_s"]])
    if len(lifetimes) and name.startswith("deployment"):
        print(
            f"ClientApp process, start to exit {np.median(lifetimes):.2f} s median "
            f"({lifetimes.min():.2f}-{lifetimes.max():.2f}, {len(lifetimes)} processes)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=11, help="simulation rounds (default 11)")
    parser.add_argument("--repeats", type=int, default=3, help="simulation repeats (default 3)")
    parser.add_argument(
        "--deployment-rounds", type=int, default=4, help="deployment rounds (default 4; 0 skips)"
    )
    parser.add_argument(
        "--superexec-polls",
        default="0.1",
        help="deployment: FLWR_SUPEREXEC_TASK_POLL_INTERVAL values to run, comma-separated"
        " (default 0.1, what deploy/local_federation.py up sets; Flower's default is 1)",
    )
    parser.add_argument(
        "--set", default="", help='run-config pairs for every run, e.g. "personalisation="stored-head""'
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="keep files here (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="round-cost-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        dataset = write_idx_dataset(work / "fmnist-idx", num_train=60_000, num_test=10_000)
        cores = os.cpu_count() or 1
        print(f"machine: {cores} cores, torch {torch.__version__}, generated 60,000 + 10,000 images")

        base = {
            **default_run_config(),
            "dataset-path": str(dataset),
            "data-cache-dir": str(work / "cache"),
            "use-wandb": False,
            **run_config_pairs(args.set),
        }
        # The machine's noise moves single runs by several percent: repeat, take medians.
        simulation_runs = []
        for repeat in range(args.repeats):
            simulation_config = {
                **base,
                "num-server-rounds": args.rounds,
                "output-dir": str(work / f"out-sim-{repeat}"),
            }
            config = AppConfig.from_run_config(simulation_config)
            app_run = functools.partial(
                run_app,
                work / f"simulation-{repeat}",
                simulation_config,
                node_configs=None,
                federation_config={
                    "num-supernodes": 50,
                    "client-resources-num-cpus": SIMULATION_CPUS_PER_CLIENT,
                },
            )
            floors, app = floors_around(
                app_run,
                config,
                num_partitions=50,
                train_per_round=int(50 * config.fraction_train),
                evaluate_per_round=int(50 * config.fraction_evaluate),
                workers=max(1, cores // SIMULATION_CPUS_PER_CLIENT),
                rounds=args.rounds,
            )
            simulation_runs.append((*floors, app))
        if simulation_runs:
            report("simulation, 50 SuperNodes", simulation_runs)

        if args.deployment_rounds > 0:
            deployment_config = {
                **base,
                "num-server-rounds": args.deployment_rounds,
                "fraction-train": 1.0,
                "fraction-evaluate": 1.0,
            }
            nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
            config = AppConfig.from_run_config(deployment_config)
            floors = compute_floors(config, 2, 2, 2, workers=2, rounds=3)
            for poll in args.superexec_polls.split(","):
                run_config = {**deployment_config, "output-dir": str(work / f"out-deploy-{poll}")}
                app = run_app(work / f"deployment-{poll}", run_config, nodes, None, float(poll))
                report(f"deployment, 2 SuperNodes, SuperExec polling every {poll} s", [(*floors, app)])


if __name__ == "__main__":
    main()
