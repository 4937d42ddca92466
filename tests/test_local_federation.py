"""deploy/local_federation.py: credentials, and a real TLS + authenticated federation on
loopback brought up, used, refused to strangers, restarted and brought down."""

import contextlib
import datetime
import http.client
import json
import math
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key

from deploy import local_federation
from harness import burst, netns
from harness.deployment import Deployment
from harness.flower_processes import (
    REPO,
    VENV_BIN,
    copy_app,
    free_port,
    isolated_env,
    pairs,
    started_run_id,
    trained_rounds,
)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def open_to_others(folder: Path) -> list[str]:
    """`folder` and everything in it that its group or anyone else may use."""
    paths = [folder, *(path for path in folder.rglob("*") if not path.is_symlink())]
    return [f"{mode(path):o} {path}" for path in paths if mode(path) & 0o077]


@contextlib.contextmanager
def umask(value: int):
    """Processes started meanwhile get `value`: what `mkdir` and a fresh file then
    get is up to the code under test."""
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


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
        assert local_federation.stop_processes([{**record, "started": record["started"] - 1.0}]) == []
        assert sleeper.poll() is None
        assert local_federation.stop_processes([record]) == ["sleeper"]
        assert sleeper.wait(timeout=10) == -signal.SIGTERM
    finally:
        sleeper.kill()
        sleeper.wait()


def test_supernode_py_ends_as_flower_supernode_does_on_anything_but_a_refused_key():
    done = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "supernode.py"), "--no-such-option"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2  # argparse's, passed on at once: no retry
    assert "unrecognized arguments: --no-such-option" in done.stdout
    assert "starting it again" not in done.stdout + done.stderr


def test_status_counts_a_supernode_from_before_a_restart_once_a_dead_ones_session_is_over():
    since = "2026-11-30T12:00:00.600000+00:00"  # `up` began; Flower's times are to the second
    nodes = [
        {"node-id": "came-online", "status": "online", "online-at": "2026-11-30 12:00:00Z"},
        {"node-id": "from-before", "status": "online", "online-at": "2026-11-30 11:00:00Z"},
        {"node-id": "gone", "status": "offline", "online-at": "2026-11-30 11:00:00Z"},
        {"node-id": "never-came", "status": "registered", "online-at": "N/A"},
    ]
    start = datetime.datetime.fromisoformat(since)
    session_over = start + datetime.timedelta(seconds=local_federation.SESSION_OUTLIVES_S)

    # "from-before" may be a dead SuperNode whose session has not run out yet: only
    # once it would have does its staying online show it alive.
    before = local_federation.connected_lines(nodes, since, session_over - datetime.timedelta(seconds=0.1))
    assert before == [
        "SuperNodes connected: 1 (came-online)",
        f"  and 1 online from before this `up`, counted at {session_over.astimezone():%H:%M:%S} "
        "if still there (Flower's heartbeat)",
    ]
    after = local_federation.connected_lines(nodes, since, session_over)
    assert after == ["SuperNodes connected: 2 (came-online, from-before)"]
    assert local_federation.came_online(nodes, since) == nodes[:1]


def test_a_missing_nginx_is_refused_in_one_line_naming_the_package(tmp_path):
    with pytest.raises(local_federation.FederationError) as refused:
        local_federation.find_nginx(search_path=str(tmp_path))
    assert str(refused.value) == (
        "--host makes a public address, served through nginx, which is not installed: "
        "install the package nginx (Debian, Ubuntu: apt-get install nginx)"
    )


