"""The one start-up path: from the settings to a started engine, demonstration store and
router. The HTTP app (serve/api/app.py) and `crosstask batch` both start through here;
each step is a callable so that unit tests can put fakes in its place."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from retrieval.retriever import EmbeddingCache, Retriever, open_replica
from routing.router import RouterConfig
from routing.service import RoutingService, build_routing, default_library
from serve.default_model import ensure_default_model
from serve.defaults import default_store_dir
from serve.engine.engine import Engine, import_engine_libraries
from serve.engine.types import EngineConfig
from serve.errors import StartupError
from serve.settings import DEFAULT_MODEL_NAME, Settings

log = logging.getLogger("crosstask")

EngineStarter = Callable[[EngineConfig], Engine]
RetrieverOpener = Callable[[], Retriever | None]
# Builds the adapter registry and router once the engine (which serves the LoRAs and drops
# evicted merges) and the retriever (whose embedder the router shares) exist.
RoutingOpener = Callable[[Engine, Retriever | None], RoutingService | None]


@dataclass
class Runtime:
    """What a process serves with, once started."""

    engine: Engine
    retriever: Retriever | None
    routing: RoutingService | None

    async def close(self) -> None:
        if self.retriever is not None:
            await self.retriever.close()
        self.engine.shutdown()


@dataclass(frozen=True)
class Startup:
    """The steps that build a Runtime; `from_settings` gives the real ones."""

    engine_config: EngineConfig
    start_engine: EngineStarter = Engine.start
    open_retriever: RetrieverOpener = lambda: None
    open_routing: RoutingOpener = lambda engine, retriever: None
    import_libraries: Callable[[], None] = import_engine_libraries

    @classmethod
    def from_settings(cls, settings: Settings, *, batch: bool = False) -> Startup:
        """The real steps. A batch job reads the store as a read-only replica that never
        reloads: the snapshot CURRENT names when it starts (or a flat store)."""
        config = engine_config(settings)
        return cls(
            engine_config=config,
            open_retriever=retriever_opener(settings, batch=batch),
            open_routing=routing_opener(settings, config),
        )

    async def start(self) -> Runtime:
        """Load the engine and open the store at once (the engine compiles for a while),
        then the router, which needs both. On failure, what was opened is closed again."""
        await asyncio.to_thread(self.import_libraries)
        engine_task = asyncio.create_task(asyncio.to_thread(self.start_engine, self.engine_config))
        retriever: Retriever | None = None
        try:
            retriever = await asyncio.to_thread(self.open_retriever)
            if retriever is not None:
                # Snapshot publishing (the store's writer) or following (a read-only replica).
                retriever.start()
            engine = await engine_task
        except BaseException:
            if retriever is not None:
                await retriever.close()
            _shut_down_when_started(engine_task)
            raise
        try:
            routing = await asyncio.to_thread(self.open_routing, engine, retriever)
        except BaseException:
            await Runtime(engine, retriever, None).close()
            raise
        return Runtime(engine, retriever, routing)


def _shut_down_when_started(engine_task: asyncio.Task[Engine]) -> None:
    """An engine still loading when start-up failed (or was cancelled) is shut down once it
    is up, so that its processes do not outlive the failure; nothing waits for it."""

    def shut_down(task: asyncio.Task[Engine]) -> None:
        if not task.cancelled() and task.exception() is None:
            task.result().shutdown()

    engine_task.add_done_callback(shut_down)


def engine_config(settings: Settings) -> EngineConfig:
    if settings.model is None:
        model_dir = ensure_default_model(settings.home_dir)
        name = settings.served_model_name or DEFAULT_MODEL_NAME
        log.info("Model: the embedded SmolLM2-135M-Instruct, from %s", model_dir)
    else:
        model_dir = settings.model.expanduser().resolve()
        if not (model_dir / "config.json").is_file():
            raise StartupError(
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
        enable_lora=adapters_dir(settings) is not None,
        max_loras=settings.max_loras,
        max_cpu_loras=max(settings.max_cpu_loras, settings.max_loras),
        max_lora_rank=settings.max_lora_rank,
        enable_fusion=settings.fusion_enabled,
    )


def adapters_dir(settings: Settings) -> Path | None:
    """--adapters, else the default library shipped with crosstask (None: no LoRA)."""
    if not settings.adapters_enabled:
        return None
    if settings.adapters is not None:
        folder = settings.adapters.expanduser().resolve()
        if not folder.is_dir():
            raise StartupError(f"--adapters {folder}: no such folder")
        return Path(folder)
    return default_library()


def store_dir(settings: Settings) -> Path | None:
    """--store, else the default store under CROSSTASK_HOME when built (None: serve
    without demonstrations)."""
    if settings.store is not None:
        store = settings.store.expanduser().resolve()
        if not store.is_dir():
            raise StartupError(
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


def retriever_opener(settings: Settings, *, batch: bool = False) -> RetrieverOpener:
    folder = store_dir(settings)

    def open_store() -> Retriever | None:
        if folder is None:
            return None
        if batch:
            replica = open_replica(folder, settings.embedder, read_only=True)
            replica.cache = EmbeddingCache(settings.embedding_cache_size)
            return replica
        read_only = settings.store_readonly
        if not read_only and not writable(folder):
            # A store baked into an image is root's; the server runs as another user.
            log.warning(
                "The store %s is not writable by this user: serving it read-only "
                "(POST /v1/demonstrations is refused; mount a writable copy to add to it)",
                folder,
            )
            read_only = True
        retriever = open_replica(
            folder,
            settings.embedder,
            read_only=read_only,
            publish=settings.store_publish_snapshots,
            reload_seconds=settings.store_reload_seconds,
            grace_seconds=settings.store_snapshot_grace_seconds,
        )
        retriever.cache = EmbeddingCache(settings.embedding_cache_size)
        if not read_only:
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

    return open_store


def routing_opener(settings: Settings, config: EngineConfig) -> RoutingOpener:
    """Registry, router and merge cache over the adapters folder (None: LoRA off)."""
    root = adapters_dir(settings)

    def open_routing(engine: Engine, retriever: Retriever | None) -> RoutingService | None:
        if root is None:
            return None
        router = RouterConfig(
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
            config.model_dir,
            config.served_name,
            merge_dir(settings),
            router,
            settings.max_lora_rank,
            settings.merge_cache_size,
            retriever.embedder.name if retriever is not None else None,
            on_evict=engine.remove_lora,
        )

    return open_routing


def writable(path: Path) -> bool:
    """Whether this process may create files in `path`, or in the nearest folder above it
    that exists when it does not exist yet."""
    for folder in (path, *path.parents):
        if folder.exists():
            return os.access(folder, os.W_OK | os.X_OK)
    return False


def merge_dir(settings: Settings) -> Path:
    """Where merged adapters are cached: under CROSSTASK_HOME, or in the temporary folder
    when that is read-only (an image's baked defaults under a read-only root)."""
    preferred = settings.home_dir / "merges"
    if writable(preferred):
        return preferred
    fallback = Path(tempfile.gettempdir()) / f"crosstask-merges-{os.getuid()}"
    log.info("%s is not writable: merged adapters are cached in %s", preferred, fallback)
    return fallback
