"""A Flower Deployment Engine federation on this machine in one command, encrypted (TLS)
and with authenticated SuperNodes, and its teardown.

    python deploy/local_federation.py up [--nodes 2] [--insecure]
    flwr run . local-deployment --stream
    python deploy/local_federation.py status
    python deploy/local_federation.py down

`up` keeps everything in one folder (`deploy/.federation/`, or `--dir`), readable by
its owner only: credentials, the SuperLink's database (every message, model updates
included; runs and registered SuperNodes survive a restart), logs and the PIDs `down`
stops. It is not part of the app: `flwr run` never ships this folder.
"""

import argparse
import contextlib
import datetime
import fcntl
import grp
import hashlib
import ipaddress
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import click
import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from flwr.cli.flower_config import read_flower_config, write_flower_config, write_superlink_connection
from flwr.cli.typing import SuperLinkConnection
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE
from flwr.supercore.utils import get_flwr_home

CONNECTION = "local-deployment"
# Their partitioning, shuffling and random numbers decide an export's rows.
EXPORT_LIBRARIES = ("pytorchexample", "flwr-datasets", "datasets", "numpy")
DEFAULT_DIR = Path(__file__).resolve().parent / ".federation"
STATE_FILE = "federation.json"
WILDCARD_HOSTS = ("0.0.0.0", "::")
# `--host` one of these: the federation stays on this machine, with no proxy.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
CERTIFICATE_DAYS = 365
LOCAL_NAMES = ["localhost", "127.0.0.1", "::1"]
CONNECT_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
# Flower cuts every array into chunks of at most 5 MiB (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE),
# so no SuperNode request comes near this; anything larger is refused by the proxy.
MAX_REQUEST_MIB = 8
# Requests nginx serves one address at once (its handshakes and idle connections are
# not counted): a SuperNode uses a few.
CONNECTIONS_PER_ADDRESS = 16
# What nginx holds of a request body in memory; the rest waits in a private file.
BODY_BUFFER_KIB = 128
# Seconds nginx waits on a client: for its handshake and request headers, between two
# reads of its body, between two writes of its reply, idle between requests (SuperNodes
# ask every 3 s, so theirs stays open), and discarding the body of a refused request.
CLIENT_TIMEOUT_S = 5
# Whoever runs `up` may read and write the folder and all in it; nobody else anything.
PRIVATE_UMASK = 0o077
# Where Debian and others put nginx, outside a non-root user's PATH.
SYSTEM_BINARY_DIRS = ["/usr/sbin", "/usr/local/sbin", "/sbin"]


class FederationError(Exception):
    """What went wrong, in one line for the user."""


# -- The folder ----------------------------------------------------------------------


def make_private(folder: Path) -> None:
    """Make `folder` (and any missing parent) and everything in it its owner's only:
    folders 0700, files 0600 at most. A folder that is a symbolic link, another user's
    or not one that can be changed is refused in one line."""
    if folder.is_symlink():
        raise FederationError(f"{folder} is a symbolic link: give --dir the folder itself")
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise FederationError(f"{folder} is not a folder: choose another --dir") from None
    owner = folder.stat().st_uid
    if owner != os.geteuid():
        raise FederationError(f"{folder} belongs to another user (uid {owner}): choose a --dir of your own")
    try:
        os.chmod(folder, 0o700)
        # Top down: a folder is made private, and so readable, before the walk enters it.
        for parent, folders, files in os.walk(folder):
            for name in [*folders, *files]:
                path = os.path.join(parent, name)
                mode = os.lstat(path).st_mode
                private = 0o700 if stat.S_ISDIR(mode) else stat.S_IMODE(mode) & 0o600
                if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) != private:
                    os.chmod(path, private)
    except OSError as error:
        raise FederationError(
            f"cannot make {error.filename} private ({error.strerror}): fix it or choose another --dir"
        ) from None


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


def start_time(pid: int) -> float | None:
    """When process `pid` started (None if it is gone, or a zombie). With the PID it
    names one process: a PID the system reused has another start time."""
    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except psutil.NoSuchProcess:
        return None


def alive(record: dict) -> bool:
    return start_time(record["pid"]) == record["started"]