def test_the_flower_internals_the_script_writes_connections_with_still_work(tmp_path, monkeypatch):
    """`flwr` offers no public way to add a connection: the script uses flwr.cli's own
    writer. Should Flower move or change it, this fails before a user does."""
    env = isolated_env(tmp_path)
    monkeypatch.setenv("FLWR_HOME", env["FLWR_HOME"])
    folder = tmp_path / "federation"
    folder.mkdir()
    local_federation.write_connections(folder, "127.0.0.1:9093", insecure=False)
    assert local_federation.get_flwr_home() == Path(env["FLWR_HOME"])
    listed = subprocess.run(
        [str(VENV_BIN / "flwr"), "config", "list"], env=env, capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "local-deployment" in listed.stdout
    with open(Path(env["FLWR_HOME"]) / "config.toml", "rb") as file:
        assert tomllib.load(file)["superlink"]["local-deployment"] == {
            "address": "127.0.0.1:9093",
            "root-certificates": str(folder / "ca.pem"),
        }


# -- The script, run for real -------------------------------------------------------


def quick_rounds(idx_dataset: Path, tmp_path: Path, rounds: int = 2) -> str:
    """--run-config for quick `rounds` on the generated data, every node every round."""
    return pairs(
        {
            "num-server-rounds": rounds,
            "fraction-train": 1.0,
            "fraction-evaluate": 1.0,
            "dataset-path": str(idx_dataset),
            "data-cache-dir": str(tmp_path / "cache"),
            "output-dir": str(tmp_path / "outputs"),
            "use-wandb": False,
        }
    )


def assert_rounds_ran(done: subprocess.CompletedProcess, tmp_path: Path, rounds: int) -> None:
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "Sampled 2 nodes (out of 2)" in log
    [results_file] = (tmp_path / "outputs").glob("*/*/results.json")
    assert [entry["round"] for entry in trained_rounds(results_file)] == list(range(1, rounds + 1))


@pytest.fixture
def deployment(tmp_path, idx_dataset):
    deployment = Deployment(tmp_path / "deployment", dataset=idx_dataset)
    yield deployment
    deployment.close()


@pytest.mark.parametrize(
    ("options", "refusal"),
    [
        (["--nodes", "3", "--num-partitions", "2"], "--nodes 3 is more than --num-partitions 2"),
        (["--local-port", "9093"], "--local-port is the SuperLink's port behind a public --host: use --port"),
        (["--port", "70000"], "--port 70000 is not a port: use 1 to 65535, or 0 for a free one"),
        (
            ["--host", "0.0.0.0", "--port", "9092", "--local-port", "9092"],
            "--port and --local-port are both 9092: nginx and the SuperLink need one each",
        ),
        (
            ["--insecure", "--host", "0.0.0.0"],
            "--host 0.0.0.0 with --insecure would let anyone who reaches it join and read every model "
            "in plain text: drop --insecure (or --host, to stay on this machine)",
        ),
    ],
)
def test_a_bad_request_is_refused_in_one_line_and_starts_nothing(deployment, options, refusal):
    done = deployment.script("up", *options)
    assert done.returncode == 1
    assert done.stderr.strip() == f"local_federation up: {refusal}"
    assert not deployment.folder.exists()
    done = deployment.script("down")
    assert (done.returncode, done.stdout.strip()) == (0, f"No federation from {deployment.folder} was up.")


@pytest.mark.parametrize("kind", ["symbolic link", "another user's"])
def test_a_folder_up_cannot_keep_private_is_refused_in_one_line(deployment, kind):
    folder = deployment.folder
    if kind == "symbolic link":
        target = deployment.root / "elsewhere"
        target.mkdir()
        folder.symlink_to(target)
        refusal = f"{folder} is a symbolic link: give --dir the folder itself"
    else:
        if os.geteuid() != 0:
            pytest.skip("only root can give a folder to another user")
        target = folder
        folder.mkdir()
        os.chown(folder, 65534, 65534)  # nobody's
        refusal = f"{folder} belongs to another user (uid 65534): choose a --dir of your own"
    os.chmod(target, 0o755)
    done = deployment.script("up")
    assert (done.returncode, done.stderr.strip()) == (1, f"local_federation up: {refusal}")
    assert (mode(target), list(target.iterdir())) == (0o755, [])


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
def test_up_makes_an_existing_folder_and_all_in_it_private(deployment):
    """A folder made by `mkdir` (0755), with a log an older `up` left readable: after
    `up`, nothing in it is open to anyone else, the SuperLink's database (every message,
    model updates included) and the keys, logs and configs written since included."""
    old_log = deployment.folder / "logs" / "superlink.log"
    old_log.parent.mkdir(parents=True)
    old_log.write_text("from an older `up`\n")
    for path, path_mode in [(deployment.folder, 0o755), (old_log.parent, 0o755), (old_log, 0o644)]:
        os.chmod(path, path_mode)
    with umask(0o022):
        deployment.up("--nodes", "0")  # SuperNodes' files: test_up_run_down_then_a_restart_...
    assert (deployment.folder / "superlink.db").exists()
    assert open_to_others(deployment.folder) == []


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
        quick_rounds(idx_dataset, tmp_path, rounds=1),
        cwd=app_dir,
    )
    assert_rounds_ran(done, tmp_path, rounds=1)
    assert open_to_others(deployment.folder) == []
    [run] = json.loads(deployment.flwr("ls", "local-deployment", "--format", "json").stdout)["runs"]
    assert run["status"] == "finished:completed"

    running = deployment.pids()
    assert len(running) > len(deployment.state()["processes"])  # Flower's SuperExecs too
    done = deployment.script("down")
    config_toml = deployment.root / "flwr-home" / "config.toml"
    assert done.stdout.strip().splitlines() == [
        "Stopped supernode-0, supernode-1, superlink.",
        f"Removed connection 'local-deployment' from {config_toml}; `up` adds it again.",
    ]
    assert not [pid for pid in running if local_federation.start_time(pid)]  # gone, or a zombie
    assert open_to_others(deployment.folder) == []  # federation.json, rewritten by `down`, included
    with open(config_toml, "rb") as file:
        assert "local-deployment" not in tomllib.load(file)["superlink"]

    # The same folder: the same database, keys already registered. A fixed port, as a
    # SuperNode of another machine's needs (free again at once after a kill: the
    # SuperLink binds it with SO_REUSEADDR).
    port = str(free_port())
    deployment.up("--port", port)
    [listed] = json.loads(deployment.flwr("ls", "local-deployment", "--format", "json").stdout)["runs"]
    assert (listed["run-id"], listed["status"]) == (run["run-id"], "finished:completed")
    assert len(deployment.supernodes()) == 2
    # And one SuperNode of another machine's, that lives through what follows.
    machine = tmp_path / "other-machine"
    key = deployment.enrol(machine, "other-machine")
    deployment.start_stranger(
        "other-machine",
        *("--root-certificates", str(machine / "ca.pem"), "--auth-supernode-private-key", str(key)),
        supervised=True,
    )
    deployment.wait_until_connected(3)

    # The machine dies, and `up` runs again at once: the SuperLink still counts both
    # SuperNodes online (up to 60 s) and refuses them; up's SuperNodes wait that out.
    deployment.crash()
    printed = deployment.up("--port", port)
    assert "2 SuperNode(s) connected" in printed
    log = (deployment.folder / "logs" / "supernode-0.log").read_text()
    assert "the SuperLink refused this SuperNode" in log
    assert [node["status"] for node in deployment.supernodes()] == ["online"] * 3
    # The other machine's kept its session: `status` counts it once a dead one's would
    # have run out (it has not come online since `up`, as up's own have).
    deadline = time.monotonic() + 90
    while "SuperNodes connected: 3 (" not in (status := deployment.script("status").stdout):
        assert "SuperNodes connected: 2 (" in status
        assert "and 1 online from before this `up`, counted at " in status
        assert time.monotonic() < deadline, status
        time.sleep(2)


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
    assert "dataset-path='" in status and "/partition-2'" in status
    assert "SuperNodes connected: 3 (" in status


