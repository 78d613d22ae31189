"""The session's real server, shared by tests/integration and tests/reliability:
`crosstask serve` with the real vLLM engine and the embedded default model, API keys on,
a store of the project's test demonstrations and a small test adapter library. Tests talk
to it over HTTP only (tests/server.py starts it)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import Server, crosstask_home, launch, stop

# The image tests need a Docker engine and a built image: `make image-test` runs them.
collect_ignore = [] if os.environ.get("CROSSTASK_IMAGE") else ["image"]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from serve.default_model import ensure_default_model

    return ensure_default_model(crosstask_home())


# The project's own demonstrations for tests: a dozen small tasks, written for them.
TEST_DEMONSTRATIONS = Path(__file__).parent / "data" / "demonstrations.jsonl"


@pytest.fixture(scope="session")
def store_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store built from TEST_DEMONSTRATIONS by the real build path and embedder (what
    `crosstask store build --from` does); the tests write to it. Not the default store:
    that one needs BIG-bench, which a fresh machine may not be able to get."""
    from retrieval.sources import read_jsonl_tasks
    from serve.defaults import build_task_store

    tasks = read_jsonl_tasks(TEST_DEMONSTRATIONS)
    out = tmp_path_factory.mktemp("store") / "store"
    build_task_store(
        out=out,
        source=tasks,
        tasks=tasks.names(),
        exclude=[],
        per_task=None,
        home=crosstask_home(),
        embedder_dir=None,
        seed=0,
        overwrite=False,
        source_name=TEST_DEMONSTRATIONS.name,
    )
    return out


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
    env = dict(os.environ)
    env.update(
        CROSSTASK_HOME=str(crosstask_home()),
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
        # Requests that do not ask for demonstrations get none (the default gate is shut),
        # so the base-model tests compare like with like; retrieval tests ask explicitly,
        # or send a min_score of their own to open it.
        CROSSTASK_DEMO_MIN_SCORE="1",
    )
    started = launch(
        tmp_path_factory.mktemp("server") / "server.log",
        env,
        ["--enforce-eager", "--max-model-len", "2048", "--kv-cache-gb", "1"],
        model_dir,
        api_key="test-key-1",
        admin_key="test-admin-key",
    )
    try:
        yield started
    finally:
        stop(started.process)


@pytest.fixture(scope="session")
def openai_client(server: Server):  # type: ignore[no-untyped-def]
    import openai

    return openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))