def descendants(pid: int) -> list[int]:
    """Every process below `pid`: Flower's SuperExec, ServerApp and ClientApps, nginx's workers."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def start_process(folder: Path, name: str, command: list[str], env: dict | None = None) -> dict:
    log_path = folder / "logs" / f"{name}.log"
    # Flower starts its own helpers (flower-superexec) by name: from this environment too.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    # These switch on Flower's legacy gRPC APIs, Control included, on every address.
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("FLWR_INTERNAL_GRPC_")}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            cwd=folder,
            env={**inherited, "PATH": path, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in this terminal must not reach it
        )
    return {"name": name, "pid": process.pid, "started": start_time(process.pid), "log": str(log_path)}


def stop_processes(records: list[dict]) -> list[str]:
    """SIGTERM together the processes that are still the ones we started, SIGKILL what
    is left after a grace period, and whatever they started; return the names stopped."""
    previous_handler = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop halfway
    try:
        running_now = [record for record in records if alive(record)]
        below = [
            {"pid": pid, "started": start_time(pid)}
            for record in running_now
            for pid in descendants(record["pid"])
        ]
        for record in running_now:
            with contextlib.suppress(ProcessLookupError):
                os.kill(record["pid"], signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while any(alive(record) for record in running_now) and time.monotonic() < deadline:
            time.sleep(0.2)
        # And what they started meanwhile (supernode.py starting a SuperNode again).
        below += [
            {"pid": pid, "started": start_time(pid)}
            for record in running_now
            if alive(record)
            for pid in descendants(record["pid"])
        ]
        for process in [*running_now, *below]:
            if alive(process):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process["pid"], signal.SIGKILL)
        return [record["name"] for record in running_now]
    finally:
        signal.signal(signal.SIGINT, previous_handler)


def stop_federation(processes: list[dict]) -> list[str]:
    # SuperNodes first: a SuperLink (or proxy) that goes first leaves them retrying.
    supernodes = [record for record in processes if record["name"].startswith("supernode-")]
    return stop_processes(supernodes) + stop_processes(
        [record for record in processes if record not in supernodes]
    )


# -- The public port: nginx passes the Fleet API and nothing else ---------------------
#
# Flower's SuperLink serves the Fleet API (what SuperNodes use), the Control API (runs,
# logs, node registration) and the Runtime API (what ServerApps use) on one port, and
# the open-source SuperLink has no accounts: whoever reaches that port with `ca.pem` can
# start apps that run on every SuperNode. So with a public address the SuperLink listens
# on 127.0.0.1 only, and nginx, on the public address, terminates TLS with the
# federation's certificate and forwards `/v1/fleet/` alone.

PROXY_CONFIG = """# Written by deploy/local_federation.py at every `up`; edits are lost.
daemon off;  # `up` tracks and `down` stops the master process by its PID
{worker_user}worker_processes auto;
worker_rlimit_nofile 16384;
pid {proxy_dir}/nginx.pid;
error_log stderr notice;

events {{
    worker_connections 4096;
}}

