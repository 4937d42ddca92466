"""Several hosts on this one machine: Linux network namespaces on a private bridge, so a
SuperLink and SuperNodes reach each other by their own addresses, as on a real network.

Needs root and iproute2. Traffic stays inside the namespaces made here, and leaving the
context manager deletes them all.
"""

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator


def available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def hosts(names: list[str], subnet: str = "10.77.0") -> Iterator[dict[str, tuple[str, str]]]:
    """Yield `{name: (namespace, address)}`: one namespace per host, each with its
    loopback up and a veth into a shared bridge, at `<subnet>.1`, `<subnet>.2`, ..."""
    prefix = f"pe{os.getpid() % 100000}"  # unique per test process; veth names stay under 16 characters
    lan = f"{prefix}-lan"
    made = [lan]
    try:
        ip("netns", "add", lan)
        ip("-n", lan, "link", "add", "br0", "type", "bridge")
        ip("-n", lan, "link", "set", "br0", "up")
        found = {}
        for index, name in enumerate(names, start=1):
            namespace, address = f"{prefix}-{name}", f"{subnet}.{index}"
            ip("netns", "add", namespace)
            made.append(namespace)
            host_end, lan_end = f"{prefix}h{index}", f"{prefix}l{index}"
            ip(
                "link",
                "add",
                host_end,
                "netns",
                namespace,
                "type",
                "veth",
                "peer",
                "name",
                lan_end,
                "netns",
                lan,
            )
            ip("-n", lan, "link", "set", lan_end, "master", "br0")
            ip("-n", lan, "link", "set", lan_end, "up")
            ip("-n", namespace, "addr", "add", f"{address}/24", "dev", host_end)
            ip("-n", namespace, "link", "set", host_end, "up")
            ip("-n", namespace, "link", "set", "lo", "up")
            found[name] = (namespace, address)
        yield found
    finally:
        for namespace in reversed(made):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def in_namespace(namespace: str, command: list[str]) -> list[str]:
    """`command` run on host `namespace` (`ip netns exec` execs it: the PID stays its own)."""
    return ["ip", "netns", "exec", namespace, *command]


def set_network(namespace: str, up: bool) -> None:
    """Take host `namespace` off the network (its links down, as a pulled cable), or put it
    back; its own loopback stays up."""
    listed = subprocess.run(
        ["ip", "-n", namespace, "-j", "link", "show"], check=True, capture_output=True, text=True
    )
    for link in json.loads(listed.stdout):
        if link["ifname"] != "lo":
            ip("-n", namespace, "link", "set", link["ifname"], "up" if up else "down")
