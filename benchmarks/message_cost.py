"""What one ClientApp message costs the app, split, in a fresh process and a warm one.

    python -m benchmarks.message_cost [--partitions 50 2000] [--repeats 5] [--warm-calls 30]

A deployment SuperNode starts a fresh ClientApp process for every message; a
simulation actor handles message after message in one process. For both, and for train
and evaluate messages, this calls the app's own `train`/`evaluate` functions with the
message and context Flower would hand them, on the generated Fashion-MNIST-shaped set,
and splits the time by wrapping the app's steps from outside:

- interpreter and imports: process start (the kernel's record) to `import torch`, then
  to Flower and the app imported;
- setup: run-config, partition lookup, model with the client's head;
- first step: until the first optimizer step has returned (train only);
- arithmetic: the rest of `task.train` / `task.test`;
- rest: what the handler does besides (device, RNG, saving the head, the reply).

"app share" is setup plus rest: what the app does per message besides imports and the
training or evaluation itself. "start to first step" is from the process start to the
first optimizer step's return. `--optimizer torch` runs the
train messages with `torch.optim.SGD` in place of the app's `MomentumSGD`, to show what
the class optimizer's first step costs a fresh process.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def now() -> float:
    """Seconds on the boot clock, the clock the kernel's process start times use."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def process_started() -> float:
    """This process's start on the boot clock, from the kernel's record."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


def measure(kind: str, run_config: dict, num_partitions: int, calls: int, optimizer: str) -> list[dict]:
    """Time `calls` messages of `kind` in this process; the first one is cold."""
    marks = {"started": process_started(), "python": now()}
    import torch  # noqa: PLC0415 (timed: this is what a fresh process pays)

    marks["torch imported"] = now()
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: PLC0415
    from flwr.supercore.task_identity import TaskIdentity  # noqa: PLC0415

    from pytorch_example import client_app, task  # noqa: PLC0415

    marks["app imported"] = now()

    phases: dict[str, float] = {}

    inside: set[str] = set()  # phases being timed now: a nested call is not counted twice

    def timed(name, function):
        def wrapper(*args, **kwargs):
            if name in inside:
                return function(*args, **kwargs)
            started = now()
            phases.setdefault(f"{name} started", started)
            inside.add(name)
            try:
                return function(*args, **kwargs)
            finally:
                inside.discard(name)
                phases[name] = phases.get(name, 0.0) + now() - started

        return wrapper

    for name in ("local_partition", "global_model"):
        setattr(client_app, name, timed("setup", getattr(client_app, name)))
    client_app.AppConfig.from_run_config = timed("setup", client_app.AppConfig.from_run_config)
    # An evaluate message: one body pass over the validation rows, two head scores, a refit.
    for name in ("train", "test", "fit_head", "body_features", "score"):
        setattr(task, name, timed("arithmetic", getattr(task, name)))
    optimizer_class = torch.optim.SGD if optimizer == "torch" else task.MomentumSGD
    first_step: list[float] = []

    class TimedOptimizer(optimizer_class):
        def step(self, *args, **kwargs):
            result = super().step(*args, **kwargs)
            if not first_step and kind == "train":  # train messages only
                first_step.append(now())
            return result

    task.MomentumSGD = TimedOptimizer  # where `task.train` looks it up

    # What a SuperNode hands the ClientApp: a message from the ServerApp, and a context.
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        setattr(TaskIdentity, name, value)
    global_arrays = ArrayRecord(task.Net().state_dict())
    handler = client_app.train if kind == "train" else client_app.evaluate
    results = []
    for call in range(calls):
        partition_id = (call * 7919) % num_partitions
        context = Context(
            run_id=1,
            node_id=partition_id + 1,
            node_config={"partition-id": partition_id, "num-partitions": num_partitions},
            state=RecordDict(),
            run_config=run_config,
        )
        message = Message(
            content=RecordDict(
                {"arrays": global_arrays, "config": ConfigRecord({"server-round": 1, "lr": 0.1})}
            ),
            dst_node_id=partition_id + 1,
            message_type=kind,
        )
        phases.clear()
        first_step.clear()
        started = now()
        handler(message, context)
        total = now() - started
        row = {
            "setup": phases["setup"],
            "arithmetic": phases["arithmetic"],
            "rest": total - phases["setup"] - phases["arithmetic"],
            "total": total,
        }
        if first_step:
            # From the start of training to the first optimizer step's return: the
            # first batch's arithmetic, plus whatever the first step costs a process.
            row["first step"] = first_step[0] - phases["arithmetic started"]
            row["arithmetic"] -= row["first step"]
        if call == 0:
            row["import torch"] = marks["torch imported"] - marks["started"]
            row["import flower + app"] = marks["app imported"] - marks["torch imported"]
            if first_step:
                row["start to first step"] = first_step[0] - marks["started"]
        results.append(row)
    return results


def child_main(arguments: list[str]) -> None:
    kind, run_config_json, num_partitions, calls, optimizer = arguments
    rows = measure(kind, json.loads(run_config_json), int(num_partitions), int(calls), optimizer)
    print(json.dumps(rows))


def in_fresh_process(
    kind: str, run_config: dict, num_partitions: int, calls: int, optimizer: str
) -> list[dict]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.message_cost",
            "--child",
            kind,
            json.dumps(run_config),
            str(num_partitions),
            str(calls),
            optimizer,
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def median(rows: list[dict], key: str) -> float:
    values = sorted(row[key] for row in rows if key in row)
    return 1000 * values[len(values) // 2] if values else float("nan")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--partitions", type=int, nargs="+", default=[50, 2000])
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per case (default 5)")
    parser.add_argument(
        "--warm-calls", type=int, default=30, help="messages in the warm process (default 30)"
    )
    parser.add_argument("--optimizer", choices=["app", "torch"], default="app")
    args = parser.parse_args()

    from harness.flower_processes import default_run_config  # noqa: PLC0415
    from harness.synthetic_fmnist import write_idx_dataset  # noqa: PLC0415
    from pytorch_example.config import AppConfig  # noqa: PLC0415
    from pytorch_example.data import prepare_partitions  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="message-cost-") as tmp:
        work = Path(tmp)
        dataset = write_idx_dataset(work / "fmnist-idx", num_train=60_000, num_test=10_000)
        run_config = {
            **default_run_config(),
            # 2,000 partitions of 60,000 images need alpha >= 2 (see benchmarks/README.md).
            "dirichlet-alpha": 2.0,
            "dataset-path": str(dataset),
            "data-cache-dir": str(work / "cache"),
        }
        config = AppConfig.from_run_config(run_config)
        optimizer = "torch.optim.SGD" if args.optimizer == "torch" else "task.MomentumSGD"
        print(f"optimizer: {optimizer}; milliseconds, medians")
        header = (
            f"{'case':<34}{'import torch':>13}{'flower+app':>11}{'setup':>8}{'1st step':>9}"
            f"{'arith.':>9}{'rest':>7}{'app share':>10}{'start->1st step':>16}"
        )
        print(header)
        for num_partitions in args.partitions:
            prepare_partitions(config.data_source, config.partitioning(num_partitions))
            for kind in ("train", "evaluate"):
                cold = [
                    in_fresh_process(kind, run_config, num_partitions, 1, args.optimizer)[0]
                    for _ in range(args.repeats)
                ]
                warm = in_fresh_process(kind, run_config, num_partitions, args.warm_calls, args.optimizer)[1:]
                for label, rows in (("fresh process", cold), ("warm process", warm)):
                    share = [{"share": row["setup"] + row["rest"]} for row in rows]
                    print(
                        f"{f'{num_partitions} partitions, {kind}, {label}':<34}"
                        f"{median(rows, 'import torch'):>13.0f}{median(rows, 'import flower + app'):>11.0f}"
                        f"{median(rows, 'setup'):>8.1f}{median(rows, 'first step'):>9.1f}"
                        f"{median(rows, 'arithmetic'):>9.0f}{median(rows, 'rest'):>7.1f}"
                        f"{median(share, 'share'):>10.1f}{median(rows, 'start to first step'):>16.0f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