http {{
    # What it refused; SuperNodes' own requests (every 3 s each) are not logged.
    map $status $refused {{
        ~^[23] 0;
        default 1;
    }}
    access_log {logs_dir}/proxy-refused.log combined if=$refused;
    # Request bodies past the buffer, and replies the client is slower to take than the
    # SuperLink to give, wait in files here, in the private folder.
    client_body_temp_path {spool_dir}/client_body;
    proxy_temp_path {spool_dir}/proxy;
    fastcgi_temp_path {spool_dir}/fastcgi;
    uwsgi_temp_path {spool_dir}/uwsgi;
    scgi_temp_path {spool_dir}/scgi;
    client_max_body_size {max_request_mib}m;
    client_body_buffer_size {body_buffer_kib}k;
    proxy_max_temp_file_size {max_request_mib}m;
    # The SuperLink sees a request once its whole body is here: a slow client holds
    # nginx, never the SuperLink.
    proxy_request_buffering on;
    # Each bounds one wait, not a request's whole time: open-source nginx has no such bound.
    {ssl_handshake_timeout}client_header_timeout {client_timeout_s}s;
    client_body_timeout {client_timeout_s}s;
    send_timeout {client_timeout_s}s;
    keepalive_timeout {client_timeout_s}s;
    lingering_time {client_timeout_s}s;
    limit_conn_zone $binary_remote_addr zone=per_address:1m;
    default_type text/plain;
    server_tokens off;

    upstream superlink {{
        server {superlink_address};
        keepalive 8;
    }}

    server {{
        listen {listen} ssl;
        ssl_certificate {folder}/superlink.pem;
        ssl_certificate_key {folder}/superlink.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        limit_conn per_address {connections_per_address};
        # nginx's own refusals are answered, then their connection is closed.
        error_page 403 @refused;
        error_page 503 @busy;

        location /v1/fleet/ {{
            limit_except POST {{
                deny all;
            }}
            # The location matches the normalised path; what goes upstream is the path
            # as sent. Only a plain Fleet path, as SuperNodes send them, passes.
            if ($request_uri !~ "^/v1/fleet/[a-z-]+$") {{
                return 403;
            }}
            proxy_pass https://superlink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {folder}/ca.pem;
            # nginx checks the upstream's certificate by DNS name only.
            proxy_ssl_name localhost;
            proxy_ssl_session_reuse on;
        }}

        location / {{
            return 403;
        }}

        location @refused {{
            keepalive_timeout 0;
            return 403 "{refusal}\\n";
        }}

        location @busy {{
            keepalive_timeout 0;
            return 503 "{busy}\\n";
        }}
    }}
}}
"""
REFUSAL = (
    "Refused: this address serves SuperNodes only (Flower's Fleet API). "
    "Run flwr on the SuperLink's machine, or through an SSH tunnel to it."
)
BUSY = f"Busy: at most {CONNECTIONS_PER_ADDRESS} requests at once from one address."


def find_nginx(search_path: str | None = None) -> str:
    """The nginx binary, or a one-line refusal naming the package."""
    if search_path is None:
        search_path = os.pathsep.join([os.environ.get("PATH", ""), *SYSTEM_BINARY_DIRS])
    found = shutil.which("nginx", path=search_path)
    if not found:
        raise FederationError(
            "--host makes a public address, served through nginx, which is not installed: "
            "install the package nginx (Debian, Ubuntu: apt-get install nginx)"
        )
    return found


def nginx_version(nginx: str) -> tuple[int, ...]:
    """`(1, 22, 1)` for nginx 1.22.1, from `nginx -v`."""
    printed = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=30).stderr
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", printed)
    return tuple(map(int, found.groups())) if found else (0, 0, 0)


SPOOL_RECORD = "spool"  # in the proxy folder: the workers' spool folder, when `up` ran as root


def write_proxy_config(folder: Path, nginx: str, listen: str, superlink_address: str) -> Path:
    proxy_dir = folder / "proxy"
    proxy_dir.mkdir(mode=0o700, exist_ok=True)
    config_path = proxy_dir / "nginx.conf"
    # From nginx 1.25.5 the TLS handshake has a timeout of its own (60 s by default);
    # before, client_header_timeout covers it.
    handshake = ""
    if nginx_version(nginx) >= (1, 25, 5):
        handshake = f"ssl_handshake_timeout {CLIENT_TIMEOUT_S}s;\n    "
    spool_dir, worker_user = worker_spool(proxy_dir)
    config_path.write_text(
        PROXY_CONFIG.format(
            worker_user=worker_user,
            spool_dir=spool_dir,
            ssl_handshake_timeout=handshake,
            client_timeout_s=CLIENT_TIMEOUT_S,
            connections_per_address=CONNECTIONS_PER_ADDRESS,
            proxy_dir=proxy_dir,
            logs_dir=folder / "logs",
            folder=folder,
            listen=listen,
            superlink_address=superlink_address,
            max_request_mib=MAX_REQUEST_MIB,
            body_buffer_kib=BODY_BUFFER_KIB,
            refusal=REFUSAL,
            busy=BUSY,
        )
    )
    return config_path


def worker_spool(proxy_dir: Path) -> tuple[Path, str]:
    """Where nginx's workers keep request bodies and slow replies, and the `user` line
    they run under. Started by root, the workers drop to `nobody` (the public port's
    parser should not run as root), and `nobody` cannot enter the private folder: they
    get a private folder of their own, made afresh, which `down` removes."""
    remove_worker_spool(proxy_dir)
    if os.geteuid() != 0:
        return proxy_dir, ""
    nobody = pwd.getpwnam("nobody")
    spool = Path(tempfile.mkdtemp(prefix="pytorch-example-nginx-"))
    os.chown(spool, nobody.pw_uid, nobody.pw_gid)
    (proxy_dir / SPOOL_RECORD).write_text(str(spool))
    return spool, f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};\n"


def remove_worker_spool(proxy_dir: Path) -> None:
    record = proxy_dir / SPOOL_RECORD
    if record.is_file():
        shutil.rmtree(record.read_text().strip(), ignore_errors=True)
        record.unlink()


def start_proxy(folder: Path, nginx: str, listen: str, superlink_address: str) -> dict:
    config_path = write_proxy_config(folder, nginx, listen, superlink_address)
    return start_process(
        folder, "proxy", [nginx, "-e", "stderr", "-p", str(folder / "proxy"), "-c", str(config_path)]
    )


# -- Talking to the SuperLink ------------------------------------------------------


def flwr(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """`flwr *args` against this folder's SuperLink, through a Flower Config of its own
    (connection `this`): what the user does to theirs cannot mislead `up` or `status`."""
    try:
        return subprocess.run(
            [flower_command("flwr"), *args],
            env={**os.environ, "FLWR_HOME": str(folder / "flwr-home")},
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=120,
        )
    except subprocess.TimeoutExpired as error:
        raise FederationError(f"`flwr {' '.join(args)}` got no answer in {error.timeout:g}s") from None


def write_connections(folder: Path, address: str, insecure: bool) -> None:
    """The connection `local-deployment` in the user's Flower Config, and `this` in the
    folder's own one."""
    ca = None if insecure else str(folder / "ca.pem")
    try:
        write_superlink_connection(SuperLinkConnection(CONNECTION, address, ca, insecure or None))
    except click.ClickException as error:
        raise FederationError(f"could not add connection '{CONNECTION}': {error.message}") from None
    security = "insecure = true" if insecure else f"root-certificates = {json.dumps(ca)}"
    (folder / "flwr-home").mkdir(exist_ok=True)
    (folder / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "this"\n\n[superlink.this]\naddress = {json.dumps(address)}\n{security}\n'
    )


