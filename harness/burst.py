"""A bounded burst of hostile requests at a federation's public address, as someone who
holds `ca.pem` and nothing else would send them, and what came back.

    python -m harness.burst HOST:PORT --ca ca.pem [--requests 2000] [--half-open 200]

Requests cycle through five kinds, each on a fresh TLS connection:
- `control` and `runtime`: random bodies posted to the Control and Runtime APIs;
- `fleet-malformed`: random bodies of up to 1 MiB posted to Fleet paths;
- `oversized`: a Fleet post announcing more than the proxy's request-size limit;
- `other`: GETs of the SuperLink's other pages (`/docs`, `/openapi.json`, `/health`).
Meanwhile `--half-open` connections send part of a TLS ClientHello and then nothing,
for the whole burst and at least `--hold-seconds`.
The burst is bounded in count and in time (`--max-seconds`) and stops by itself; it
prints one JSON object: the HTTP status codes per kind, and how the half-open
connections ended. Only ever aim it at a federation of your own.
"""

import argparse
import collections
import concurrent.futures
import http.client
import json
import random
import socket
import ssl
import threading
import time

CONTROL_PATHS = ["list-runs", "start-run", "register-node", "list-nodes", "stop-run", "stream-logs"]
RUNTIME_PATHS = ["acquire-task", "pull-messages", "push-messages", "get-nodes", "push-object"]
FLEET_PATHS = ["pull-messages", "push-messages", "push-object", "activate-node", "send-node-heartbeat"]
OTHER_PATHS = ["/docs", "/openapi.json", "/health", "/"]
KINDS = ["control", "runtime", "fleet-malformed", "oversized", "other"]
OVERSIZED_BYTES = 64 * 1024 * 1024  # announced, never sent: the proxy answers on the headers
# A TLS record header and the start of a ClientHello, then silence.
PARTIAL_CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def one_request(host: str, port: int, context: ssl.SSLContext, kind: str, rng: random.Random) -> str:
    """Send one request of `kind`; return its HTTP status, or the error's name."""
    connection = http.client.HTTPSConnection(host, port, context=context, timeout=30)
    try:
        if kind == "oversized":
            connection.putrequest("POST", "/v1/fleet/push-object")
            connection.putheader("Content-Type", "application/protobuf")
            connection.putheader("Content-Length", str(OVERSIZED_BYTES))
            connection.endheaders()
            connection.send(rng.randbytes(64 * 1024))
        elif kind == "other":
            connection.request("GET", rng.choice(OTHER_PATHS))
        else:
            api, paths, largest = {
                "control": ("control", CONTROL_PATHS, 64 * 1024),
                "runtime": ("runtime", RUNTIME_PATHS, 64 * 1024),
                "fleet-malformed": ("fleet", FLEET_PATHS, 1024 * 1024),
            }[kind]
            body = rng.randbytes(rng.randint(0, largest))
            headers = {"Content-Type": "application/protobuf"}
            connection.request("POST", f"/v1/{api}/{rng.choice(paths)}", body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return str(response.status)
    except (OSError, http.client.HTTPException) as error:
        return type(error).__name__
    finally:
        connection.close()


def raw_request(address: str, ca: str, request_line: str) -> tuple[int, str]:
    """Send `request_line` as it is (no client library normalises it): the status and body."""
    host, port = split_address(address)
    context = ssl.create_default_context(cafile=ca)
    with (
        socket.create_connection((host, port), timeout=30) as plain,
        context.wrap_socket(plain, server_hostname=host) as connection,
    ):
        request = f"{request_line}\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        connection.sendall(request.encode())
        response = http.client.HTTPResponse(connection, method=request_line.split()[0])
        response.begin()
        return response.status, response.read().decode(errors="replace")


def hold_half_open(host: str, port: int, count: int, until: threading.Event) -> dict:
    """Open `count` connections that start a TLS handshake and stall; count those the
    server closed before `until` was set."""
    connections = []
    for _ in range(count):
        try:
            connection = socket.create_connection((host, port), timeout=10)
            connection.sendall(PARTIAL_CLIENT_HELLO)
            connection.setblocking(False)
            connections.append(connection)
        except OSError:
            pass
    dropped = set()
    while not until.wait(0.5):
        for index, connection in enumerate(connections):
            if index in dropped:
                continue
            try:
                if connection.recv(4096) == b"":
                    dropped.add(index)
            except BlockingIOError:
                pass
            except OSError:
                dropped.add(index)
    for connection in connections:
        connection.close()
    return {"opened": len(connections), "closed_by_server": len(dropped)}


def burst(
    address: str,
    ca: str,
    requests: int = 2000,
    half_open: int = 200,
    concurrency: int = 16,
    max_seconds: float = 300.0,
    hold_seconds: float = 15.0,
    seed: int = 0,
) -> dict:
    host, port = split_address(address)
    context = ssl.create_default_context(cafile=ca)
    rng = random.Random(seed)
    seeds = [rng.getrandbits(32) for _ in range(requests)]
    deadline = time.monotonic() + max_seconds
    done = threading.Event()
    statuses: dict[str, collections.Counter] = {kind: collections.Counter() for kind in KINDS}
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency + 1) as pool:
        holding = pool.submit(hold_half_open, host, port, half_open, done)

        def send(index: int) -> tuple[str, str]:
            kind = KINDS[index % len(KINDS)]
            if time.monotonic() > deadline:
                return kind, "not sent (time bound)"
            return kind, one_request(host, port, context, kind, random.Random(seeds[index]))

        for kind, status in pool.map(send, range(requests)):
            statuses[kind][status] += 1
        seconds = time.monotonic() - started
        # Held at least `hold_seconds`: long enough for a server's timeouts to show.
        time.sleep(max(0.0, started + hold_seconds - time.monotonic()))
        done.set()
        half_open_result = holding.result()
    return {
        "address": address,
        "requests": requests,
        "seconds": round(seconds, 1),
        "statuses": {kind: dict(sorted(counts.items())) for kind, counts in statuses.items()},
        "half_open": half_open_result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("address", help="HOST:PORT of the federation's public address")
    parser.add_argument("--ca", required=True, help="the federation's ca.pem")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--half-open", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=300.0)
    parser.add_argument("--hold-seconds", type=float, default=15.0)
    args = parser.parse_args()
    result = burst(
        args.address,
        args.ca,
        args.requests,
        args.half_open,
        args.concurrency,
        args.max_seconds,
        args.hold_seconds,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
