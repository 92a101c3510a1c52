"""A real TCP proxy in a thread, to take a database or a broker away from an app and give
it back without touching the server (other test runs share it)."""

from __future__ import annotations

import socket
import threading
from typing import Any


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``target``.

    ``cut()`` drops every open connection and closes each new one at once, as a
    database that went away does; ``silence()`` keeps every connection open and
    accepts new ones but forwards nothing more either way, as a server that hangs
    (or a network that drops packets) does; ``restore()`` forwards again. Use as a
    context manager.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._cut = threading.Event()
        self._silent = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._closing.set()
        self._thread.join()
        self._listener.close()
        self._drop_all()

    def cut(self) -> None:
        self._cut.set()
        self._drop_all()

    def silence(self) -> None:
        self._silent.set()

    def restore(self) -> None:
        self._cut.clear()
        self._silent.clear()

    def _drop_all(self) -> None:
        with self._lock:
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            if self._cut.is_set():
                client.close()
                continue
            if self._silent.is_set():
                with self._lock:
                    self._open.add(client)  # held open, never answered
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                if not self._silent.is_set():
                    sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