def supernodes(folder: Path) -> list[dict]:
    """The SuperNodes the SuperLink knows, as `flwr supernode list` gives them."""
    listing = flwr(folder, "supernode", "list", "this", "--format", "json")
    try:
        return json.loads(listing.stdout).get("nodes", []) if listing.returncode == 0 else []
    except json.JSONDecodeError:
        return []


# A SuperLink keeps a SuperNode's session for 2 heartbeat intervals after its last
# heartbeat; Flower's SuperNode declares 30 s (fixed in 1.42; one declaring a longer
# interval stays counted when dead for longer). Started again, the SuperLink finds in
# its database the sessions from before, dead or alive: a living SuperNode keeps its
# own by its heartbeats, a dead one's runs out within this long.
SESSION_OUTLIVES_S = HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL


def online_at(node: dict) -> datetime.datetime | None:
    if node["status"] != "online" or node["online-at"] == "N/A":
        return None
    return datetime.datetime.strptime(node["online-at"], "%Y-%m-%d %H:%M:%SZ").replace(tzinfo=datetime.UTC)


def came_online(nodes: list[dict], since: str) -> list[dict]:
    """The SuperNodes of `nodes` (as `supernodes` lists them) online from `since` (ISO time) on."""
    start = datetime.datetime.fromisoformat(since).replace(microsecond=0)  # Flower's are to the second
    return [node for node in nodes if (at := online_at(node)) is not None and at >= start]


def connected(nodes: list[dict], since: str, now: datetime.datetime | None = None) -> list[dict]:
    """The SuperNodes of `nodes` there now, the SuperLink up since `since` (ISO time):
    those that came online since then; and, once a session from before then would have
    run out, every one online."""
    now = now or datetime.datetime.now(datetime.UTC)
    if now - datetime.datetime.fromisoformat(since) < datetime.timedelta(seconds=SESSION_OUTLIVES_S):
        return came_online(nodes, since)
    return [node for node in nodes if online_at(node)]


