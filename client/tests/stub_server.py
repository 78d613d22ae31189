"""A scripted HTTP/1.1 server on 127.0.0.1 for the client's tests.

Each route answers from a queue of actions (the last action repeats): a reply, a closed
connection without an answer, or an event stream that notices when the client goes away.
Every request is recorded with the time it arrived.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional, Union


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict/list -> JSON, str -> text
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Close:
    """Read the request, then close the connection without answering."""


@dataclass
class SSE:
    """Send ``events`` (each a ``data:`` payload: dict -> JSON, str as is).

    With ``forever=True``, keep sending ``filler`` events every ``interval`` seconds (for at
    most ``limit`` seconds) until the client disconnects. With ``drop_after`` set, close the
    connection after that many events without the final ``[DONE]``.
    """

    events: Sequence[Union[dict[str, Any], str]] = field(default_factory=list)
    done: bool = True
    forever: bool = False
    filler: Optional[dict[str, Any]] = None
    interval: float = 0.02
    limit: float = 10.0
    drop_after: Optional[int] = None


Action = Union[Reply, Close, SSE]


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float


class StubServer:
    """Start with ``with StubServer() as stub:``; script with :meth:`on`."""

    def __init__(self, port: int = 0) -> None:
        self._port = port
        self._routes: dict[tuple[str, str], deque[Action]] = {}
        self._lock = threading.Lock()
        self.requests: list[Recorded] = []
        self.disconnected = threading.Event()
        self.streams_finished = threading.Event()
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # -- scripting --------------------------------------------------------------------

    def on(self, method: str, path: str, *actions: Action) -> StubServer:
        with self._lock:
            self._routes[(method, path)] = deque(actions)
        return self

    def _next(self, method: str, path: str) -> Action:
        with self._lock:
            queue = self._routes.get((method, path))
            if not queue:
                return Reply(
                    404,
                    {
                        "error": {
                            "message": f"no route {path}",
                            "type": "NotFound",
                            "param": None,
                            "code": 404,
                        }
                    },
                )
            return queue.popleft() if len(queue) > 1 else queue[0]

    def calls(self, path: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    # -- lifecycle --------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> StubServer:
        stub = self

        class Handler(_Handler):
            server_stub = stub

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def start_later(self, delay: float) -> threading.Thread:
        """Listen on the fixed port after ``delay`` seconds (connection refused till then)."""

        def later() -> None:
            time.sleep(delay)
            self.start()

        thread = threading.Thread(target=later, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _peer_closed(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_stub: StubServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        stub = self.server_stub
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        with stub._lock:
            stub.requests.append(
                Recorded(
                    self.command, self.path, dict(self.headers.items()), body, time.monotonic()
                )
            )
        action = stub._next(self.command, self.path)
        if isinstance(action, Close):
            self.close_connection = True
            return
        if isinstance(action, Reply):
            self._reply(action)
            return
        self._stream(action)

    def _reply(self, action: Reply) -> None:
        if action.delay:
            time.sleep(action.delay)
        if isinstance(action.body, str):
            payload = action.body.encode()
            ctype = "text/plain; charset=utf-8"
        elif action.body is None:
            payload = b""
            ctype = "text/plain"
        else:
            payload = json.dumps(action.body).encode()
            ctype = "application/json"
        self.send_response(action.status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        for key, value in action.headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()

    def _event(self, data: Union[dict[str, Any], str]) -> None:
        text = data if isinstance(data, str) else json.dumps(data)
        self.wfile.write(f"data: {text}\n\n".encode())
        self.wfile.flush()

    def _stream(self, action: SSE) -> None:
        stub = self.server_stub
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.flush()
        try:
            for number, event in enumerate(action.events):
                if action.drop_after is not None and number >= action.drop_after:
                    return
                self._event(event)
                time.sleep(action.interval)
            if action.forever:
                deadline = time.monotonic() + action.limit
                while time.monotonic() < deadline:
                    if _peer_closed(self.connection):
                        stub.disconnected.set()
                        return
                    self._event(action.filler or {})
                    time.sleep(action.interval)
                return
            if action.done:
                self._event("[DONE]")
            stub.streams_finished.set()
        except (BrokenPipeError, ConnectionResetError):
            stub.disconnected.set()
