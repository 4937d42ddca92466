"""A Flower Deployment Engine federation on this machine in one command, encrypted (TLS)
and with authenticated SuperNodes, and its teardown.

    python deploy/local_federation.py up [--nodes 2] [--insecure]
    flwr run . local-deployment --stream
    python deploy/local_federation.py status
    python deploy/local_federation.py down

`up` keeps everything in one folder (`deploy/.federation/`, or `--dir`): credentials,
the SuperLink's database (runs and registered SuperNodes survive a restart), logs and
the PIDs `down` stops. It is not part of the app: `flwr run` never ships this folder.
"""

import argparse
import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from flwr.cli.flower_config import write_superlink_connection
from flwr.cli.typing import SuperLinkConnection
from flwr.supercore.utils import get_flwr_home

CONNECTION = "local-deployment"
DEFAULT_DIR = Path(__file__).resolve().parent / ".federation"
STATE_FILE = "federation.json"
CERTIFICATE_DAYS = 365
LOCAL_NAMES = ["localhost", "127.0.0.1", "::1"]
CONNECT_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0


class FederationError(Exception):
    """What went wrong, in one line for the user."""


# -- Credentials ---------------------------------------------------------------------


def write_secret(path: Path, data: bytes) -> None:
    """Write `data` readable by its owner only, from the first byte on."""
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
        file.write(data)


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def ensure_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The federation's certificate authority, made once and kept: every SuperNode and
    every `flwr` that trusts `ca.pem` keeps working across restarts."""
    cert_path, key_path = folder / "ca.pem", folder / "ca.key"
    if cert_path.exists() and key_path.exists():
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if certificate.not_valid_after_utc > datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1):
            return certificate, serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pytorch-example federation CA")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERTIFICATE_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    write_secret(key_path, private_pem(key))
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return certificate, key


def subject_alternative_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def write_superlink_certificate(folder: Path, names: list[str]) -> None:
    """A fresh SuperLink certificate, signed by the CA, valid for `names` (the names and
    addresses SuperNodes and `flwr` use to reach it)."""
    ca_certificate, ca_key = ensure_ca(folder)
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(
            min(now + datetime.timedelta(days=CERTIFICATE_DAYS), ca_certificate.not_valid_after_utc)
        )
        .add_extension(
            x509.SubjectAlternativeName([subject_alternative_name(n) for n in names]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    write_secret(folder / "superlink.key", private_pem(key))
    (folder / "superlink.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def ensure_supernode_key(folder: Path, index: int) -> tuple[Path, Path]:
    """SuperNode `index`'s key pair (P-384, OpenSSH format, as Flower reads it), kept
    across restarts because the SuperLink knows the node by its public key."""
    private_path = folder / "supernodes" / f"supernode-{index}"
    public_path = private_path.with_suffix(".pub")
    if not (private_path.exists() and public_path.exists()):
        private_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP384R1())
        write_secret(
            private_path,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
        )
        public_path.write_bytes(
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        )
    return private_path, public_path


# -- Processes -------------------------------------------------------------------------


def flower_command(name: str) -> str:
    """Flower's executable `name` from the environment running this script."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FederationError(
            f"{name} not found next to {sys.executable}: install the app (pip install -e .)"
        )
    return str(path)


def start_time(pid: int) -> str | None:
    """When process `pid` started, as `ps` says (None if there is no such process). With
    the PID it names one process: a PID the system reused has another start time."""
    done = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True)
    return done.stdout.strip() or None


def descendants(pid: int) -> list[int]:
    """Every process below `pid`: Flower's SuperExec, ServerApp and ClientApps."""
    listing = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in listing.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def alive(record: dict) -> bool:
    return start_time(record["pid"]) == record["started"]


def start_process(folder: Path, name: str, command: list[str], env: dict | None = None) -> dict:
    log_path = folder / "logs" / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            cwd=folder,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in this terminal must not reach it
        )
    return {"name": name, "pid": process.pid, "started": start_time(process.pid), "log": str(log_path)}