def register(folder: Path, public_key: Path) -> None:
    """Let the SuperNode holding the matching private key join (once per database)."""
    done = flwr(folder, "supernode", "register", str(public_key), "this")
    reply = (done.stdout + done.stderr).strip()
    if done.returncode != 0 and "already in use" not in reply:
        raise FederationError(f"flwr supernode register {public_key} failed: {reply}")


# -- The federation ----------------------------------------------------------------


@contextlib.contextmanager
def exclusive(folder: Path):
    """One `up` or `down` at a time on a folder."""
    with open(folder / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FederationError(f"another `up` or `down` is working on {folder}") from None
        yield


def read_state(folder: Path) -> dict:
    path = folder / STATE_FILE
    try:
        return json.loads(path.read_text()) if path.exists() else {"processes": []}
    except (json.JSONDecodeError, OSError) as error:
        raise FederationError(
            f"{path} is unreadable ({error}): its processes must be stopped by hand"
        ) from None


def write_state(folder: Path, state: dict) -> None:
    # Whole or not at all: `status`, and anyone reading it meanwhile, never sees half of it;
    # its user's only, whoever writes it (`down` keeps any umask).
    partial = folder / f"{STATE_FILE}.partial"
    write_secret(partial, json.dumps(state, indent=2).encode())
    partial.replace(folder / STATE_FILE)


def running(state: dict) -> list[dict]:
    return [record for record in state["processes"] if alive(record)]


def socket_for(host: str) -> socket.socket:
    return socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)


def check_port(host: str, port: int, option: str = "--port") -> None:
    with socket_for(host) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the SuperLink binds
        try:
            sock.bind((host, port))
        except OSError as error:
            raise FederationError(
                f"cannot listen on {host} port {port} ({error.strerror}): change {option}"
            ) from None


def accepts_connections(host: str, port: int) -> bool:
    with socket_for(host) as sock:
        return sock.connect_ex((host, port)) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def start_superlink(folder: Path, args: argparse.Namespace, host: str, port: int) -> dict:
    security = ["--insecure"]
    if not args.insecure:
        security = [
            "--ssl-certfile", str(folder / "superlink.pem"),
            "--ssl-keyfile", str(folder / "superlink.key"),
            "--ssl-ca-certfile", str(folder / "ca.pem"),
            "--enable-supernode-auth",
        ]  # fmt: skip
    return start_process(
        folder,
        "superlink",
        [
            flower_command("flower-superlink"),
            *security,
            "--host", host,
            "--port", str(port),
            "--database", str(folder / "superlink.db"),
            # This environment already has the app's dependencies (README's install
            # step): no per-run `uv sync` into a fresh environment.
            "--disable-runtime-dependency-installation",
        ],
    )  # fmt: skip


def node_data_folders(folder: Path, args: argparse.Namespace) -> list[Path]:
    """Each SuperNode's own data folder, as on its own machine: `--data`'s partition-<i>
    (or `flwr-datasets create`'s partition_<i>), or simulation's partitions (the app's
    default dirichlet-alpha, partition-seed and val-fraction) exported into the
    federation folder, once for the same source files, count and libraries."""
    if args.data:
        found = []
        for index in range(args.nodes):
            names = [args.data.resolve() / f"partition{mark}{index}" for mark in "-_"]
            if not (present := [path for path in names if path.is_dir()]):
                export = f"python -m pytorch_example.node_data export --num-partitions {args.num_partitions}"
                raise FederationError(
                    f"--data {args.data} holds no partition-{index}: export one per SuperNode with {export} "
                    f"--out {args.data}"
                )
            found.append(present[0])
        return found
    exported = folder / f"data-{export_key(args)}"
    if not exported.is_dir():
        partial = Path(tempfile.mkdtemp(prefix=".data-", dir=folder))
        source = ["--dataset-path", str(args.dataset_path.resolve())] if args.dataset_path else []
        command = [
            sys.executable, "-m", "pytorch_example.node_data", "export",
            "--num-partitions", str(args.num_partitions), "--out", str(partial / "data"), *source,
        ]  # fmt: skip
        done = subprocess.run(
            command, capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=Path(__file__).parents[1]
        )
        if done.returncode:
            shutil.rmtree(partial, ignore_errors=True)
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise FederationError(f"exporting each SuperNode's data failed: {last}")
        os.replace(partial / "data", exported)
        shutil.rmtree(partial, ignore_errors=True)
    return [exported / f"partition-{index}" for index in range(args.nodes)]


