"""What `crosstask serve` checks and claims before the engine starts, and how it leaves when
it cannot serve: under a supervisor (Kubernetes, Docker's restart policy) a server that
stays up but will never serve is the worst case, so every start-up failure exits non-zero
within seconds, with its cause as the last line of the log."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import socket
import sys

from serve.errors import StartupError

log = logging.getLogger("crosstask")

SHM_PATH = "/dev/shm"
# vLLM's engine and its worker talk through two shared-memory rings of 10 chunks each
# (vllm/distributed/device_communicators/shm_broadcast.py, multiproc_executor.py): the
# engine's, of VLLM_MQ_MAX_CHUNK_BYTES_MB chunks, and the worker's replies, of 24 MiB
# chunks that no setting changes. The CPU platform always runs the worker apart.
MQ_CHUNKS = 10
MQ_CHUNK_ENV = "VLLM_MQ_MAX_CHUNK_BYTES_MB"
MQ_CHUNK_MB_DEFAULT = 16
REPLY_CHUNK_MB = 24
# Room left for everything else in /dev/shm (torch, other segments).
SHM_MARGIN_MB = 16


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound now: a port already in use is a clear error
    before anything slow starts, not a bind failure after the engine began loading."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def shared_memory_needed_mb() -> int:
    chunk_mb = int(os.environ.get(MQ_CHUNK_ENV, MQ_CHUNK_MB_DEFAULT))
    return (chunk_mb + REPLY_CHUNK_MB) * MQ_CHUNKS + SHM_MARGIN_MB


def check_shared_memory(shm_path: str = SHM_PATH) -> None:
    """Fail at once, saying what to do, when /dev/shm cannot hold the engine's queues:
    Docker gives a container 64 MiB, and vLLM would otherwise fail deep inside its
    worker's start, with the cause only in the worker's own log lines."""
    if not os.path.isdir(shm_path):
        return
    free_mb = shutil.disk_usage(shm_path).free // (1 << 20)
    need_mb = shared_memory_needed_mb()
    if free_mb < need_mb:
        raise StartupError(
            f"{shm_path} has {free_mb} MiB free and the engine needs about {need_mb} MiB of "
            "shared memory: give the container more (docker run --shm-size=1g; on "
            "Kubernetes a memory emptyDir on /dev/shm, as deploy/ sets up)"
        )


def exit_now(code: int, cause: str) -> None:
    """Leave at once: stop the engine's processes, say why on the last line, exit `code`.
    Threads still loading the engine would otherwise keep the process alive (Python waits
    for them at exit) long after the failure."""
    for child in multiprocessing.active_children():
        child.terminate()
    for child in multiprocessing.active_children():
        child.join(timeout=2)
        if child.is_alive():
            child.kill()
    logging.shutdown()
    # One line, however many the cause has (pydantic's errors have several): supervisors
    # and `kubectl logs --tail=1` show the last line.
    print(f"crosstask serve: error: {' '.join(cause.split())}", file=sys.stderr, flush=True)
    os._exit(code)