def stop_processes(records: list[dict]) -> list[str]:
    """SIGTERM together the processes that are still the ones we started, SIGKILL what
    is left after a grace period, and whatever they started; return the names stopped."""
    started = [record for record in records if alive(record)]
    below = [
        {"pid": pid, "started": start_time(pid)} for record in started for pid in descendants(record["pid"])
    ]
    for record in started:
        os.kill(record["pid"], signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while any(alive(record) for record in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    for process in [*started, *below]:
        if alive(process):
            os.kill(process["pid"], signal.SIGKILL)
    return [record["name"] for record in started]


# -- The federation ----------------------------------------------------------------


def read_state(folder: Path) -> dict | None:
    path = folder / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def running(state: dict | None) -> list[dict]:
    return [record for record in (state or {}).get("processes", []) if alive(record)]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flwr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [flower_command("flwr"), *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120
    )


def online_supernodes(since: datetime.datetime) -> int:
    """SuperNodes that came online after `since`: the database keeps the status of
    nodes from before a restart, which says nothing about now."""
    listing = flwr("supernode", "list", CONNECTION, "--format", "json")
    if listing.returncode != 0:
        return 0
    count = 0
    for node in json.loads(listing.stdout).get("nodes", []):
        if node["status"] == "online" and node["online-at"] != "N/A":
            online_at = datetime.datetime.strptime(node["online-at"], "%Y-%m-%d %H:%M:%SZ")
            count += online_at.replace(tzinfo=datetime.UTC) >= since.replace(microsecond=0)
    return count


def register(public_key: Path) -> None:
    """Let the SuperNode holding the matching private key join (once per database)."""
    done = flwr("supernode", "register", str(public_key), CONNECTION)
    if done.returncode != 0 and "already in use" not in done.stdout + done.stderr:
        reply = (done.stdout + done.stderr).strip()
        raise FederationError(f"flwr supernode register {public_key} failed: {reply}")


def wait_for(condition, what: str, processes: list[dict], timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Wait until `condition()`, failing in one line if a process dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        for record in processes:
            if not alive(record):
                raise FederationError(f"{record['name']} exited while {what}: see {record['log']}")
        if time.monotonic() > deadline:
            logs = Path(processes[0]["log"]).parent
            raise FederationError(f"still {what} after {timeout_s:g}s: see the logs in {logs}")
        time.sleep(0.5)


def accepts_connections(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        return sock.connect_ex((host, port)) == 0


def superlink_security(folder: Path, insecure: bool) -> list[str]:
    if insecure:
        return ["--insecure"]
    return [
        "--ssl-certfile", str(folder / "superlink.pem"),
        "--ssl-keyfile", str(folder / "superlink.key"),
        "--ssl-ca-certfile", str(folder / "ca.pem"),
        "--enable-supernode-auth",
    ]  # fmt: skip


def supernode_security(folder: Path, index: int, insecure: bool) -> list[str]:
    if insecure:
        return ["--insecure"]
    return [
        "--root-certificates", str(folder / "ca.pem"),
        "--auth-supernode-private-key", str(ensure_supernode_key(folder, index)[0]),
    ]  # fmt: skip


def up(args: argparse.Namespace) -> None:
    folder = args.dir.resolve()
    if started := running(read_state(folder)):
        names = ", ".join(f"{record['name']} (PID {record['pid']})" for record in started)
        raise FederationError(f"a federation from {folder} is already up: {names}; stop it with `down` first")
    if args.nodes > args.num_partitions:
        raise FederationError(f"--nodes {args.nodes} is more than --num-partitions {args.num_partitions}")
    port = args.port or free_port()
    if not port_is_free(args.host, port):
        raise FederationError(f"port {port} on {args.host} is taken: choose another with --port")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    connect_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    address = f"[{connect_host}]:{port}" if ":" in connect_host else f"{connect_host}:{port}"

    if not args.insecure:
        # Every name the SuperLink is reached by: its own ServerApp process connects to
        # `--host` (or to localhost when it listens on all addresses).
        names = [*LOCAL_NAMES, *([args.host] if args.host not in ("0.0.0.0", "::") else []), *args.san]
        write_superlink_certificate(folder, list(dict.fromkeys(names)))
    write_superlink_connection(
        SuperLinkConnection(
            name=CONNECTION,
            address=address,
            root_certificates=None if args.insecure else str(folder / "ca.pem"),
            insecure=args.insecure or None,
        )
    )

    since = datetime.datetime.now(datetime.UTC)
    processes: list[dict] = []
    state = {"address": address, "insecure": args.insecure, "processes": processes}
    try:
        superlink = start_process(
            folder,
            "superlink",
            [
                flower_command("flower-superlink"),
                *superlink_security(folder, args.insecure),
                "--host", args.host,
                "--port", str(port),
                "--database", str(folder / "superlink.db"),
                # This environment already has the app's dependencies (README's install
                # step): no per-run `uv sync` into a fresh environment.
                "--disable-runtime-dependency-installation",
            ],
        )  # fmt: skip
        processes.append(superlink)
        (folder / STATE_FILE).write_text(json.dumps(state, indent=2))
        wait_for(lambda: accepts_connections(connect_host, port), "starting the SuperLink", processes)
        if not args.insecure:
            for index in range(args.nodes):
                register(ensure_supernode_key(folder, index)[1])

        # SuperNodes sharing this machine share its cores: more torch threads than
        # cores made every ClientApp 20x slower on 2 cores.
        threads = str(max(1, (os.cpu_count() or 1) // max(1, args.nodes)))
        for index in range(args.nodes):
            node_config = f"partition-id={index} num-partitions={args.num_partitions}"
            record = start_process(
                folder,
                f"supernode-{index}",
                [
                    flower_command("flower-supernode"),
                    *supernode_security(folder, index, args.insecure),
                    "--superlink",
                    address,
                    "--port",
                    str(free_port()),
                    "--node-config",
                    node_config,
                ],  # fmt: skip
                # SuperExec checks for work every second by default; a round pays it twice.
                env={"OMP_NUM_THREADS": threads, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"},
            )
            processes.append({**record, "node_config": node_config})
            (folder / STATE_FILE).write_text(json.dumps(state, indent=2))
        wait_for(
            lambda: online_supernodes(since) >= args.nodes, f"waiting for {args.nodes} SuperNodes", processes
        )
    except BaseException:
        stop_processes(processes[1:])
        stop_processes(processes[:1])
        raise

    kind = "TLS, registered SuperNodes only"
    if args.insecure:
        kind = "plain text, any SuperNode may join (--insecure)"
    print(f"Federation up: SuperLink at {address} ({kind}), {args.nodes} SuperNode(s) connected.")
    print(f"Connection '{CONNECTION}' is in {get_flwr_home() / 'config.toml'}.")
    print(f"Credentials and the SuperLink's database: {folder}; logs: {folder / 'logs'}")
    if args.nodes < 2:
        print("Note: the app samples at least 2 SuperNodes a round; start more before `flwr run`.")
    dir_option = "" if folder == DEFAULT_DIR else f" --dir {folder}"
    print(f"\nNext:\n  flwr run . {CONNECTION} --stream")
    print(f"  python {sys.argv[0]} status{dir_option}")
    print(f"  python {sys.argv[0]} down{dir_option}")


def status(args: argparse.Namespace) -> None:
    folder = args.dir.resolve()
    state = read_state(folder)
    if not running(state):
        print(f"No federation from {folder} is up.")
        return
    print(f"SuperLink at {state['address']} ({'insecure' if state['insecure'] else 'TLS + SuperNode auth'})")
    for record in state["processes"]:
        where = record.get("node_config", "")
        state_now = "running" if alive(record) else "stopped"
        print(f"  {record['name']:<13} PID {record['pid']:<8} {state_now:<8} {where}")
        print(f"  {'':<13} log {record['log']}")
    listing = flwr("supernode", "list", CONNECTION, "--format", "json")
    if listing.returncode == 0:
        nodes = [
            f"{node['node-id']} {node['status']}" for node in json.loads(listing.stdout).get("nodes", [])
        ]
        print(f"SuperNodes the SuperLink knows: {', '.join(nodes) or 'none'}")


def down(args: argparse.Namespace) -> None:
    folder = args.dir.resolve()
    state = read_state(folder)
    processes = (state or {}).get("processes", [])
    # SuperNodes first: a SuperLink that goes first leaves them retrying.
    stopped = stop_processes([record for record in processes if record["name"] != "superlink"])
    stopped += stop_processes([record for record in processes if record["name"] == "superlink"])
    if state:
        (folder / STATE_FILE).write_text(json.dumps({**state, "processes": []}, indent=2))
    print(f"Stopped {', '.join(stopped)}." if stopped else f"No federation from {folder} was up.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up_parser = commands.add_parser("up", help="start a SuperLink and SuperNodes")
    up_parser.add_argument(
        "--nodes", type=int, default=2, help="SuperNodes to start here (0: SuperLink only)"
    )
    up_parser.add_argument(
        "--num-partitions",
        type=int,
        help="partitions in the federation (default: --nodes); node i holds partition i",
    )
    up_parser.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode authentication")
    up_parser.add_argument("--host", default="127.0.0.1", help="address the SuperLink listens on")
    up_parser.add_argument(
        "--port", type=int, default=0, help="the SuperLink's one port (default: a free one)"
    )
    up_parser.add_argument(
        "--san",
        action="append",
        default=[],
        help="another name or address of the SuperLink for its certificate",
    )
    for command in (up_parser, commands.add_parser("status"), commands.add_parser("down")):
        command.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="the federation's folder")
    args = parser.parse_args()
    if args.command == "up":
        args.num_partitions = args.num_partitions or max(1, args.nodes)
        if args.nodes < 0 or args.num_partitions < 1:
            parser.error("--nodes must be 0 or more, --num-partitions 1 or more")
    try:
        {"up": up, "status": status, "down": down}[args.command](args)
    except FederationError as error:
        sys.exit(f"local_federation {args.command}: {error}")
    except KeyboardInterrupt:
        sys.exit(f"local_federation {args.command}: interrupted; what it had started is stopped")


if __name__ == "__main__":
    main()