def export_key(args: argparse.Namespace) -> str:
    """What an export depends on: the source (its files' sizes and times), the count of
    partitions, and the libraries that cut them."""
    parts = [str(args.num_partitions), *(f"{name}={version(name)}" for name in EXPORT_LIBRARIES)]
    if args.dataset_path is None:
        parts.append("hub")
    for path in sorted(args.dataset_path.resolve().rglob("*")) if args.dataset_path else []:
        if path.is_file():
            parts.append(f"{path}:{path.stat().st_size}:{path.stat().st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def start_supernode(
    folder: Path, args: argparse.Namespace, index: int, address: str, private_key: Path | None, data: Path
) -> dict:
    security = ["--insecure"]
    if private_key:
        security = [
            "--root-certificates",
            str(folder / "ca.pem"),
            "--auth-supernode-private-key",
            str(private_key),
        ]
    node_config = f"dataset-path='{data}'"
    # SuperNodes sharing this machine share its cores: more torch threads than cores
    # made every ClientApp 20x slower on 2 cores.
    threads = str(max(1, (os.cpu_count() or 1) // args.nodes))
    # Through supernode.py: a SuperNode started again soon after it died (a crashed
    # federation brought `up` again) is refused by the SuperLink for up to 60 s.
    supernode = [sys.executable, str(Path(__file__).with_name("supernode.py")), *security]
    flower_command("flower-supernode")  # there, or a one-line error now
    record = start_process(
        folder,
        f"supernode-{index}",
        [*supernode, "--superlink", address, "--port", str(free_port()), "--node-config", node_config],
        # SuperExec checks for work every second by default; a round pays it twice.
        env={"OMP_NUM_THREADS": threads, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"},
    )
    return {**record, "node_config": node_config}


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def up(args: argparse.Namespace) -> None:
    # What `up` writes, and what the processes it starts write (the SuperLink's database
    # holds every model update), is its user's only.
    os.umask(PRIVATE_UMASK)
    make_private(Path(os.path.abspath(args.dir)))
    folder = args.dir.resolve()
    with exclusive(folder):
        if started := running(read_state(folder)):
            names = ", ".join(f"{record['name']} (PID {record['pid']})" for record in started)
            raise FederationError(
                f"a federation from {folder} is already up: {names}; stop it with `down` first"
            )
        # What reaches this machine from outside, and the SuperLink itself: one and the
        # same on one machine; with a public address, nginx on it and the SuperLink on
        # loopback behind it.
        public = args.host not in LOOPBACK_HOSTS
        superlink_host = "127.0.0.1" if public else args.host
        args.port = args.port or free_port()
        superlink_port = (args.local_port or free_port()) if public else args.port
        check_port(args.host, args.port)
        if public:
            check_port(superlink_host, superlink_port, "--local-port")
        (folder / "logs").mkdir(exist_ok=True)
        data = node_data_folders(folder, args) if args.nodes else []
        # SuperNodes started here reach the public address by a local one when it is
        # every address of this machine: both must be names in the certificate.
        reach_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(args.host, args.host)
        address = host_port(superlink_host, superlink_port)
        fleet_address = host_port(reach_host, args.port)
        if not args.insecure:
            names = [*LOCAL_NAMES, reach_host, *args.san]
            write_superlink_certificate(folder, list(dict.fromkeys(names)))
        write_connections(folder, address, args.insecure)

        since = datetime.datetime.now(datetime.UTC).isoformat()
        state = {
            "address": address,
            "fleet_address": fleet_address,
            "insecure": args.insecure,
            "since": since,
            "processes": [],
        }
        try:
            state["processes"].append(start_superlink(folder, args, superlink_host, superlink_port))
            write_state(folder, state)
            wait_for(
                lambda: accepts_connections(superlink_host, superlink_port),
                "starting the SuperLink",
                state["processes"],
            )
            if public:
                state["processes"].append(
                    start_proxy(folder, args.nginx, host_port(args.host, args.port), address)
                )
                write_state(folder, state)
                wait_for(
                    lambda: accepts_connections(reach_host, args.port),
                    "starting the proxy (nginx)",
                    state["processes"],
                )
            private_keys = [None] * args.nodes
            if not args.insecure:
                for index in range(args.nodes):
                    private_keys[index], public_key = ensure_supernode_key(folder, index)
                    register(folder, public_key)
            for index, private_key in enumerate(private_keys):
                state["processes"].append(
                    start_supernode(folder, args, index, fleet_address, private_key, data[index])
                )
                write_state(folder, state)
            wait_for(
                # Its own SuperNodes start now: each is there once it comes online (as is
                # any other that comes back meanwhile, which this counts too).
                lambda: len(came_online(supernodes(folder), since)) >= args.nodes,
                f"waiting for {args.nodes} SuperNodes to connect",
                state["processes"],
            )
        except BaseException:
            stop_federation(state["processes"])
            raise

    kind = "plain text, any SuperNode may join" if args.insecure else "TLS, registered SuperNodes only"
    if public:
        print(f"Federation up: SuperNodes reach {fleet_address} ({kind}), where nginx passes the")
        print(f"Fleet API only; the SuperLink listens on {address}, for this machine only.")
        print(f"{args.nodes} SuperNode(s) connected.")
    else:
        print(f"Federation up: SuperLink at {address} ({kind}), {args.nodes} SuperNode(s) connected.")
    print(f"Connection '{CONNECTION}' ({address}) is in {get_flwr_home() / 'config.toml'}.")
    print(f"Credentials and the SuperLink's database: {folder}; logs: {folder / 'logs'}")
    if args.nodes < 2:
        print("Note: the app samples at least 2 SuperNodes a round; start more before `flwr run`.")
    if args.host in WILDCARD_HOSTS and not args.san:
        print("Note: SuperNodes on other machines need the name they reach this one by: add --san NAME.")
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
    if state.get("fleet_address", state["address"]) != state["address"]:
        print(f"SuperNodes reach {state['fleet_address']} (nginx: the Fleet API only)")
    for record in state["processes"]:
        process_state = "running" if alive(record) else "stopped"
        node_config = record.get("node_config", "")
        print(f"  {record['name']:<13} PID {record['pid']:<8} {process_state:<8} {node_config}")
        print(f"  {'':<13} log {record['log']}")
    print("\n".join(connected_lines(supernodes(folder), state["since"])))


def connected_lines(nodes: list[dict], since: str, now: datetime.datetime | None = None) -> list[str]:
    """What `status` says of the SuperNodes `nodes`, the SuperLink up since `since`."""
    there = connected(nodes, since, now)
    lines = [f"SuperNodes connected: {len(there)} ({', '.join(node['node-id'] for node in there)})"]
    unsure = [node for node in nodes if online_at(node) and node not in there]
    if unsure:
        # Sessions from before the SuperLink (re)started: alive or dead, it cannot yet tell.
        known_at = datetime.datetime.fromisoformat(since) + datetime.timedelta(seconds=SESSION_OUTLIVES_S)
        lines.append(
            f"  and {len(unsure)} online from before this `up`, counted at "
            f"{known_at.astimezone():%H:%M:%S} if still there (Flower's heartbeat)"
        )
    return lines


def down(args: argparse.Namespace) -> None:
    folder = args.dir.resolve()
    if not (folder / STATE_FILE).exists():
        print(f"No federation from {folder} was up.")
        return
    with exclusive(folder):
        state = read_state(folder)
        stopped = stop_federation(state["processes"])
        remove_worker_spool(folder / "proxy")
        write_state(folder, {**state, "processes": []})
        removed = remove_connection(state.get("address"))
    print(f"Stopped {', '.join(stopped)}." if stopped else f"No federation from {folder} was up.")
    if removed:
        config_toml = get_flwr_home() / "config.toml"
        print(f"Removed connection '{CONNECTION}' from {config_toml}; `up` adds it again.")


def remove_connection(address: str | None) -> bool:
    """Remove the connection `up` added to the user's Flower Config (only if it still
    names this federation's address): a stale one would answer `flwr ls local-deployment`
    with "Connection to the SuperLink is unavailable"."""
    try:
        flower_config, _ = read_flower_config()
    except click.ClickException:
        return False
    connections = flower_config.get("superlink", {})
    if address is None or connections.get(CONNECTION, {}).get("address") != address:
        return False
    del connections[CONNECTION]
    if connections.get("default") == CONNECTION:
        del connections["default"]
    write_flower_config(flower_config)
    return True


def check_up_options(args: argparse.Namespace) -> None:
    args.host = args.host.strip("[]")
    args.san = [name.strip("[]") for name in args.san]
    if args.num_partitions is None:
        args.num_partitions = max(1, args.nodes)
    if args.nodes < 0:
        raise FederationError(f"--nodes {args.nodes}: use 0 (the SuperLink only) or more")
    if args.nodes > args.num_partitions:
        raise FederationError(f"--nodes {args.nodes} is more than --num-partitions {args.num_partitions}")
    if args.data and args.dataset_path:
        raise FederationError(
            "--data holds each SuperNode's data already; --dataset-path is what to export it from"
        )
    for option, path in (("--data", args.data), ("--dataset-path", args.dataset_path)):
        if path is not None and not path.is_dir():
            raise FederationError(f"{option} {path} is not a folder")
    if args.san and args.insecure:
        raise FederationError("--san names the SuperLink in its TLS certificate, and --insecure has none")
    for option, port in (("--port", args.port), ("--local-port", args.local_port)):
        if not 0 <= port <= 65535:
            raise FederationError(f"{option} {port} is not a port: use 1 to 65535, or 0 for a free one")
    if args.host in LOOPBACK_HOSTS:
        if args.local_port:
            raise FederationError("--local-port is the SuperLink's port behind a public --host: use --port")
        return
    if args.port and args.port == args.local_port:
        raise FederationError(
            f"--port and --local-port are both {args.port}: nginx and the SuperLink need one each"
        )
    if args.insecure:
        raise FederationError(
            f"--host {args.host} with --insecure would let anyone who reaches it join and read "
            "every model in plain text: drop --insecure (or --host, to stay on this machine)"
        )
    args.nginx = find_nginx()


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
        help="partitions exported in all, the first --nodes used here (default: --nodes)",
    )
    up_parser.add_argument(
        "--data",
        type=Path,
        help="a folder of partition-<i> folders, one per SuperNode (python -m pytorch_example.node_data "
        "export); default: exported here from --dataset-path",
    )
    up_parser.add_argument(
        "--dataset-path",
        type=Path,
        help="the Fashion-MNIST files to export each SuperNode's data from (default: the Hugging Face Hub)",
    )
    up_parser.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode authentication")
    up_parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address SuperNodes reach; other than 127.0.0.1, ::1 or localhost it is public: "
        "nginx serves the Fleet API there, and the SuperLink listens on 127.0.0.1 only",
    )
    up_parser.add_argument(
        "--port", type=int, default=0, help="the port SuperNodes reach (default: a free one)"
    )
    up_parser.add_argument(
        "--local-port",
        type=int,
        default=0,
        help="with a public --host: the SuperLink's own port on 127.0.0.1 (default: a free one)",
    )
    up_parser.add_argument(
        "--san", action="append", default=[], help="another name or address of the SuperLink (repeatable)"
    )
    status_parser = commands.add_parser(
        "status", help="the processes `up` started, their logs and SuperNodes"
    )
    down_parser = commands.add_parser(
        "down", help="stop the SuperNodes, nginx and the SuperLink `up` started"
    )
    for command in (up_parser, status_parser, down_parser):
        command.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="the federation's folder")
    args = parser.parse_args()
    try:
        if args.command == "up":
            check_up_options(args)
        {"up": up, "status": status, "down": down}[args.command](args)
    except FederationError as error:
        sys.exit(f"local_federation {args.command}: {error}")
    except KeyboardInterrupt:
        stopped = "; what it had started is stopped" if args.command == "up" else ""
        sys.exit(f"local_federation {args.command}: interrupted{stopped}")


if __name__ == "__main__":
    main()
