"""Idle keep-alive connections outlast the clients' pool expiry.

uvicorn closes an idle connection after 5 s by default, exactly when httpx (and so the
openai client) stops reusing one: a request sent as the server closes fails with a
connection error and never reaches the server. bench/load.py met it once in 814 requests.
The server keeps idle connections for CROSSTASK_KEEP_ALIVE_SECONDS (75) instead."""

from __future__ import annotations

import http.client
import time
from urllib.parse import urlsplit

from tests.server import Server

# Longer than uvicorn's default keep-alive and httpx's pool expiry (both 5 s).
IDLE_SECONDS = 6.5


def test_an_idle_connection_is_still_served_after_the_clients_pool_expiry(
    server: Server,
) -> None:
    url = urlsplit(server.base_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
    try:
        conn.request("GET", "/health")
        first = conn.getresponse()
        first.read()
        assert first.status == 200
        assert (first.getheader("connection") or "").lower() != "close"
        sock = conn.sock
        assert sock is not None

        time.sleep(IDLE_SECONDS)

        # On a connection the server had closed, this raises RemoteDisconnected.
        conn.request("GET", "/v1/models", headers=server.headers())
        second = conn.getresponse()
        second.read()
        assert second.status == 200
        assert conn.sock is sock, "the client had to open a new connection"
    finally:
        conn.close()
