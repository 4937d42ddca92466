"""`flwr run . local-sim-gpu` measured: the runs the GPU machine does in one call, and
the same on a CPU machine as a rehearsal.

    python -m benchmarks.gpu --out DIR             # on a machine with a CUDA GPU
    python -m benchmarks.gpu --out DIR --cpu-only  # rehearsal: CUDA parts left out, sizes cut

On a generated Fashion-MNIST-shaped set (`--train-images` + 10,000 IDX images read
through `dataset-path`), with the default run-config otherwise:

1. `gpu`: `--supernodes` SuperNodes on the Simulation Engine with local-sim-gpu's
   resources (`--gpus-per-client` of a GPU and `--cpus-per-client` CPUs each),
   `server-device='cuda'`, `--rounds` rounds;
2. `cpu`: the same on the CPU federation (local-simulation's 1 CPU each, no GPU),
   `server-device='cpu'`: the ratio of 1 to 2 is the speed-up on this machine;
3. `gpu-large`: `--large-supernodes` SuperNodes, `--large-rounds` rounds, on the GPU
   (`dirichlet-alpha` 2.0, as benchmarks/scale.py, so every partition has rows).

Each run's seconds per round (steady state: rounds 2 on; and the first round), peak
host memory, GPU utilisation and memory (`nvidia-smi` every 0.5 s), and the last
round's central and own-model accuracy go to DIR/gpu.json and DIR/gpu.md.
"""

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from benchmarks.round_cost import run_app
from harness.flower_processes import default_run_config
from harness.synthetic_fmnist import write_idx_dataset

GPU_SAMPLE_MS = 500


@contextlib.contextmanager
def gpu_samples(enabled: bool, log_path: Path):
    """`nvidia-smi` sampled while the block runs; yields a list it fills at the end
    with (utilisation %, memory MiB) per sample."""
    samples: list[tuple[float, float]] = []
    if not enabled:
        yield samples
        return
    query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
    with open(log_path, "w") as log:
        sampler = subprocess.Popen([*query, "-lms", str(GPU_SAMPLE_MS)], stdout=log, stderr=subprocess.STDOUT)
    try:
        yield samples
    finally:
        sampler.terminate()
        sampler.wait(timeout=10)
        for line in log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                utilisation, memory = (float(value) for value in line.split(","))
                samples.append((utilisation, memory))


def last_round(output_dir: Path) -> dict:
    [results_file] = output_dir.glob("*/*/results.json")
    return json.loads(results_file.read_text())[-1]


def measure(name: str, work: Path, run_config: dict, federation: dict, sample_gpu: bool) -> dict:
    root = work / name
    root.mkdir()
    run_config = {**run_config, "output-dir": str(root / "outputs"), "data-cache-dir": str(work / "cache")}
    print(f"== {name}: {federation} server-device={run_config['server-device']}", flush=True)
    with gpu_samples(sample_gpu, root / "nvidia-smi.csv") as samples:
        measured = run_app(root, run_config, None, federation)
    final = last_round(root / "outputs")
    utilisation = [sample[0] for sample in samples]
    memory = [sample[1] for sample in samples]
    result = {
        "name": name,
        "federation": federation,
        "server_device": run_config["server-device"],
        "rounds": measured["rounds"],
        "steady_s_per_round": measured["steady_s"],
        "first_round_s": measured["first_round_s"],
        "wall_s": measured["wall_s"],
        "peak_host_gib": measured["peak_gib"],
        "gpu_utilisation_mean_pct": float(np.mean(utilisation)) if utilisation else None,
        "gpu_utilisation_max_pct": max(utilisation) if utilisation else None,
        "gpu_memory_max_mib": max(memory) if memory else None,
        "central_accuracy": final["evaluate_metrics_serverapp"].get("accuracy"),
        "own_model_accuracy": final["evaluate_metrics_clientapp"].get("eval_acc"),
    }
    print(json.dumps(result), flush=True)
    return result


