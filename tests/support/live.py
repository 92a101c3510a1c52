"""Start real HTTP servers (``flask run``, gunicorn) for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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

    Output goes to ``log_path`` so a failing test can show what the server said. With
    ``process_group``, the end stops every process ``args`` started (a shell's children too).
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
                    break
                except (
                    requests.ConnectionError,
                    requests.Timeout,
                ):  # a loaded machine starts slowly
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"server on port {port} did not start in {timeout} s"
                        ) from None
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
            status = (proc / "status").read_text()
        except OSError:
            continue  # exited meanwhile
        parents[int(proc.name)] = int(status.split("PPid:")[1].split()[0])
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
