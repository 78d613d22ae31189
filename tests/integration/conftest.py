"""The suite's one real server: `crosstask serve` as a subprocess, with the real vLLM engine
and the embedded default model, API keys on. Tests talk to it over HTTP only."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

MODEL = "smollm2-135m-instruct"
STARTUP_TIMEOUT_S = 300


@dataclass
class Server:
    base_url: str
    api_key: str
    admin_key: str
    model: str
    model_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.api_key}"}

    def metric(self, name: str) -> float:
        """The value of an unlabelled metric sample from /metrics."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        match = re.search(rf"^{re.escape(name)} ([0-9.eE+-]+)$", text, re.MULTILINE)
        if match is None:
            raise AssertionError(f"metric {name} not in /metrics")
        return float(match.group(1))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _crosstask_home() -> Path:
    return Path(os.environ.get("CROSSTASK_HOME", "~/.cache/crosstask")).expanduser()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from serve.default_model import prepare_default_model

    return prepare_default_model(_crosstask_home())


@pytest.fixture(scope="session")
def store_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the default store: the tests write to it, the user's stays as built."""
    from serve.prepare import prepare_defaults

    defaults = prepare_defaults(_crosstask_home())
    copy = tmp_path_factory.mktemp("store") / "store"
    shutil.copytree(defaults.store_dir, copy, ignore=shutil.ignore_patterns("LOCK"))
    return copy


# The test adapter library: random LoRAs (no training), with prototypes placed on the
# embeddings of these task definitions so that `auto` routes predictably.
ADAPTER_TASKS = {
    "alpha": ("specialist", "Translate the English sentence into French.", 4),
    "beta": ("specialist", "Solve the arithmetic problem and answer with a number.", 8),
    "general": ("generalist", "Follow the instruction and answer the question.", 4),
}


@pytest.fixture(scope="session")
def adapters_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from retrieval.embedder import Embedder
    from retrieval.query import QUERY_TEXT_VERSION, query_text
    from routing.adapter_meta import AdapterMeta, Prototype, base_signature, write_meta
    from tests.integration.lora_fixtures import make_random_lora

    root = tmp_path_factory.mktemp("adapters")
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    embedder = Embedder(num_threads=1)
    signature = base_signature(model_dir)
    for seed, (name, (kind, definition, rank)) in enumerate(ADAPTER_TASKS.items()):
        folder = make_random_lora(model_dir, root / name, rank=rank, seed=seed + 1, base_model=base)
        vector = embedder.encode_one(query_text(definition, "")).tolist()
        write_meta(
            folder,
            AdapterMeta(
                name=name,
                kind=kind,  # type: ignore[arg-type]
                tasks=[f"task_{name}"] if kind == "specialist" else ["task_alpha", "task_beta"],
                rank=rank,
                base_model=signature,
                prototype=Prototype(embedder.name, QUERY_TEXT_VERSION, [vector], [1]),
            ),
        )
    # A plain PEFT adapter: servable by name, never routed to.
    make_random_lora(model_dir, root / "plain", rank=4, seed=9, base_model=base)
    return root


@pytest.fixture(scope="session")
def server(
    model_dir: Path, store_dir: Path, adapters_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ)
    env.update(
        CROSSTASK_HOME=str(_crosstask_home()),
        CROSSTASK_API_KEYS="test-key-1,test-key-2",
        CROSSTASK_ADMIN_KEY="test-admin-key",
        CROSSTASK_STORE=str(store_dir),
        # The session server is also the writer that tests/integration/test_store_replicas.py
        # reads snapshots from.
        CROSSTASK_STORE_PUBLISH_SNAPSHOTS="true",
        CROSSTASK_ADAPTERS=str(adapters_dir),
        # Clear thresholds for the crafted prototypes above (the defaults are calibrated
        # on the dev tasks for the real library).
        CROSSTASK_ROUTER_SINGLE_MIN="0.6",
        CROSSTASK_ROUTER_MERGE_MIN="0.3",
        CROSSTASK_ROUTER_SINGLE_MARGIN="0.1",
        # Requests that do not ask for demonstrations get none, so the base-model tests
        # compare like with like; retrieval tests ask explicitly.
        CROSSTASK_DEFAULT_K="0",
    )
    command = [
        sys.executable,
        "-m",
        "serve.cli",
        "serve",
        "--port",
        str(port),
        # Eager mode starts in ~20 s instead of ~60 s; speed is measured in bench/.
        "--enforce-eager",
        "--max-model-len",
        "2048",
        "--kv-cache-gb",
        "1",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}"
                )
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield Server(
            base_url=base_url,
            api_key="test-key-1",
            admin_key="test-admin-key",
            model=MODEL,
            model_dir=model_dir,
            process=process,
            log_path=log_path,
        )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def openai_client(server: Server):  # type: ignore[no-untyped-def]
    import openai

    return openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))