# -- A public address: SuperNodes train, and nothing else gets through ---------------

MARKER_APP = REPO / "harness" / "marker_app"


def nginx_installed() -> bool:
    try:
        return bool(local_federation.find_nginx())
    except local_federation.FederationError:
        return False


# CI installs nginx (.ci/run) and never skips: there a missing nginx fails the test.
needs_nginx = pytest.mark.skipif(
    not nginx_installed() and not os.environ.get("CI"), reason="needs nginx (apt-get install nginx)"
)


def holder_of_ca(root: Path, ca: Path, public_address: str) -> dict:
    """The environment of someone given `ca.pem`, with a connection to the public address."""
    env = isolated_env(root)
    shutil.copy(ca, root / "ca.pem")
    (root / "flwr-home" / "config.toml").write_text(
        f'[superlink.public]\naddress = "{public_address}"\nroot-certificates = "{root / "ca.pem"}"\n'
    )
    return env


def marker_run_config(marker_dir: Path) -> str:
    return pairs({"marker-dir": str(marker_dir), "wait-for-nodes": 2})


def assert_control_refused(
    deployment: Deployment, env: dict, marker_dir: Path, namespace: str | None = None
) -> None:
    """What the Control API offers, tried through the public address by the holder of
    `env`: listing, registering a key of their own and starting an app of their own.
    Each gets the proxy's refusal, and nothing changes on the SuperLink."""
    runs_before = deployment.flwr("ls", "local-deployment", "--format", "json").stdout
    nodes_before = [node["node-id"] for node in deployment.supernodes()]
    home = Path(env["HOME"])
    _, public_key = local_federation.ensure_supernode_key(home / "keys", 0)
    marker_app = home / "marker-app"
    shutil.copytree(MARKER_APP, marker_app, ignore=shutil.ignore_patterns("__pycache__"))
    tries = {
        "ls": ("ls", "public"),
        "supernode list": ("supernode", "list", "public"),
        "supernode register": ("supernode", "register", str(public_key), "public"),
        "run": ("run", ".", "public", "--run-config", marker_run_config(marker_dir)),
    }
    for what, args in tries.items():
        done = deployment.flwr(*args, cwd=marker_app, env=env, namespace=namespace, timeout=120)
        output = done.stdout + done.stderr
        assert done.returncode == 1, f"flwr {what}: {output}"
        assert "Client error '403 Forbidden'" in output, f"flwr {what}: {output}"
    assert deployment.flwr("ls", "local-deployment", "--format", "json").stdout == runs_before
    assert [node["node-id"] for node in deployment.supernodes()] == nodes_before
    assert list(marker_dir.iterdir()) == []


