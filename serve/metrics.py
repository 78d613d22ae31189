"""Prometheus metrics, one registry per app (no process-global collectors, so tests can
build several apps in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60)


class _CounterReader:
    """A counter whose value is kept elsewhere (the engine) and read at scrape time."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.read: Callable[[], int] = lambda: 0

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, value=float(self.read()))

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "crosstask_requests",
            "HTTP requests by route template and status code.",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "crosstask_request_latency_seconds",
            "End-to-end HTTP request latency (to the last byte of the response).",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "crosstask_time_to_first_token_seconds",
            "Time from receiving a generation request to its first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "crosstask_prompt_tokens", "Prompt tokens of finished generation requests.", registry=r
        )
        self.completion_tokens = Counter(
            "crosstask_completion_tokens",
            "Generated tokens of finished or aborted generation requests.",
            registry=r,
        )
        self.aborted = Counter(
            "crosstask_requests_aborted",
            "Generation requests aborted before they finished (client gone, shutdown).",
            registry=r,
        )
        self.running = Gauge(
            "crosstask_requests_running",
            "Requests the engine is running (in its batch) now.",
            registry=r,
        )
        self.waiting = Gauge(
            "crosstask_requests_waiting",
            "Requests queued in the engine, not yet running.",
            registry=r,
        )
        self.embedding_latency = Histogram(
            "crosstask_embedding_latency_seconds",
            "Getting a query's embedding: from the cache, or encoded with concurrent ones.",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
            registry=r,
        )
        self.retrieval_latency = Histogram(
            "crosstask_retrieval_latency_seconds",
            "Searching the demonstration store with a request's query embedding.",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
            registry=r,
        )
        self.demonstrations = Histogram(
            "crosstask_demonstrations_per_request",
            "Demonstrations placed in a request's prompt (requests that retrieved any).",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
            registry=r,
        )
        self.demonstration_prompt_tokens = Histogram(
            "crosstask_demonstration_prompt_tokens",
            "Prompt tokens the demonstrations added to a request (requests with any): what "
            "retrieval costs in prefill, before the prefix cache.",
            buckets=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
            registry=r,
        )
        self._embedding_cache_hits = _CounterReader(
            "crosstask_embedding_cache_hits",
            "Query texts whose embedding came from the embedding cache.",
        )
        self._embedding_cache_misses = _CounterReader(
            "crosstask_embedding_cache_misses",
            "Query texts that were not in the embedding cache (embedded, or joined an encode "
            "already under way).",
        )
        # vLLM's own prefix-cache counters (vllm:prefix_cache_queries and _hits), in
        # prompt tokens: hits / queries is the share of prefill the cache saved.
        self._prefix_cache_queries = _CounterReader(
            "crosstask_prefix_cache_queries",
            "Prompt tokens looked up in the engine's prefix cache (vLLM's prefix_cache_queries).",
        )
        self._prefix_cache_hits = _CounterReader(
            "crosstask_prefix_cache_hits",
            "Prompt tokens found in the engine's prefix cache, not computed again (vLLM's "
            "prefix_cache_hits).",
        )
        for reader in (
            self._embedding_cache_hits,
            self._embedding_cache_misses,
            self._prefix_cache_queries,
            self._prefix_cache_hits,
        ):
            r.register(reader)
        # Per pod: a read-only replica counts the snapshot it serves, so one that lags
        # behind the writer shows.
        self.store_size = Gauge(
            "crosstask_store_size",
            "Demonstrations in the store (on a read-only replica: in the snapshot it serves).",
            registry=r,
        )
        self.routing_requests = Counter(
            "crosstask_routing_requests",
            "Generation requests by the routing mode served (off, adapter, merge, fuse).",
            ["mode"],
            registry=r,
        )
        self.adapter_requests = Counter(
            "crosstask_adapter_requests",
            "Generation requests served with each adapter (alone or in a merge).",
            ["adapter"],
            registry=r,
        )
        self.merge_cache_hits = Counter(
            "crosstask_merge_cache_hits", "Merged adapters found in the merge cache.", registry=r
        )
        self.merge_cache_misses = Counter(
            "crosstask_merge_cache_misses", "Merged adapters built on demand.", registry=r
        )
        self.merge_build_seconds = Histogram(
            "crosstask_merge_build_seconds",
            "Building one merged adapter (load, merge, write).",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.fused_requests = Counter(
            "crosstask_fused_requests",
            "Requests served by logit fusion (routing.mode fuse).",
            registry=r,
        )
        self.fused_steps = Counter(
            "crosstask_fused_steps",
            "Decoding steps of fusion groups (one fused token each).",
            registry=r,
        )
        self.adapters_loaded = Gauge(
            "crosstask_adapters_loaded", "Adapters registered with the server.", registry=r
        )
        self.engine_ready = Gauge(
            "crosstask_engine_ready", "1 once the engine serves requests, else 0.", registry=r
        )
        self._preemptions = _CounterReader(
            "crosstask_engine_preemptions",
            "Requests the engine preempted because its KV cache was full, counted when they run "
            "again (recomputed); one aborted while preempted is not. A steady rise means the "
            "cache is too small for the load.",
        )
        r.register(self._preemptions)

    def track_engine_load(
        self,
        load: Callable[[], tuple[int, int]],
        preemptions: Callable[[], int],
        prefix_cache: Callable[[], tuple[int, int]] = lambda: (0, 0),
    ) -> None:
        """Read (running, waiting), the preemptions and the prefix cache's (queries, hits)
        from the engine at scrape time rather than on every step."""
        self.running.set_function(lambda: float(load()[0]))
        self.waiting.set_function(lambda: float(load()[1]))
        self._preemptions.read = preemptions
        self._prefix_cache_queries.read = lambda: prefix_cache()[0]
        self._prefix_cache_hits.read = lambda: prefix_cache()[1]

    def track_embedding_cache(self, counts: Callable[[], tuple[int, int]]) -> None:
        """Read the embedding cache's (hits, misses) at scrape time."""
        self._embedding_cache_hits.read = lambda: counts()[0]
        self._embedding_cache_misses.read = lambda: counts()[1]
