"""Start real HTTP servers (``flask run``, gunicorn) for end-to-end tests."""

from __future__ import annotations

import fcntl
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


#: Lock files of the ports that a test process holds: one per port, machine-wide.
PORT_LOCKS = Path(tempfile.gettempdir()) / "flask-nachocode-test-ports"
_held_ports: list[Any] = []


def _ports_the_kernel_keeps() -> range:
    """Ports below the kernel's ephemeral range, which it never hands out by itself
    (to a bind to port 0, or as the local port of an outgoing connection)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(10000, max(low, 20000))


def free_port() -> int:
    """A port for a test server that no other test process is handed until this one
    exits. A port freed by a bind to port 0 could be handed to another process (another
    test run on the machine) before the server binds it, and then the tests would talk
    to that process's server: so the port comes from outside the kernel's ephemeral
    range, and a lock file held for the life of this process reserves it."""
    PORT_LOCKS.mkdir(exist_ok=True)
    ports = _ports_the_kernel_keeps()
    while True:
        port = random.choice(ports)
        lock = open(PORT_LOCKS / f"{port}.lock", "a")  # noqa: SIM115 (held until exit)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port))
        except OSError:  # another run holds it, or something listens there
            lock.close()
            continue
        _held_ports.append(lock)
        return port


def _listener_is_ours(pid: int, port: int) -> bool:
    """Whether the socket listening on ``port`` belongs to process ``pid`` or one of
    its children (Linux; elsewhere assumed)."""
    try:
        tables = [Path("/proc/net/tcp").read_text(), Path("/proc/net/tcp6").read_text()]
    except OSError:
        return True
    listening = {
        f"socket:[{fields[9]}]"
        for table in tables
        for fields in (line.split() for line in table.splitlines()[1:])
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A"
    }
    family = {pid} | {
        int(proc.name)
        for proc in Path("/proc").iterdir()
        if proc.name.isdigit() and _parent_of(proc) == pid
    }
    for member in family:
        try:
            if any(os.readlink(fd) in listening for fd in Path(f"/proc/{member}/fd").iterdir()):
                return True
        except OSError:  # exited meanwhile
            continue
    return False


def _parent_of(proc: Path) -> int | None:
    try:
        return int((proc / "status").read_text().split("PPid:")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


@contextmanager
def live_server(
    args: list[str],
    *,
    port: int,
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    ready_path: str = "/",
    timeout: float = 30.0,
    cwd: Path = ROOT,
    process_group: bool = False,
) -> Iterator[str]:
    """Run ``args`` (a server listening on ``port``) until the block ends; yield its base URL.

    Output goes to ``log_path`` so a failing test can show what the server said. It is
    ready once it answers *and* holds the listening socket itself: another process
    answering on ``port`` is never taken for it. With ``process_group``, the end stops
    every process ``args`` started (a shell's children too).
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with ExitStack() as closing:
        log = closing.enter_context(open(log_path, "wb")) if log_path else subprocess.DEVNULL
        process = subprocess.Popen(
            args,
            cwd=cwd,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=process_group,
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    output = log_path.read_text(errors="replace") if log_path else ""
                    raise RuntimeError(f"server exited with {process.returncode}:\n{output}")
                try:
                    requests.get(base_url + ready_path, timeout=1)
                    if _listener_is_ours(process.pid, port):
                        break
                    stranger = True  # it will fail to bind and exit, or time out below
                except (
                    requests.ConnectionError,
                    requests.Timeout,
                ):  # a loaded machine starts slowly
                    stranger = False
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"another process answers on port {port}"
                        if stranger
                        else f"server on port {port} did not start in {timeout} s"
                    )
                time.sleep(0.1)
            yield base_url
        finally:
            stop = (
                (lambda sig: os.killpg(process.pid, sig)) if process_group else process.send_signal
            )
            stop(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                stop(signal.SIGKILL)
                process.wait()


def flask_run_args(app: str, port: int) -> list[str]:
    return [str(BIN / "flask"), "--app", app, "run", "--port", str(port), "--no-reload"]


def gunicorn_args(app: str, port: int, workers: int) -> list[str]:
    return [
        str(BIN / "gunicorn"),
        "--workers",
        str(workers),
        "--bind",
        f"127.0.0.1:{port}",
        "--worker-class",
        "sync",
        "--timeout",
        "60",
        app,
    ]


def worker_pids(port: int) -> list[int]:
    """The gunicorn workers serving ``port``: the children of the master listening there."""
    parents: dict[int, int] = {}
    matching: list[int] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue  # exited meanwhile
        parent = _parent_of(proc)
        if parent is None:
            continue
        parents[int(proc.name)] = parent
        if b"gunicorn" in cmdline and f"127.0.0.1:{port}".encode() in cmdline:
            matching.append(int(proc.name))
    # Workers carry the master's command line too: the master is the one whose parent does not.
    masters = {pid for pid in matching if parents[pid] not in matching}
    return sorted(pid for pid in matching if parents[pid] in masters)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")
