"""A TCP proxy in front of the real S3 server that cuts one PUT in the middle of its body.

Bytes pass through unchanged (SigV4 signatures stay valid, unlike HeaderStrippingProxy's requests), but the
client-to-server stream is read as HTTP/1.1 requests, one after another on each connection (hyper, under
obstore, never pipelines): the request line, the headers, then Content-Length bytes of body. The ``nth``
PUT whose path matches ``match`` and whose body is at least ``min_bytes`` long is the victim: only
``cut_at`` of its body reaches the server, then both connections are dropped with a TCP RST (SO_LINGER 0),
the server's first, so it sees a body that stops short and never the rest.

``cut_at`` 1 (or more): the whole body reaches the server, and the connections are reset once the server
has answered, its answer never forwarded: the request landed, the client cannot know it (a response lost).

``hold``: after the partial body the proxy waits (``reached`` is set) until the test sets ``go``, so the
test can SIGKILL the server while it holds a half-sent body, at a known point and not by timing.

Every request is recorded in ``requests`` (method, path, Content-Length, body bytes forwarded, cut), so a
test counts what the client did: how many times a cut PUT was sent again, and how far the cut one got. A
request that finds the server down is recorded too (``refused``: its connection reset, nothing forwarded).
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class Request:
    method: str
    path: str
    length: int
    sent: int = 0  # body bytes forwarded to the server
    cut: bool = False
    answered: str = ""  # (a victim with cut_at 1) the status line the server answered before the reset, to no one
    refused: bool = False  # the server was down: the client's connection reset before a byte went on


def _reset(sock: socket.socket) -> None:
    """Close with RST, not FIN: the peer sees "connection reset", as when a host or a middlebox dies."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class CutProxy:
    def __init__(self, upstream: str, match: str = r".", min_bytes: int = 0, nth: int = 1, cut_at: float = 0.5,
                 hold: bool = False):
        u = urlsplit(upstream)
        self.target = (u.hostname, u.port)
        self.match, self.min_bytes, self.nth, self.cut_at, self.hold = re.compile(match), min_bytes, nth, cut_at, hold
        self.requests: list[Request] = []
        self.seen = 0  # PUTs that matched so far
        self.reached, self.go = threading.Event(), threading.Event()
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    # -- what the test reads
    @property
    def victim(self) -> Request | None:
        return next((r for r in self.requests if r.cut), None)

    def puts_of(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == "PUT" and r.path.split("?")[0] == path]

    def close(self) -> None:
        self.closed = True
        self.go.set()
        with contextlib.suppress(OSError):
            self.listener.close()

    # -- the proxy
    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _is_victim(self, req: Request) -> bool:
        if req.method != "PUT" or req.length < self.min_bytes or not self.match.search(req.path):
            return False
        with self.lock:
            self.seen += 1
            return self.seen == self.nth or self.nth == 0  # (0: every one)

    def _serve(self, client: socket.socket) -> None:
        server, buf = None, b""
        swallow, answered = threading.Event(), []  # (cut_at 1) the server's answer, dropped and kept here
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = client.recv(65536)
                    if not data:
                        raise EOFError
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:] if ":" in x)}
                assert "chunked" not in headers.get("transfer-encoding", ""), "only Content-Length bodies are parsed"
                req = Request(method, path, int(headers.get("content-length") or 0))
                self.requests.append(req)
                if server is None:  # connected once the first request is read, so a refused one is counted too
                    try:
                        server = socket.create_connection(self.target, timeout=5)
                    except OSError:  # the server is down: the client's connection is reset
                        req.refused = True
                        _reset(client)
                        return
                    server.settimeout(None)
                    threading.Thread(target=self._pump, args=(server, client, swallow, answered), daemon=True).start()
                server.sendall(head + b"\r\n\r\n")
                victim = self._is_victim(req)
                whole = victim and self.cut_at >= 1
                if whole:
                    swallow.set()  # before its last byte goes: the answer to it must not reach the client
                limit = min(req.length - 1, max(1, int(req.length * self.cut_at))) if victim and not whole \
                    else req.length
                while req.sent < limit:
                    if not buf:
                        buf = client.recv(65536)
                        if not buf:
                            raise EOFError
                    part, buf = buf[:limit - req.sent], buf[limit - req.sent:]
                    server.sendall(part)
                    req.sent += len(part)
                if victim:
                    req.cut = True
                    if whole:
                        for _ in range(300):
                            if answered:
                                break
                            time.sleep(0.1)
                        req.answered = answered[0].split(b"\r\n")[0].decode() if answered else ""
                    self.reached.set()
                    if self.hold:  # the server holds a half body now: the test kills it, then lets us go
                        self.go.wait(120)
                    _reset(server)
                    _reset(client)
                    return
        except (OSError, EOFError, ValueError):
            pass
        for s in (server, client):
            with contextlib.suppress(OSError, AttributeError):
                s.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, swallow: threading.Event, answered: list) -> None:
        """The server's answers back to the client, unparsed (once swallow is set: dropped, kept in answered);
        when either side goes, both do."""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if swallow.is_set():
                    answered.append(data)
                    continue
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
