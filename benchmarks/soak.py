"""A bad night for a federation: this app on the Deployment Engine across network hosts,
while a seeded driver kills, pauses and cuts off its machines. Does it lose anything?

    sudo python -m benchmarks.soak [--seed 0] [--rounds 40] [--nodes 4] [--keep DIR] [--quick]

Needs root, iproute2, nginx and ssh-keygen (as the several-machines test). One network
host (harness/netns.py) runs the SuperLink, brought up as deploy/README.md says
(`up --nodes 0 --host 0.0.0.0 --port 9092 --local-port 9093 --san <address>`: TLS,
registered SuperNodes, nginx in front); each SuperNode runs on a host of its own with
its own key, `ca.pem` and head folder, and holds partition i of `--num-partitions`.

First the run goes uninterrupted (the same federation, seed and settings: every
SuperNode trains and evaluates every round, DP on); then again while the driver:
- SIGKILLs a SuperNode (sometimes two in one round) and restarts it with the same node
  config after a random delay;
- SIGKILLs the SuperLink's side (SuperLink, ServerApp, nginx) mid-round, restarts a
  SuperNode while it is down, runs `up` again with the same options and resumes the run
  with README's `resume-from` command;
- SIGSTOPs a SuperNode past Flower's heartbeat, then SIGCONTs it;
- takes a SuperNode's host off the network (`ip link set ... down`), then back.
It goes on until the run completes, then checks what must hold, prints the faults and
their cost, and exits 1 if a check failed or too few faults of a kind were injected.
"""

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from harness import netns
from harness.deployment import Deployment
from harness.flower_processes import (
    VENV_BIN,
    RoundLandings,
    copy_app,
    default_run_config,
    descendants,
    pairs,
    started_run_id,
    terminate,
    trained_rounds,
)
from harness.synthetic_fmnist import write_idx_dataset
from pytorch_example import task
from pytorch_example.config import PARTITION_PATH_KEYS, AppConfig
from pytorch_example.data import load_test_set
from pytorch_example.privacy import PrivacyLedger

PUBLIC_PORT, LOCAL_PORT = 9092, 9093
# Flower's SuperNode heartbeat: every 30 s, and the SuperLink waits 2 of them.
PAUSE_S = (130, 180)
NETWORK_DOWN_S = (60, 120)
RESTART_AFTER_S = (2, 40)
BETWEEN_FAULTS_S = (15, 60)
# At least these, before the driver draws freely (and the soak fails with fewer).
REQUIRED = {"node killed": 10, "SuperLink killed": 1, "node paused": 1, "network down": 1}
RUN_TIMEOUT_S = 4 * 3600


@dataclass
class Fault:
    kind: str
    start: float  # time.perf_counter()
    end: float = 0.0  # when the driver undid it (restarted, resumed, SIGCONT, link up)
    detail: str = ""
    round_at_start: int = 0


@dataclass
class Node:
    index: int
    namespace: str
    machine: Path
    process: subprocess.Popen | None = None
    # Each start's log, and the rounds landed in the chaos run before it (None: first start).
    starts: list[tuple[Path, int | None]] = field(default_factory=list)