def run_under_burst(
    deployment: Deployment,
    run: tuple[str, ...],
    public_address: str,
    tmp_path: Path,
    requests: int,
    half_open: int,
    env: dict | None = None,
    namespace: str | None = None,
    burst_namespace: str | None = None,
) -> dict:
    """Start `flwr run *run` (as `env` on `namespace`), send harness.burst's `requests`
    hostile requests and `half_open` stalled handshakes to the public address from
    `burst_namespace` while it runs, and return what the burst got back once the run
    has finished and completed."""
    app_dir = copy_app(tmp_path / "burst-app")
    submitted = deployment.flwr(*run, cwd=app_dir, env=env, namespace=namespace)
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output
    run_id = started_run_id(output)
    burst_command = [sys.executable, "-m", "harness.burst", public_address]
    burst_command += ["--ca", str(deployment.folder / "ca.pem")]
    burst_command += ["--requests", str(requests), "--half-open", str(half_open)]
    # Long enough for nginx to drop every stalled handshake.
    burst_command += ["--hold-seconds", str(local_federation.CLIENT_TIMEOUT_S + 3)]
    bursting = subprocess.run(
        deployment.on_host(burst_command, burst_namespace),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert bursting.returncode == 0, bursting.stdout + bursting.stderr
    deadline = time.monotonic() + 600
    while True:
        listing = deployment.flwr("ls", "local-deployment", "--format", "json", timeout=60)
        [record] = [run for run in json.loads(listing.stdout)["runs"] if run["run-id"] == run_id]
        if record["status"].startswith("finished"):
            break
        assert time.monotonic() < deadline, record
        time.sleep(1)
    assert record["status"] == "finished:completed", record
    [results_file] = (tmp_path / "outputs").glob("*/*/results.json")
    assert [entry["round"] for entry in trained_rounds(results_file)] == [1, 2]
    return json.loads(bursting.stdout)


# Ways to dress a Control or Runtime path, or another method, as a Fleet request.
DISGUISED_REQUESTS = [
    "POST /v1/fleet/../control/list-runs HTTP/1.1",
    "POST /v1/fleet/%2e%2e/control/list-runs HTTP/1.1",
    "POST /v1/fleet%2F..%2Fcontrol%2Flist-runs HTTP/1.1",
    "POST /v1/fleet/pull-messages/../../runtime/acquire-task HTTP/1.1",
    "POST //v1/control/list-runs HTTP/1.1",
    "POST /v1/fleet//..//control/list-runs HTTP/1.1",
    "POST https://localhost/v1/control/list-runs HTTP/1.1",
    "POST /V1/CONTROL/list-runs HTTP/1.1",
    "POST /v1/fleet/pull-messages?/../../control/list-runs HTTP/1.1",
    "GET /v1/fleet/pull-messages HTTP/1.1",
    "HEAD /v1/fleet/get-run HTTP/1.1",
    "POST /docs HTTP/1.1",
]


def assert_disguises_refused(public_address: str, ca: Path) -> None:
    """Each gets nginx's own refusal (403, or 400 for a path it cannot parse), never
    a SuperLink's answer."""
    for request_line in DISGUISED_REQUESTS:
        status, body = burst.raw_request(public_address, str(ca), request_line)
        # A HEAD answer has no body: a 403 to it is nginx's (the SuperLink would say 405).
        from_nginx = local_federation.REFUSAL in body or "nginx" in body or request_line.startswith("HEAD")
        assert status in (400, 403) and from_nginx, (request_line, status, body)


def assert_the_proxy_refused_the_burst(result: dict, half_open: int) -> None:
    statuses = result["statuses"]
    per_kind = result["requests"] // len(burst.KINDS)
    # Never past the proxy: Control, Runtime and the SuperLink's other pages.
    for kind in ("control", "runtime", "other"):
        assert statuses[kind] == {"403": per_kind}, (kind, statuses)
    assert statuses["oversized"] == {"413": per_kind}, statuses
    # Fleet posts reach the SuperLink, which refuses garbage: none succeeds.
    assert sum(statuses["fleet-malformed"].values()) == per_kind
    assert not [status for status in statuses["fleet-malformed"] if status.startswith("2")], statuses
    # A stalled TLS handshake is dropped after client_header_timeout.
    assert result["half_open"] == {"opened": half_open, "closed_by_server": half_open}, result


@pytest.mark.e2e
@needs_nginx
def test_a_public_address_serves_supernodes_only(deployment, idx_dataset, tmp_path):
    """README's "who can do what", on one machine: 127.0.0.2 stands for the public
    address, and the SuperLink's own port is on 127.0.0.1."""
    public_port = free_port()
    printed = deployment.up("--host", "127.0.0.2", "--port", str(public_port), "--san", "127.0.0.2")
    assert "nginx passes the" in printed
    public_address = f"127.0.0.2:{public_port}"
    state = deployment.state()
    assert state["fleet_address"] == public_address
    assert state["address"].startswith("127.0.0.1:")
    assert deployment.connection()["address"] == state["address"]
    [superlink] = [record for record in state["processes"] if record["name"] == "superlink"]
    listening = {
        (connection.laddr.ip, connection.laddr.port)
        for connection in psutil.Process(superlink["pid"]).net_connections("tcp")
        if connection.status == psutil.CONN_LISTEN
    }
    assert listening == {("127.0.0.1", int(state["address"].rpartition(":")[2]))}
    assert "SuperNodes reach 127.0.0.2" in deployment.script("status").stdout
    assert [node["status"] for node in deployment.supernodes()] == ["online", "online"]

    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    stranger = holder_of_ca(tmp_path / "stranger", deployment.folder / "ca.pem", public_address)
    assert_control_refused(deployment, stranger, marker_dir)
    assert_disguises_refused(public_address, deployment.folder / "ca.pem")

    # Meanwhile the operator runs the app, and it trains through the proxy under a burst.
    run = ("run", ".", "local-deployment", "--run-config", quick_rounds(idx_dataset, tmp_path))
    result = run_under_burst(deployment, run, public_address, tmp_path, requests=2000, half_open=200)
    assert_the_proxy_refused_the_burst(result, half_open=200)
    refused_log = (deployment.folder / "logs" / "proxy-refused.log").read_text()
    assert '"POST /v1/control/list-runs HTTP/1.1" 403' in refused_log
    assert " 200 " not in refused_log


def tls_connection(host: str, port: int, ca: Path) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(ca))
    return context.wrap_socket(socket.create_connection((host, port), timeout=30), server_hostname=host)


