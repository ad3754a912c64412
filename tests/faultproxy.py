"""A TCP proxy on loopback that forwards to a real server and injects network faults.

    proxy = FaultProxy(dovecot.host, dovecot.port); proxy.start()
    proxy.cut_after(40_000)    # the next connections close after 40 kB from the server
    proxy.stall_after(0)       # … or stop forwarding (the server "stops answering")
    proxy.heal()               # forward normally again (also ends a stall)
    proxy.stop()

Faults apply to the bytes the server sends (server → client), counted per connection from
the moment the fault was armed, so "cut mid-FETCH" is a byte count into the session.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from dataclasses import dataclass

LOOPBACK = "127.0.0.1"
CHUNK = 16384


@dataclass
class _Fault:
    kind: str  # "" | "cut" | "stall"
    after: int = 0


class FaultProxy:
    """Forwards 127.0.0.1:port to upstream; cuts or stalls connections on demand."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = LOOPBACK
        self.port = 0
        self.connections = 0  # accepted so far
        self.cuts = 0  # connections closed by a cut
        self.stalls = 0  # connections that stalled
        self._fault = _Fault("")
        self._generation = 0  # bumped by every change of fault
        self._lock = threading.Lock()
        self._healed = threading.Condition(self._lock)
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._stopping = False

    # -- control ------------------------------------------------------------------------

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, 0))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, daemon=True, name="faultproxy").start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._healed.notify_all()
            sockets = list(self._open)
        if self._listener is not None:
            self._listener.close()
        for sock in sockets:
            _close(sock)

    def cut_after(self, n: int) -> None:
        """Close each connection once the server has sent n more bytes on it."""
        self._set(_Fault("cut", n))

    def stall_after(self, n: int) -> None:
        """Stop forwarding (both ways) once the server has sent n more bytes."""
        self._set(_Fault("stall", n))

    def heal(self) -> None:
        self._set(_Fault(""))

    def _set(self, fault: _Fault) -> None:
        with self._lock:
            self._fault = fault
            self._generation += 1
            self._healed.notify_all()

    # -- forwarding ---------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self.connections += 1
                self._open.update((client, server))
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        sent_down, generation = 0, -1
        try:
            while not self._stopping:
                with self._lock:
                    fault, gen = self._fault, self._generation
                if gen != generation:  # a new fault counts from now
                    generation, sent_down = gen, 0
                if fault.kind == "stall" and sent_down >= fault.after:
                    self._stall(gen)
                    continue
                readable, _, _ = select.select([client, server], [], [], 0.1)
                for sock in readable:
                    data = sock.recv(CHUNK)
                    if not data:
                        return
                    if sock is client:
                        server.sendall(data)
                        continue
                    room = fault.after - sent_down if fault.kind else len(data)
                    if fault.kind and len(data) >= room:
                        client.sendall(data[: max(room, 0)])
                        sent_down += max(room, 0)
                        if fault.kind == "cut":
                            with self._lock:
                                self.cuts += 1
                            return
                        break  # stall from here on
                    client.sendall(data)
                    sent_down += len(data)
        except OSError:
            return
        finally:
            with self._lock:
                self._open.discard(client)
                self._open.discard(server)
            _close(client)
            _close(server)

    def _stall(self, generation: int) -> None:
        """Hold the connection, forwarding nothing, until the fault changes or we stop."""
        with self._lock:
            self.stalls += 1
            while not self._stopping and self._generation == generation:
                self._healed.wait(0.5)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