class Federation:
    """The SuperLink's host and the SuperNodes' hosts, and every process started on them."""

    def __init__(self, work: Path, network: dict, num_nodes: int, num_partitions: int) -> None:
        superlink_namespace, self.superlink_address = network["superlink"]
        self.deployment = Deployment(work / "superlink-host", namespace=superlink_namespace)
        self.up_options = (
            "--nodes", "0", "--host", "0.0.0.0", "--port", str(PUBLIC_PORT),
            "--local-port", str(LOCAL_PORT), "--san", self.superlink_address,
        )  # fmt: skip
        self.num_partitions = num_partitions
        self.nodes = [Node(i, network[f"node-{i}"][0], work / f"node-{i}") for i in range(num_nodes)]
        self.seen: set[tuple[int, float]] = set()  # (PID, start time) of each process started here
        self.runs: list[subprocess.Popen] = []  # `flwr run`s
        self.exits: dict[str, int] = {}  # the log of each SuperNode that ended on its own: its exit code

    def up(self) -> None:
        self.deployment.up(*self.up_options)
        for node in self.nodes:
            self.deployment.enrol(node.machine, f"node-{node.index}")
            self.start_node(node, None)
        self.deployment.wait_until_connected(len(self.nodes))

    def start_node(self, node: Node, rounds_landed: int | None) -> None:
        name = f"node-{node.index}-start-{len(node.starts)}"
        node.process = self.deployment.start_stranger(
            name,
            "--root-certificates", str(node.machine / "ca.pem"),
            "--auth-supernode-private-key", str(node.machine / "supernode-key"),
            superlink=f"{self.superlink_address}:{PUBLIC_PORT}",
            node_config=pairs(
                {
                    "partition-id": node.index,
                    "num-partitions": self.num_partitions,
                    "head-dir": str(node.machine / "heads"),
                }
            ),
            namespace=node.namespace,
            supervised=True,
            # As `up` starts its own: a share of the cores, SuperExec polling every 0.1 s.
            env={
                "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(self.nodes))),
                "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
            },
        )  # fmt: skip
        node.starts.append((self.deployment.root / f"{name}.log", rounds_landed))

    def node_pids(self, node: Node) -> list[int]:
        return descendants([node.process.pid]) if node.process and node.process.poll() is None else []

    def kill_node(self, node: Node) -> None:
        self.note_exit(node)
        # Stopped first, so that supernode.py starts nothing new while its tree is killed.
        with contextlib.suppress(ProcessLookupError):
            os.kill(node.process.pid, signal.SIGSTOP)
        self.signal_node(node, signal.SIGKILL)
        node.process.wait()

    def note_exit(self, node: Node) -> None:
        """Note it if SuperNode `node` ended on its own (not by the driver's hand)."""
        if node.process is not None and node.process.poll() is not None:
            self.exits[node.starts[-1][0].name] = node.process.returncode

    def signal_node(self, node: Node, signum: int) -> None:
        for pid in self.node_pids(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def flwr_run(self, app_dir: Path, run_config: dict, log: Path) -> subprocess.Popen:
        """`flwr run . local-deployment --stream --run-config ...`, on the SuperLink's host."""
        command = [str(VENV_BIN / "flwr"), "run", ".", "local-deployment", "--stream", "--run-config"]
        with open(log, "ab") as output:
            run = subprocess.Popen(
                self.deployment.on_host([*command, pairs(run_config)]),
                cwd=app_dir,
                env=self.deployment.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.runs.append(run)
        return run

    def note_processes(self) -> None:
        """Remember every process running here now, to find any left at the end."""
        roots = [p.pid for p in [*self.deployment.strangers, *self.runs] if p.poll() is None]
        if (self.deployment.folder / "federation.json").exists():
            roots += [record["pid"] for record in self.deployment.state()["processes"]]
        for pid in descendants(roots):
            with contextlib.suppress(psutil.NoSuchProcess):
                self.seen.add((pid, psutil.Process(pid).create_time()))

    def close(self) -> None:
        """Undo every fault left standing, then stop everything started here."""
        try:
            for node in self.nodes:
                self.note_exit(node)
                with contextlib.suppress(subprocess.CalledProcessError):
                    netns.set_network(node.namespace, up=True)
                self.signal_node(node, signal.SIGCONT)
            for run in self.runs:
                terminate(run)
            self.note_processes()
        finally:
            self.deployment.close()

    def left_running(self) -> list[str]:
        left = []
        for pid, started in self.seen:
            with contextlib.suppress(psutil.NoSuchProcess):
                process = psutil.Process(pid)
                if process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{pid} {' '.join(process.cmdline())[:120]}")
        return left


class Watch(RoundLandings):
    """The rounds as they land (looked for every 0.2 s), and, every 2 s, the processes
    running."""

    def __init__(self, output_dir: Path, federation: Federation) -> None:
        self.federation = federation
        self.last_noted = 0.0
        super().__init__(output_dir, every_s=0.2)

    def look(self) -> None:
        super().look()
        if time.perf_counter() - self.last_noted > 2:
            # Processes come and go as it looks: what it misses now, it sees next time.
            with contextlib.suppress(OSError, ValueError, psutil.Error):
                self.federation.note_processes()
            self.last_noted = time.perf_counter()

    @property
    def rounds(self) -> int:
        return len(self.landed)

    def run_dir(self) -> Path:
        [results_file] = self.output_dir.glob("*/*/results.json")
        return results_file.parent


class Chaos:
    """The seeded fault driver, in its own thread, until `stop()`."""

    def __init__(self, federation: Federation, watch: Watch, rng: random.Random, resume, quick: bool) -> None:
        self.federation, self.watch, self.rng, self.resume = federation, watch, rng, resume
        self.quick = quick
        self.faults: list[Fault] = []
        self.errors: list[str] = []
        self.superlink_down = threading.Event()  # from its kill until the run is resumed
        self.lock = threading.Lock()  # held to set or clear it, and to read it with the run's state
        # Per SuperLink kill: the DP releases made since the last recorded round (1 if the
        # killed round had released), and the rounds recorded then.
        self.extra_releases: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drive, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for fault in self.faults:  # one the driver was still holding
            fault.end = fault.end or time.perf_counter()

    def _sleep(self, low_high: tuple[float, float]) -> bool:
        """Sleep a random while in `low_high`; False if asked to stop meanwhile."""
        return not self._stop.wait(self.rng.uniform(*low_high))

    def _plan(self) -> list[str]:
        """The required faults in a seeded order, the SuperLink's kills a third and two thirds in."""
        if self.quick:  # each kind once, the SuperLink's kill first
            return ["SuperLink killed", "two nodes killed", "node paused", "network down", "node killed"]
        plan = ["node killed"] * 6 + ["two nodes killed"] * 2 + ["node paused", "network down"]
        self.rng.shuffle(plan)
        plan.insert(len(plan) * 2 // 3, "SuperLink killed")
        plan.insert(len(plan) // 3, "SuperLink killed")
        return plan

    def _drive(self) -> None:
        plan = self._plan()
        try:
            while self._sleep(BETWEEN_FAULTS_S):
                kind = (
                    plan.pop(0)
                    if plan
                    else self.rng.choice(
                        ["node killed", "node killed", "two nodes killed", "node paused", "network down"]
                    )
                )
                {
                    "node killed": lambda: self._kill_nodes(1),
                    "two nodes killed": lambda: self._kill_nodes(2),
                    "node paused": self._pause,
                    "network down": self._network_down,
                    "SuperLink killed": self._kill_superlink,
                }[kind]()
        except Exception as err:  # noqa: BLE001 (reported, and fails the soak)
            self.errors.append(f"the chaos driver stopped: {err!r}")

    def _fault(self, kind: str, detail: str) -> Fault:
        fault = Fault(kind, time.perf_counter(), detail=detail, round_at_start=self.watch.rounds)
        self.faults.append(fault)
        print(f"  {time.strftime('%H:%M:%S')} round {fault.round_at_start + 1}: {kind}, {detail}", flush=True)
        return fault

    def _kill_nodes(self, count: int) -> None:
        victims = self.rng.sample(self.federation.nodes, count)
        faults = []
        for node in victims:
            self.federation.kill_node(node)
            faults.append(self._fault("node killed", f"node {node.index}"))
        self._stop.wait(self.rng.uniform(*RESTART_AFTER_S))
        for node, fault in zip(victims, faults, strict=True):
            self.federation.start_node(node, self.watch.rounds)
            fault.end = time.perf_counter()

    def _pause(self) -> None:
        node = self.rng.choice(self.federation.nodes)
        fault = self._fault("node paused", f"node {node.index} SIGSTOPped")
        self.federation.signal_node(node, signal.SIGSTOP)
        self._stop.wait(self.rng.uniform(*PAUSE_S))
        self.federation.signal_node(node, signal.SIGCONT)
        fault.end = time.perf_counter()

    def _network_down(self) -> None:
        node = self.rng.choice(self.federation.nodes)
        fault = self._fault("network down", f"node {node.index}'s host")
        netns.set_network(node.namespace, up=False)
        self._stop.wait(self.rng.uniform(*NETWORK_DOWN_S))
        netns.set_network(node.namespace, up=True)
        fault.end = time.perf_counter()

    def _kill_superlink(self) -> None:
        """Mid-round: the SuperLink's machine dies; a SuperNode restarts meanwhile; the
        operator runs `up` again and resumes the run as README says."""
        rounds = self.watch.rounds
        while self.watch.rounds <= rounds:  # a round has just begun
            if self._stop.wait(0.2):
                return
        if self._stop.wait(self.rng.uniform(2, 10)):
            return
        with self.lock:
            self.superlink_down.set()
        fault = self._fault("SuperLink killed", "SuperLink, ServerApp and nginx SIGKILLed")
        # From here on to the resume, whatever happens: the federation must come back.
        self.federation.deployment.crash()
        node = self.rng.choice(self.federation.nodes)
        self.federation.kill_node(node)
        # Whether the killed round had released its noisy model (DP): then that release
        # is a real one, and the resumed run counts it on top of its rounds.
        saved = torch.load(self.watch.run_dir() / "resume.pt", weights_only=True)
        recorded = saved["round_results"]
        released_before = recorded[-1]["privacy"]["releases"] if recorded else 0
        self.extra_releases.append((saved["privacy_releases"] - released_before, len(recorded)))
        time.sleep(self.rng.uniform(5, 15))
        self.federation.start_node(node, self.watch.rounds)
        print(
            f"  {time.strftime('%H:%M:%S')} node {node.index} restarted while the SuperLink is down",
            flush=True,
        )
        time.sleep(self.rng.uniform(10, 30))
        self.federation.deployment.up(*self.federation.up_options)
        # As deploy/README.md says: resume once `status` shows the SuperNodes connected
        # (the resumed run sizes its rounds, and DP its noise, to those connected then).
        try:
            self.federation.deployment.wait_until_connected(len(self.federation.nodes), timeout_s=180)
        except AssertionError as err:
            fault.detail += f"; resumed with fewer SuperNodes: {str(err)[:200]}"
        with self.lock:
            self.resume(self.watch.run_dir())
            self.superlink_down.clear()
        fault.end = time.perf_counter()


def run_config(args: argparse.Namespace, dataset: Path, work: Path, name: str) -> dict:
    return {
        **default_run_config(),
        "num-server-rounds": args.rounds,
        "fraction-train": 1.0,
        "fraction-evaluate": 1.0,
        "seed": args.seed,
        "dp-noise-multiplier": args.dp_noise_multiplier,
        "dp-clipping-norm": args.dp_clipping_norm,
        "dataset-path": str(dataset),
        "data-cache-dir": str(work / "cache"),
        "output-dir": str(work / name),
        "use-wandb": False,
    }


def run_once(
    federation: Federation, app_dir: Path, config: dict, work: Path, name: str, rng=None, quick=False
):
    """The run to completion, under chaos when `rng` is given. Returns the watch, the chaos
    driver (or None), the status of its last run (`flwr ls`) and the seconds it all took."""
    watch = Watch(Path(config["output-dir"]), federation)
    runs: list[subprocess.Popen] = []
    logs: list[Path] = []

    def submit(run_config: dict) -> None:
        logs.append(work / f"{name}-flwr-run-{len(runs)}.log")
        runs.append(federation.flwr_run(app_dir, run_config, logs[-1]))

    def resume(run_dir: Path) -> None:
        # README's command, as written: `resume-from` and where the data lies; the rest
        # is the folder's.
        submit({"resume-from": str(run_dir), **{key: config[key] for key in PARTITION_PATH_KEYS}})

    chaos = Chaos(federation, watch, rng, resume, quick) if rng else None
    started = time.perf_counter()
    submit(config)
    try:
        if chaos:
            chaos.start()
        while time.perf_counter() - started < RUN_TIMEOUT_S:
            time.sleep(1)
            if chaos and chaos.errors:
                break
            # A `flwr run --stream` ends with its SuperLink too: only the newest one counts,
            # once the SuperLink is back.
            with chaos.lock if chaos else contextlib.nullcontext():
                if not (chaos and chaos.superlink_down.is_set()) and runs[-1].poll() is not None:
                    break
    finally:
        if chaos:
            chaos.stop()
        watch.stop()
    seconds = time.perf_counter() - started
    run_id = started_run_id(logs[-1].read_text())
    listing = federation.deployment.flwr("ls", "local-deployment", "--format", "json", timeout=60)
    [run] = [run for run in json.loads(listing.stdout)["runs"] if run["run-id"] == run_id]
    return watch, chaos, run["status"], seconds


# -- What must hold, and what it cost ---------------------------------------------------


def check(name: str, problems: list[str], checks: list[tuple[str, list[str]]]) -> None:
    checks.append((name, problems))


def round_seconds(watch: Watch, started: float) -> dict[int, tuple[float, float]]:
    """Each round's (start, end): from the previous round's landing (the run's start)."""
    spans, previous = {}, started
    for server_round in sorted(watch.landed):
        spans[server_round] = (previous, watch.landed[server_round])
        previous = watch.landed[server_round]
    return spans


def fault_costs(spans: dict, faults: list[Fault], clean_round_s: float) -> dict[str, float]:
    """Seconds over a clean round, of the rounds each fault overlapped, per kind; a round
    that several faults overlap shares its extra among them."""
    costs = {kind: 0.0 for kind in dict.fromkeys(fault.kind for fault in faults)}
    for server_round, (start, end) in spans.items():
        if server_round == 1:
            continue  # it holds the run's start-up, which the clean round leaves out
        touching = [fault for fault in faults if fault.start < end and (fault.end or end) > start]
        for fault in touching:
            costs[fault.kind] += max(0.0, (end - start) - clean_round_s) / len(touching)
    return costs


def head_problems(federation: Federation) -> tuple[list[str], int]:
    """Each SuperNode restarted after round 1 must have restored its own head from its
    head-dir by the first message its ClientApp served: one it sent a reply to, that
    Flower did not fail (as it does a message in hand when its SuperNode is paused past
    its heartbeat). A start killed before any reply is not judged. Returns the problems
    and how many restored theirs."""
    problems, restored = [], 0
    for node in federation.nodes:
        for log, rounds_landed in node.starts:
            if not rounds_landed:
                continue  # its first start, or before any head was saved
            text = log.read_text(errors="replace")
            messages = text.split("Receiving: ")[1:]
            replied = [i for i, message in enumerate(messages) if "Sent successfully" in message]
            served = next((i for i in replied if "ERROR" not in messages[i]), None)
            if served is None:
                continue
            if "Restored this client's head" in "".join(messages[: served + 1]):
                restored += 1
            else:
                problems.append(f"{log.name} served the run without restoring its head first")
    return problems, restored


def privacy_problems(
    results: list[dict], config: AppConfig, nodes: int, kills: list[tuple[int, int]]
) -> list[str]:
    """Each round's DP releases are the rounds that trained so far, plus each killed round
    that had released before its kill; its epsilon is the accountant's for that count."""
    problems, expected = [], 0
    for entry in results:
        expected += sum(extra for extra, recorded in kills if recorded == entry["round"] - 1)
        expected += 1 if entry.get("train_metrics_clientapp") else 0
        privacy = entry.get("privacy") or {}
        if privacy.get("releases") != expected:
            problems.append(
                f"round {entry['round']} counts {privacy.get('releases')} releases, not {expected}"
            )
            continue
        # A deployment without dp-population: no round's sampling is credited.
        epsilon = PrivacyLedger(config, None, config.train_sample_size(nodes), expected).spent()["epsilon"]
        if abs(privacy["epsilon"] - epsilon) > 1e-9 * max(1.0, epsilon):
            problems.append(
                f"round {entry['round']}: epsilon {privacy['epsilon']} is not the accountant's {epsilon}"
            )
    return problems


def checkpoint_problems(results: list[dict], run_dir: Path, config: AppConfig) -> list[str]:
    """The last best checkpoint is the round of the best central accuracy, and scores it."""
    accuracies = {
        entry["round"]: entry["evaluate_metrics_serverapp"].get("accuracy", -1.0) for entry in results
    }
    best_round = max(accuracies, key=lambda server_round: (accuracies[server_round], -server_round))
    name = f"best_model_round_{best_round}_acc_{accuracies[best_round]:.4f}.pt"
    saved = sorted(run_dir.glob("best_model_round_*.pt"), key=lambda path: int(path.name.split("_")[3]))
    if not saved or saved[-1].name != name:
        return [f"the last best checkpoint is {saved[-1].name if saved else None}, not {name}"]
    net = task.Net()
    net.load_state_dict(torch.load(saved[-1], weights_only=True))
    _, accuracy = task.test(
        net, load_test_set(config.data_source), config.eval_batch_size, torch.device("cpu")
    )
    if abs(accuracy - accuracies[best_round]) > 1e-6:
        return [f"{name} scores {accuracy:.6f} on the test set"]
    return []


def namespaces_left(prefix: str) -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.startswith(prefix)]


def summary(label: str, watch: Watch, seconds: float) -> str:
    results = [watch.entries[r] for r in sorted(watch.entries)]
    central = results[-1]["evaluate_metrics_serverapp"].get("accuracy") if results else None
    own = results[-1]["evaluate_metrics_clientapp"].get("eval_acc") if results else None
    epsilon = (results[-1].get("privacy") or {}).get("epsilon") if results else None
    if not results:
        return f"{label}: no round landed"
    return (
        f"{label}: {len(results)} rounds in {seconds / 60:.1f} min ({seconds / len(results):.1f} s a round); "
        f"final central accuracy {central:.4f}, own-model {own:.4f}, epsilon {epsilon:.2f}"
    )


def report(base_watch, base_s, watch, soak_s, chaos, chaos_started, results, lost) -> None:
    """The faults, what each kind cost, the replies and the two runs, as Markdown tables."""
    base_spans = round_seconds(base_watch, 0.0)
    clean_round_s = statistics.median(end - start for r, (start, end) in base_spans.items() if r > 1)
    costs = fault_costs(round_seconds(watch, chaos_started), chaos.faults, clean_round_s)
    print("\nFaults: each kind's count, how long the driver held it, and what the rounds it overlapped")
    print(f"took beyond a clean round ({clean_round_s:.1f} s, the uninterrupted run's median):\n")
    print("| fault | count | held, s (mean) | cost, s each | cost, s in all |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind, cost in costs.items():
        faults = [fault for fault in chaos.faults if fault.kind == kind]
        held = statistics.mean((fault.end or fault.start) - fault.start for fault in faults)
        print(f"| {kind} | {len(faults)} | {held:.0f} | {cost / len(faults):.0f} | {cost:.0f} |")
    print("\n| replies | sent | received | failed | left out by the gate |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for phase in ("train", "evaluate"):
        counts = [
            sum(entry["replies"][phase][key] for entry in results)
            for key in ("expected", "received", "failed", "dropped")
        ]
        print(f"| {phase} | " + " | ".join(str(count) for count in counts) + " |")
    print(f"\nRounds lost: {lost}; run twice: {len(watch.repeated)}")
    print(summary("Uninterrupted", base_watch, base_s))
    print(summary("Under faults ", watch, soak_s))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0, help="the faults' and the run's (run-config seed)")
    parser.add_argument("--rounds", type=int, help="num-server-rounds (default 40; 8 with --quick)")
    parser.add_argument(
        "--quick", action="store_true", help="a trial: each kind of fault once, no minimum count or length"
    )
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument(
        "--num-partitions", type=int, default=20, help="SuperNode i holds partition i of these"
    )
    parser.add_argument("--dp-noise-multiplier", type=float, default=0.01)
    parser.add_argument("--dp-clipping-norm", type=float, default=1.0)
    parser.add_argument("--keep", type=Path, help="work in this folder (new) and keep it: logs, run folders")
    args = parser.parse_args()
    # Stopped (Ctrl-C, or SIGTERM), it still undoes its faults and stops what it started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.rounds = args.rounds or (8 if args.quick else 40)
    if not netns.available() or not shutil.which("ssh-keygen"):
        raise SystemExit("soak: needs root, iproute2 and ssh-keygen (network hosts, SuperNode keys)")
    if args.nodes * 2 > args.num_partitions + args.nodes or args.nodes < 2:
        raise SystemExit("soak: use --nodes 2 or more, and no more than --num-partitions")

    with contextlib.ExitStack() as stack:
        if args.keep:
            args.keep.mkdir(parents=True)
            work = args.keep.resolve()
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        ok = soak(args, work)
    raise SystemExit(0 if ok else 1)


def soak(args: argparse.Namespace, work: Path) -> bool:
    dataset = write_idx_dataset(work / "fmnist-idx", 60_000, 10_000, noise=200.0)
    app_dir = copy_app(work / "app")
    checks: list[tuple[str, list[str]]] = []
    prefix = f"pe{os.getpid() % 100000}"  # harness/netns.py's
    hosts = ["superlink", *(f"node-{index}" for index in range(args.nodes))]
    with netns.hosts(hosts, subnet="10.78.0") as network:
        federation = Federation(work, network, args.nodes, args.num_partitions)
        close_problem = []
        try:
            federation.up()
            print(
                f"Federation up: SuperLink host {federation.superlink_address}, {args.nodes} SuperNode hosts",
                flush=True,
            )
            plain = run_config(args, dataset, work, "uninterrupted")
            print(f"Uninterrupted run, {args.rounds} rounds ...", flush=True)
            base_watch, _, base_status, base_s = run_once(federation, app_dir, plain, work, "uninterrupted")
            print(summary("  uninterrupted", base_watch, base_s), flush=True)
            check(
                "the uninterrupted run completed",
                [] if base_status == "finished:completed" else [base_status],
                checks,
            )

            soaked = run_config(args, dataset, work, "soaked")
            print(f"The same run under faults (seed {args.seed}) ...", flush=True)
            chaos_started = time.perf_counter()
            watch, chaos, status, soak_s = run_once(
                federation, app_dir, soaked, work, "soaked", random.Random(args.seed), args.quick
            )
        finally:
            try:
                federation.close()
            except AssertionError as err:
                close_problem = [str(err)]
    check("`down` left nothing running", close_problem, checks)
    check("no process left", federation.left_running(), checks)
    check("no network namespace left", namespaces_left(prefix), checks)
    check("the chaos driver ran to the end", chaos.errors, checks)
    exits = [f"{log} exited with code {code}" for log, code in federation.exits.items()]
    check("no SuperNode ended but by the driver's hand", exits, checks)
    check("the run under faults completed", [] if status == "finished:completed" else [status], checks)

    config = AppConfig.from_run_config(soaked)
    results = [watch.entries[r] for r in sorted(watch.entries)]
    rounds = [entry["round"] for entry in results]
    lost = sorted(set(range(1, args.rounds + 1)) - set(rounds))
    check("every round from 1 to N once in results.json", [f"lost: {lost}"] * bool(lost) +
          [f"repeated: {sorted(watch.repeated)}"] * bool(watch.repeated), checks)  # fmt: skip
    saved = trained_rounds(watch.run_dir() / "results.json")
    check(
        "results.json as it landed",
        [] if saved == results else ["it differs from the rounds as they landed"],
        checks,
    )
    check("each round's learning rate is the schedule's", [
        f"round {entry['round']}: {entry['learning_rate']}" for entry in results
        if abs(entry["learning_rate"] - config.learning_rate_at(entry["round"])) > 1e-12
    ], checks)  # fmt: skip
    check(
        "the best checkpoint is results.json's best round, and scores it",
        checkpoint_problems(results, watch.run_dir(), config),
        checks,
    )
    heads, restored = head_problems(federation)
    check(f"each restarted client went on with its own head ({restored} restored)", heads, checks)
    check(
        "each DP release counted once",
        privacy_problems(results, config, args.nodes, chaos.extra_releases),
        checks,
    )
    counts = {kind: sum(fault.kind == kind for fault in chaos.faults) for kind in REQUIRED}
    if not args.quick:
        check("at least " + ", ".join(f"{n} {kind}" for kind, n in REQUIRED.items()) + " in 30 min or more",
              [f"{counts[kind]} {kind}" for kind, n in REQUIRED.items() if counts[kind] < n] +
              [f"{soak_s / 60:.1f} min"] * (soak_s < 1800), checks)  # fmt: skip

    report(base_watch, base_s, watch, soak_s, chaos, chaos_started, results, len(lost))
    print("\nChecks:")
    for name, problems in checks:
        print(
            f"  {'ok  ' if not problems else 'FAIL'} {name}"
            + "".join(f"\n         {p}" for p in problems[:10])
        )
    return not any(problems for _, problems in checks)


if __name__ == "__main__":
    main()