def keep_alive_request(connection: ssl.SSLSocket, request_line: str, body: bytes = b"") -> tuple[int, str]:
    """One HTTP/1.1 request, kept alive as SuperNodes keep theirs: the status and body
    of its answer."""
    head = f"{request_line}\r\nHost: localhost\r\nContent-Type: application/protobuf\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    connection.sendall(head.encode() + body)
    response = http.client.HTTPResponse(connection, method=request_line.split()[0])
    response.begin()
    return response.status, response.read().decode()


def closed_at(connection: ssl.SSLSocket, limit_s: float) -> float:
    """When (`time.monotonic()`) the server closed `connection`; infinity if it is still
    open after `limit_s`."""
    connection.settimeout(limit_s)
    try:
        while connection.recv(4096):
            pass
    except TimeoutError:
        return math.inf
    except OSError:
        pass  # closed without TLS's goodbye
    return time.monotonic()


@pytest.mark.e2e
@needs_nginx
def test_the_public_address_closes_what_it_refuses_and_what_stalls(deployment):
    """deploy/README.md's "what one address can hold": a body past nginx's memory buffer
    waits in the private folder; at most CONNECTIONS_PER_ADDRESS requests at once, each
    dropped after CLIENT_TIMEOUT_S of silence; a refusal is answered, then its
    connection closed."""
    host, port = "127.0.0.2", free_port()
    deployment.up("--nodes", "0", "--host", host, "--port", str(port), "--san", host)
    ca = deployment.folder / "ca.pem"
    timeout_s = local_federation.CLIENT_TIMEOUT_S

    # 8 times the buffer, and the SuperLink gets it all: it is the one refusing garbage.
    with tls_connection(host, port, ca) as connection:
        status, body = keep_alive_request(connection, "POST /v1/fleet/push-messages HTTP/1.1", bytes(2**20))
    assert (status, json.loads(body)["detail"]) == (400, "Invalid protobuf payload.")

    stalled = [tls_connection(host, port, ca) for _ in range(local_federation.CONNECTIONS_PER_ADDRESS)]
    try:
        for connection in stalled:
            connection.sendall(
                b"POST /v1/fleet/push-messages HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4096\r\n\r\n"
                + bytes(64)
            )
        stalled_at = time.monotonic()
        refusals = {
            "POST /v1/fleet/send-node-heartbeat HTTP/1.1": (503, local_federation.BUSY),
            "POST /v1/control/list-runs HTTP/1.1": (403, local_federation.REFUSAL),
            "POST /v1/fleet/pull-messages?/../../control/list-runs HTTP/1.1": (403, local_federation.REFUSAL),
        }
        for request_line, (status, body) in refusals.items():
            with tls_connection(host, port, ca) as connection:
                assert keep_alive_request(connection, request_line) == (status, f"{body}\n")
                assert closed_at(connection, limit_s=1.0) < math.inf, f"{request_line}: left open"
        waited = [closed_at(connection, limit_s=timeout_s + 3) - stalled_at for connection in stalled]
    finally:
        for connection in stalled:
            connection.close()
    assert all(timeout_s - 1 < seconds < timeout_s + 2 for seconds in waited), waited
    assert open_to_others(deployment.folder) == []