def markdown(machine: dict, results: list[dict], speedup: float | None) -> str:
    def cell(value, form: str) -> str:
        return "-" if value is None else format(value, form)

    lines = [
        f"Measured {machine['date']} on {machine['gpu']}, {machine['cpus']} CPUs, torch {machine['torch']}.",
        "",
        "| run | federation | s/round (steady) | first round | GPU util. mean / max | GPU memory max "
        "| peak host memory | central acc. | own-model acc. |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        lines.append(
            f"| {result['name']} | {result['federation']} | {result['steady_s_per_round']:.2f} "
            f"| {result['first_round_s']:.1f} s "
            f"| {cell(result['gpu_utilisation_mean_pct'], '.0f')} / "
            f"{cell(result['gpu_utilisation_max_pct'], '.0f')} % "
            f"| {cell(result['gpu_memory_max_mib'], '.0f')} MiB | {result['peak_host_gib']:.1f} GiB "
            f"| {cell(result['central_accuracy'], '.4f')} | {cell(result['own_model_accuracy'], '.4f')} |"
        )
    if speedup is not None:
        lines += ["", f"Speed-up of `gpu` over `cpu` on this machine: {speedup:.2f}x (steady s/round)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu.json and gpu.md")
    parser.add_argument("--cpu-only", action="store_true", help="rehearse without CUDA, at small sizes")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--supernodes", type=int, default=50)
    parser.add_argument("--gpus-per-client", type=float, default=0.25)
    parser.add_argument("--cpus-per-client", type=int, default=2)
    parser.add_argument("--large-supernodes", type=int, default=500)
    parser.add_argument("--large-rounds", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=60_000)
    args = parser.parse_args()
    if args.cpu_only:
        args.gpus_per_client = 0.0
    elif not torch.cuda.is_available():
        raise SystemExit("torch sees no CUDA device: run with --cpu-only, or on the GPU machine")
    gpu_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    machine = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "gpu": gpu_name,
        "cpus": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "nvidia_smi": shutil.which("nvidia-smi") is not None,
    }
    print(json.dumps(machine), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    server_device = "cpu" if args.cpu_only else "cuda"
    sample_gpu = not args.cpu_only and machine["nvidia_smi"]
    with tempfile.TemporaryDirectory(prefix="gpu-benchmark-") as tmp:
        work = Path(tmp)
        started = time.monotonic()
        dataset = write_idx_dataset(work / "fmnist-idx", args.train_images, 10_000, noise=200.0)
        base = {
            **default_run_config(),
            "dataset-path": str(dataset),
            "use-wandb": False,
            "num-server-rounds": args.rounds,
        }
        gpu_federation = {
            "num-supernodes": args.supernodes,
            "client-resources-num-cpus": args.cpus_per_client,
            "client-resources-num-gpus": args.gpus_per_client,
        }
        cpu_federation = {"num-supernodes": args.supernodes, "client-resources-num-cpus": 1}
        large_federation = {**gpu_federation, "num-supernodes": args.large_supernodes}
        results = [
            measure("gpu", work, {**base, "server-device": server_device}, gpu_federation, sample_gpu),
            measure("cpu", work, {**base, "server-device": "cpu"}, cpu_federation, sample_gpu),
            measure(
                "gpu-large",
                work,
                {
                    **base,
                    "server-device": server_device,
                    "num-server-rounds": args.large_rounds,
                    "dirichlet-alpha": 2.0,
                },
                large_federation,
                sample_gpu,
            ),
        ]
        machine["total_s"] = time.monotonic() - started
    speedup = None if args.cpu_only else results[1]["steady_s_per_round"] / results[0]["steady_s_per_round"]
    (args.out / "gpu.json").write_text(
        json.dumps({"machine": machine, "results": results, "speedup": speedup}, indent=2)
    )
    (args.out / "gpu.md").write_text(markdown(machine, results, speedup))
    print((args.out / "gpu.md").read_text())


if __name__ == "__main__":
    main()
