"""deploy/local_federation.py: credentials, and a real TLS + authenticated federation on
loopback brought up, used, refused to strangers, restarted and brought down."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key

from deploy import local_federation
from harness import netns
from harness.flower_processes import REPO, VENV_BIN, copy_app, descendants, free_port, isolated_env, pairs

SCRIPT = REPO / "deploy" / "local_federation.py"


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# -- Credentials, no processes ----------------------------------------------------


def test_the_superlink_certificate_is_signed_by_the_ca_for_every_name_given(tmp_path):
    names = [*local_federation.LOCAL_NAMES, "superlink.example.org", "10.0.0.5"]
    local_federation.write_superlink_certificate(tmp_path, names)
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    certificate = x509.load_pem_x509_certificate((tmp_path / "superlink.pem").read_bytes())
    certificate.verify_directly_issued_by(ca)
    alternative_names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert alternative_names.get_values_for_type(x509.DNSName) == ["localhost", "superlink.example.org"]
    assert [str(ip) for ip in alternative_names.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1",
        "::1",
        "10.0.0.5",
    ]
    assert mode(tmp_path / "ca.key") == 0o600
    assert mode(tmp_path / "superlink.key") == 0o600


def test_the_ca_is_kept_across_restarts_and_the_superlink_certificate_renewed(tmp_path):
    local_federation.write_superlink_certificate(tmp_path, ["localhost"])
    ca, superlink = (tmp_path / "ca.pem").read_bytes(), (tmp_path / "superlink.pem").read_bytes()
    local_federation.write_superlink_certificate(tmp_path, ["localhost", "superlink.example.org"])
    assert (tmp_path / "ca.pem").read_bytes() == ca
    assert (tmp_path / "superlink.pem").read_bytes() != superlink


def test_supernode_keys_are_what_flower_reads_and_are_kept(tmp_path):
    private_path, public_path = local_federation.ensure_supernode_key(tmp_path, 3)
    assert private_path == tmp_path / "supernodes" / "supernode-3"
    assert mode(private_path) == 0o600
    assert mode(private_path.parent) == 0o700
    # The loaders `flower-supernode` and `flwr supernode register` use.
    load_ssh_private_key(private_path.read_bytes(), None)
    try_load_public_key(public_path)
    assert local_federation.ensure_supernode_key(tmp_path, 3) == (private_path, public_path)
    assert private_path.read_bytes() == local_federation.ensure_supernode_key(tmp_path, 3)[0].read_bytes()


def test_stop_processes_ends_only_the_process_it_recorded(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        record = {"name": "sleeper", "pid": sleeper.pid, "started": local_federation.start_time(sleeper.pid)}
        # The same PID with another start time is another process: a PID reused.
        assert local_federation.stop_processes([{**record, "started": "Mon Jan  1 00:00:00 2001"}]) == []
        assert sleeper.poll() is None
        assert local_federation.stop_processes([record]) == ["sleeper"]
        assert sleeper.wait(timeout=10) == -signal.SIGTERM
    finally:
        sleeper.kill()
        sleeper.wait()


# -- The script, run for real -------------------------------------------------------


class Deployment:
    """The script with its own folder and Flower Config; `close()` brings down what it
    brought up, and fails the test if anything it started is still running."""

    def __init__(self, root: Path, namespace: str | None = None) -> None:
        self.root = root
        self.folder = root / "federation"
        self.env = isolated_env(root)
        self.namespace = namespace  # the host it runs on (see harness/netns.py); None: this one
        self.strangers: list[subprocess.Popen] = []
        self.seen: dict[int, str | None] = {}  # PID: start time, of every process `up` started

    def on_host(self, command: list[str], namespace: str | None = None) -> list[str]:
        namespace = namespace or self.namespace
        return netns.in_namespace(namespace, command) if namespace else command

    def script(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        command, *options = args
        done = subprocess.run(
            self.on_host([sys.executable, str(SCRIPT), command, "--dir", str(self.folder), *options]),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if command == "up" and (self.folder / "federation.json").exists():
            self.seen.update({pid: local_federation.start_time(pid) for pid in self.pids()})
        return done

    def up(self, *options: str) -> str:
        done = self.script("up", *options)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def state(self) -> dict:
        return json.loads((self.folder / "federation.json").read_text())

    def pids(self) -> list[int]:
        """What `up` started and everything below it, now."""
        return descendants([record["pid"] for record in self.state()["processes"]])

    def connection(self, name: str = "local-deployment") -> dict:
        with open(self.root / "flwr-home" / "config.toml", "rb") as file:
            return tomllib.load(file)["superlink"][name]

    def flwr(self, *args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.on_host([str(VENV_BIN / "flwr"), *args]),
            cwd=cwd or self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def supernodes(self) -> list[dict]:
        listing = self.flwr("supernode", "list", "local-deployment", "--format", "json", timeout=60)
        return json.loads(listing.stdout)["nodes"]

    def start_stranger(
        self,
        name: str,
        *security: str,
        superlink: str | None = None,
        node_config: str = "partition-id=0 num-partitions=2",
        namespace: str | None = None,
    ) -> subprocess.Popen:
        """A SuperNode started by the test, not by the script."""
        command = [
            str(VENV_BIN / "flower-supernode"),
            *security,
            "--superlink",
            superlink or self.state()["address"],
        ]
        with open(self.root / f"{name}.log", "wb") as log:
            process = subprocess.Popen(
                self.on_host([*command, "--port", str(free_port()), "--node-config", node_config], namespace),
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.strangers.append(process)
        return process

    def wait_until_online(self, count: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while [node["status"] for node in self.supernodes()].count("online") < count:
            assert time.monotonic() < deadline, f"fewer than {count} SuperNodes online: {self.supernodes()}"
            time.sleep(0.5)

    def close(self) -> None:
        try:
            for stranger in self.strangers:
                for pid in descendants([stranger.pid]):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                stranger.wait()
            if (self.folder / "federation.json").exists():
                self.script("down")
        finally:
            left = [
                pid
                for pid, started in self.seen.items()
                if started and local_federation.start_time(pid) == started
            ]
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left running after `down`: {left}"


def two_rounds(idx_dataset: Path, tmp_path: Path) -> str:
    """--run-config for 2 quick rounds on the generated data, every node every round."""
    return pairs(
        {
            "num-server-rounds": 2,
            "fraction-train": 1.0,
            "fraction-evaluate": 1.0,
            "dataset-path": str(idx_dataset),
            "data-cache-dir": str(tmp_path / "cache"),
            "output-dir": str(tmp_path / "outputs"),
            "use-wandb": False,
        }
    )


def assert_two_rounds_ran(done: subprocess.CompletedProcess, tmp_path: Path) -> None:
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "Sampled 2 nodes (out of 2)" in log
    [results_file] = (tmp_path / "outputs").glob("*/*/results.json")
    assert [entry["round"] for entry in json.loads(results_file.read_text())] == [1, 2]


@pytest.fixture
def deployment(tmp_path):
    deployment = Deployment(tmp_path / "deployment")
    yield deployment
    deployment.close()


def test_a_bad_request_is_refused_in_one_line_and_starts_nothing(deployment):
    done = deployment.script("up", "--nodes", "3", "--num-partitions", "2")
    assert done.returncode == 1
    assert done.stderr.strip() == "local_federation up: --nodes 3 is more than --num-partitions 2"
    assert not deployment.folder.exists()
    done = deployment.script("down")
    assert (done.returncode, done.stdout.strip()) == (0, f"No federation from {deployment.folder} was up.")


def test_a_port_in_use_is_refused_in_one_line(deployment):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = deployment.script("up", "--port", str(port))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"local_federation up: cannot listen on 127.0.0.1 port {port} (Address already in use): change --port"
    )
    assert not (deployment.folder / "federation.json").exists()


@pytest.mark.e2e
def test_a_failed_up_says_why_in_one_line_and_leaves_nothing_running(deployment):
    # SuperNode 1's private key is damaged: it cannot start.
    private_key, _ = local_federation.ensure_supernode_key(deployment.folder, 1)
    private_key.write_text("not a key")
    done = deployment.script("up")
    assert done.returncode == 1
    log = deployment.folder / "logs" / "supernode-1.log"
    assert done.stderr.strip() == (
        f"local_federation up: supernode-1 exited while waiting for 2 SuperNodes to connect: see {log}"
    )
    assert "Unable to parse the private key file" in log.read_text()
    assert not [record for record in deployment.state()["processes"] if local_federation.alive(record)]
    assert deployment.script("status").stdout.strip() == f"No federation from {deployment.folder} is up."


@pytest.mark.e2e
def test_up_run_down_then_a_restart_still_lists_the_run(deployment, idx_dataset, tmp_path):
    printed = deployment.up()
    assert "2 SuperNode(s) connected" in printed
    assert "flwr run . local-deployment --stream" in printed
    connection = deployment.connection()
    assert connection == {
        "address": deployment.state()["address"],
        "root-certificates": str(deployment.folder / "ca.pem"),
    }
    secrets = ["ca.key", "superlink.key", "supernodes/supernode-0", "supernodes/supernode-1"]
    assert {name: mode(deployment.folder / name) for name in secrets} == dict.fromkeys(secrets, 0o600)
    assert [node["status"] for node in deployment.supernodes()] == ["online", "online"]

    again = deployment.script("up")
    assert again.returncode == 1
    assert "is already up: superlink (PID" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    app_dir = copy_app(tmp_path / "app")
    done = deployment.flwr(
        "run",
        ".",
        "local-deployment",
        "--stream",
        "--run-config",
        two_rounds(idx_dataset, tmp_path),
        cwd=app_dir,
    )
    assert_two_rounds_ran(done, tmp_path)
    [run] = json.loads(deployment.flwr("ls", "local-deployment", "--format", "json").stdout)["runs"]
    assert run["status"] == "finished:completed"

    running = deployment.pids()
    assert len(running) > len(deployment.state()["processes"])  # Flower's SuperExecs too
    done = deployment.script("down")
    assert done.stdout.strip() == "Stopped supernode-0, supernode-1, superlink."
    assert not [pid for pid in running if local_federation.start_time(pid)]  # gone, or a zombie

    deployment.up()  # the same folder: the same database, keys already registered
    [listed] = json.loads(deployment.flwr("ls", "local-deployment", "--format", "json").stdout)["runs"]
    assert (listed["run-id"], listed["status"]) == (run["run-id"], "finished:completed")
    assert len(deployment.supernodes()) == 2


@pytest.mark.e2e
def test_the_tls_federation_refuses_strangers(deployment, tmp_path):
    deployment.up()
    ca = str(deployment.folder / "ca.pem")

    # A key the SuperLink was never told about: refused, so it never gets a node id.
    stranger_key, _ = local_federation.ensure_supernode_key(tmp_path / "stranger", 0)
    unregistered = deployment.start_stranger(
        "unregistered", "--root-certificates", ca, "--auth-supernode-private-key", str(stranger_key)
    )
    assert unregistered.wait(timeout=120) != 0
    log = (deployment.root / "unregistered.log").read_text()
    assert "Exit Code: 305" in log  # Flower's "could not connect to the SuperLink"
    assert "Failed to activate SuperNode" in log
    assert "SuperNode ID" not in log
    assert len(deployment.supernodes()) == 2

    # A registered key, but no CA to trust the SuperLink's certificate: no connection.
    newcomer_key, newcomer_public_key = local_federation.ensure_supernode_key(tmp_path / "newcomer", 0)
    registered = deployment.flwr("supernode", "register", str(newcomer_public_key), "local-deployment")
    assert registered.returncode == 0, registered.stdout + registered.stderr
    without_ca = deployment.start_stranger("without-ca", "--auth-supernode-private-key", str(newcomer_key))
    assert without_ca.wait(timeout=120) != 0
    log = (deployment.root / "without-ca.log").read_text()
    assert "Exit Code: 305" in log
    assert "CERTIFICATE_VERIFY_FAILED" in log
    # ... and the same SuperNode with the CA joins: the CA was all it lacked.
    deployment.start_stranger(
        "with-ca", "--root-certificates", ca, "--auth-supernode-private-key", str(newcomer_key)
    )
    deadline = time.monotonic() + 120
    while "SuperNode ID" not in (deployment.root / "with-ca.log").read_text():
        assert time.monotonic() < deadline, (deployment.root / "with-ca.log").read_text()
        time.sleep(0.5)

    # `flwr` from a connection without the CA cannot reach the SuperLink: no run starts.
    config_path = deployment.root / "flwr-home" / "config.toml"
    address = deployment.state()["address"]
    with open(config_path, "a") as file:
        file.write(f'\n[superlink.no-ca]\naddress = "{address}"\n')
    done = deployment.flwr("run", ".", "no-ca", cwd=copy_app(tmp_path / "app"), timeout=120)
    assert done.returncode == 1
    assert "Connection to the SuperLink is unavailable" in done.stdout + done.stderr
    assert json.loads(deployment.flwr("ls", "local-deployment", "--format", "json").stdout)["runs"] == []


@pytest.mark.e2e
def test_insecure_federation_has_no_tls_and_no_registration(deployment):
    printed = deployment.up("--insecure", "--nodes", "3")
    assert "3 SuperNode(s) connected" in printed
    assert deployment.connection() == {"address": deployment.state()["address"], "insecure": True}
    assert not (deployment.folder / "ca.pem").exists()
    status = deployment.script("status").stdout
    assert "partition-id=2 num-partitions=3" in status
    assert "SuperNodes connected: 3 (" in status


@pytest.mark.e2e
@pytest.mark.skipif(
    not netns.available() or shutil.which("ssh-keygen") is None, reason="needs root, iproute2 and ssh-keygen"
)
def test_readme_recipe_for_several_machines(tmp_path, idx_dataset):
    """README's steps across four hosts with their own addresses (network namespaces):
    the SuperLink's, two SuperNodes' and the user's laptop."""
    with netns.hosts(["superlink", "node-a", "node-b", "laptop"]) as network:
        superlink_host, superlink_ip = network["superlink"]
        superlink = f"{superlink_ip}:9092"
        deployment = Deployment(tmp_path / "superlink-host", namespace=superlink_host)
        try:
            deployment.up("--nodes", "0", "--host", "0.0.0.0", "--port", "9092", "--san", superlink_ip)
            for index, host in enumerate(["node-a", "node-b"]):
                machine = tmp_path / host
                machine.mkdir()
                # The key pair is made on the SuperNode's machine; only the public key leaves it.
                key = machine / "supernode-key"
                subprocess.run(
                    ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key)], check=True
                )
                shutil.copy(key.with_suffix(".pub"), deployment.root / f"{host}.pub")
                registered = deployment.flwr("supernode", "register", f"{host}.pub", "local-deployment")
                assert registered.returncode == 0, registered.stdout + registered.stderr
                shutil.copy(deployment.folder / "ca.pem", machine / "ca.pem")
                deployment.start_stranger(
                    host,
                    *(
                        "--root-certificates",
                        str(machine / "ca.pem"),
                        "--auth-supernode-private-key",
                        str(key),
                    ),
                    superlink=superlink,
                    node_config=f"partition-id={index} num-partitions=2",
                    namespace=network[host][0],
                )
            deployment.wait_until_online(2)

            laptop = tmp_path / "laptop"
            laptop_env = isolated_env(laptop)
            shutil.copy(deployment.folder / "ca.pem", laptop / "ca.pem")
            (laptop / "flwr-home" / "config.toml").write_text(
                f'[superlink.lab]\naddress = "{superlink}"\nroot-certificates = "{laptop / "ca.pem"}"\n'
            )
            done = subprocess.run(
                netns.in_namespace(
                    network["laptop"][0],
                    [str(VENV_BIN / "flwr"), "run", ".", "lab", "--stream"]
                    + ["--run-config", two_rounds(idx_dataset, tmp_path)],
                ),
                cwd=copy_app(tmp_path / "app"),
                env=laptop_env,
                capture_output=True,
                text=True,
                timeout=600,
                stdin=subprocess.DEVNULL,
            )
            assert_two_rounds_ran(done, tmp_path)
        finally:
            deployment.close()