@contextlib.contextmanager
def ssh_server(namespace: str, address: str, root: Path, authorized_key: Path):
    """OpenSSH's sshd on host `namespace`, letting in the holder of `authorized_key`
    (port forwarding only is what the test uses)."""
    root.mkdir()
    host_key = root / "host-key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
    options = {
        "ListenAddress": f"{address}:22",
        "HostKey": str(host_key),
        "AuthorizedKeysFile": str(authorized_key),
        "PasswordAuthentication": "no",
        "PermitRootLogin": "prohibit-password",
        "StrictModes": "no",
        "UsePAM": "no",
        "PidFile": "none",
        "AllowTcpForwarding": "local",
    }
    command = ["/usr/sbin/sshd", "-D", "-e", "-f", "/dev/null"]
    command += [argument for key, value in options.items() for argument in ("-o", f"{key}={value}")]
    with open(root / "sshd.log", "wb") as log:
        server = subprocess.Popen(
            netns.in_namespace(namespace, command), stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        while "Server listening" not in (root / "sshd.log").read_text():
            assert server.poll() is None and time.monotonic() < deadline, (root / "sshd.log").read_text()
            time.sleep(0.1)
        yield
    finally:
        server.terminate()
        server.wait(timeout=20)


def ssh_tunnel(namespace: str, local_port: int, remote_port: int, host: str, key: Path) -> subprocess.Popen:
    """README's `ssh -N -L ...`, from host `namespace`."""
    command = ["ssh", "-N", "-L", f"{local_port}:127.0.0.1:{remote_port}", "-i", str(key)]
    command += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    command += ["-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", f"root@{host}"]
    return subprocess.Popen(
        netns.in_namespace(namespace, command), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


@pytest.mark.e2e
@needs_nginx
@pytest.mark.skipif(
    not netns.available() or not all(map(shutil.which, ["ssh-keygen", "ssh", "/usr/sbin/sshd"])),
    reason="needs root, iproute2 and OpenSSH's client and server",
)
def test_readme_recipe_for_several_machines(tmp_path, idx_dataset):
    """README's steps across five hosts with their own addresses (network namespaces):
    the SuperLink's, two SuperNodes', the user's laptop, and an outsider's."""
    hosts = ["superlink", "node-a", "node-b", "laptop", "outsider"]
    with netns.hosts(hosts) as network:
        superlink_host, superlink_ip = network["superlink"]
        public_address = f"{superlink_ip}:9092"
        deployment = Deployment(tmp_path / "superlink-host", namespace=superlink_host)
        tunnel = None
        try:
            deployment.up(
                "--nodes", "0", "--host", "0.0.0.0", "--port", "9092", "--local-port", "9093",
                "--san", superlink_ip,
            )  # fmt: skip
            # deploy/README's export, then each partition to its SuperNode's machine.
            exported = subprocess.run(
                [sys.executable, "-m", "pytorch_example.node_data", "export", "--num-partitions", "2",
                 "--out", str(tmp_path / "partitions"), "--dataset-path", str(idx_dataset),
                 "--data-cache-dir", str(tmp_path / "export-cache")],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert exported.returncode == 0, exported.stderr
            keys = {}
            for index, host in enumerate(["node-a", "node-b"]):
                machine = tmp_path / host
                keys[host] = deployment.enrol(machine, host)
                shutil.move(tmp_path / "partitions" / f"partition-{index}", machine / "data")
                deployment.start_stranger(
                    host,
                    *(
                        "--root-certificates",
                        str(machine / "ca.pem"),
                        "--auth-supernode-private-key",
                        str(keys[host]),
                    ),
                    superlink=public_address,
                    node_config=f"dataset-path='{machine / 'data'}'",
                    namespace=network[host][0],
                    supervised=True,
                )
            deployment.wait_until_connected(2)

            # A SuperNode's operator, holding ca.pem and a registered key, trains and
            # nothing else; nor does the laptop from the public address.
            marker_dir = tmp_path / "markers"
            marker_dir.mkdir()
            ca = deployment.folder / "ca.pem"
            node_operator = holder_of_ca(tmp_path / "node-a-operator", ca, public_address)
            assert_control_refused(deployment, node_operator, marker_dir, namespace=network["node-a"][0])
            laptop = tmp_path / "laptop"
            laptop_env = holder_of_ca(laptop, ca, public_address)
            assert_control_refused(deployment, laptop_env, marker_dir, namespace=network["laptop"][0])

            # The laptop runs the app through an SSH tunnel to the SuperLink's own port,
            # while an outsider bursts at the public address.
            login_key = laptop / "login-key"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(login_key)], check=True)
            with ssh_server(superlink_host, superlink_ip, tmp_path / "sshd", login_key.with_suffix(".pub")):
                tunnel = ssh_tunnel(network["laptop"][0], 9093, 9093, superlink_ip, login_key)
                with open(laptop / "flwr-home" / "config.toml", "a") as config:
                    config.write(
                        f'\n[superlink.my-federation]\naddress = "127.0.0.1:9093"\n'
                        f'root-certificates = "{laptop / "ca.pem"}"\n'
                    )
                deadline = time.monotonic() + 60
                while deployment.flwr(
                    "ls", "my-federation", env=laptop_env, namespace=network["laptop"][0], timeout=60
                ).returncode:
                    assert tunnel.poll() is None, (tmp_path / "sshd" / "sshd.log").read_text()
                    assert time.monotonic() < deadline, "the SSH tunnel never carried `flwr ls`"
                    time.sleep(1)
                run = ("run", ".", "my-federation", "--run-config", quick_rounds(idx_dataset, tmp_path))
                # The full burst is test_a_public_address_serves_supernodes_only's; this
                # one checks that an outsider's host gets the same refusals.
                result = run_under_burst(
                    deployment,
                    run,
                    public_address,
                    tmp_path,
                    requests=100,
                    half_open=20,
                    env=laptop_env,
                    namespace=network["laptop"][0],
                    burst_namespace=network["outsider"][0],
                )
                assert_the_proxy_refused_the_burst(result, half_open=20)

            # The SuperLink's operator does run code on every SuperNode: by design.
            marker_app = shutil.copytree(MARKER_APP, tmp_path / "marker-app")
            done = deployment.flwr(
                "run", ".", "local-deployment", "--stream", "--run-config", marker_run_config(marker_dir),
                cwd=marker_app, timeout=300,
            )  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr
            assert len(list(marker_dir.glob("marker-*"))) == 2
        finally:
            if tunnel:
                tunnel.terminate()
                tunnel.wait(timeout=20)
            deployment.close()
