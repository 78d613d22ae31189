"""bench/load.py's adapter traffic, in pieces and without a server: the plan built from the
adapters a server lists, the request mix, what each adapter kind actually sends (through
the openai client, to a mock transport), the routing check on the answers, and the report
built from /metrics counters."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import openai
import openai._base_client
import pytest

LOAD_PY = Path(__file__).resolve().parents[3] / "bench" / "load.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_load_under_test", LOAD_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


load = _load()
ADAPTERS = ["alpha", "beta", "gamma", "delta"]
# The HTTP library of the installed openai client: httpx up to 1.x, its fork httpx2 after.
HTTP: Any = vars(openai._base_client).get("httpx2") or vars(openai._base_client)["httpx"]


def normalized(weights: list[float]) -> tuple[float, ...]:
    return tuple(round(w / sum(weights), 6) for w in weights)


def test_plan_uses_a_few_adapters_and_distinct_merges() -> None:
    plan = load.plan_adapter_traffic(ADAPTERS, "0badcafe")
    assert plan.enabled and not plan.note
    assert [t.model for t in plan.named] == ADAPTERS[: load.MAX_ADAPTERS]
    assert all(t.routing is None and t.expect_mode == "adapter" for t in plan.named)
    assert [t.model for t in plan.auto] == ["auto"] and plan.auto[0].expect_mode is None

    merges = [t.routing for t in plan.merges]
    assert all(m["mode"] == "merge" and len(m["adapters"]) == 2 for m in merges)
    keys = {(tuple(m["adapters"]), normalized(m["weights"])) for m in merges}
    # Distinct merges (so that the first use of each misses), and few enough for the
    # server's merge cache (16 by default) to keep them all (so that repeats hit).
    assert len(keys) == len(merges) == load.MAX_MERGE_PAIRS * (len(load.MERGE_WEIGHTS) + 1)
    assert len(keys) <= 16
    assert len({t.label for t in plan.merges}) == len(plan.merges)


def test_every_run_adds_a_merge_weight_no_earlier_vector_has() -> None:
    fixed = {normalized(list(w)) for w in load.MERGE_WEIGHTS}
    seen = set()
    for run in (f"{i:08x}" for i in range(0, 4000, 7)):
        weights = load.fresh_weights(run)
        assert normalized(list(weights)) not in fixed
        assert 0.3 < weights[0] < 0.7 and abs(sum(weights) - 1) < 1e-9
        seen.add(weights)
    assert len(seen) > 10


def test_no_adapters_or_one_or_off() -> None:
    none = load.plan_adapter_traffic([], "run")
    assert not none.enabled and "no adapters" in none.note
    assert load.adapter_kinds(none) == []

    one = load.plan_adapter_traffic(["solo"], "run")
    assert one.enabled and not one.merges and "no merge" in one.note
    assert {k.name for k in load.adapter_kinds(one)} == {
        "chat_adapter",
        "completion_adapter_stream",
        "chat_auto",
        "chat_auto_stream",
    }

    off = load.plan_adapter_traffic(ADAPTERS, "run", enabled=False)
    assert not off.enabled and "--no-adapters" in off.note


def test_the_mix_gives_adapter_traffic_its_share_and_keeps_the_base_kinds() -> None:
    base = load.base_kinds()
    extra = load.adapter_kinds(load.plan_adapter_traffic(ADAPTERS, "run"))
    for share in (0.1, 0.3, 0.5):
        kinds = load.mix(base, extra, share)
        assert [(k.name, k.weight) for k in kinds[: len(base)]] == [
            (k.name, k.weight) for k in base
        ]
        added = sum(k.weight for k in kinds[len(base) :])
        assert added / sum(k.weight for k in kinds) == pytest.approx(share, abs=1e-3)
    assert load.mix(base, extra, 0.0) == base
    assert load.mix(base, [], 0.3) == base
    with pytest.raises(ValueError):
        load.mix(base, extra, 1.0)


# -- what the kinds send, through the real openai client -----------------------------------


class FakeServer:
    """Answers chat and completion requests, streamed or not, with a routing annotation
    (what the request asked for, unless `served` says otherwise)."""

    def __init__(self, served: dict[str, Any] | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self.served = served

    def annotation(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.served is not None:
            return self.served
        routing = body.get("crosstask", {}).get("routing")
        if routing is not None:
            weights = routing["weights"]
            adapters = [
                {"name": n, "weight": w / sum(weights)}
                for n, w in zip(routing["adapters"], weights, strict=True)
            ]
            return {"mode": routing["mode"], "adapters": adapters}
        if body["model"] == "auto":
            return {"mode": "adapter", "adapters": [{"name": "beta", "weight": 1.0}]}
        if body["model"] != load.MODEL:
            return {"mode": "adapter", "adapters": [{"name": body["model"], "weight": 1.0}]}
        return {"mode": "off", "adapters": []}

    def __call__(self, request: Any) -> Any:
        body = json.loads(request.content)
        self.requests.append(body)
        chat = request.url.path.endswith("/chat/completions")
        n = body["max_tokens"]
        crosstask = {"demonstrations": [], "routing": self.annotation(body)}
        usage = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}
        common = {"id": "r-1", "created": 0, "model": body["model"]}
        if not body.get("stream"):
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": "w " * n}
            else:
                choice["text"] = "w " * n
            obj = "chat.completion" if chat else "text_completion"
            reply = {**common, "object": obj, "choices": [choice], "usage": usage}
            return HTTP.Response(200, json={**reply, "crosstask": crosstask})
        obj = "chat.completion.chunk" if chat else "text_completion"
        events = []
        for i in range(n):
            last = i == n - 1
            finish = "length" if last else None
            if chat:
                delta = {"index": 0, "delta": {"content": "w "}, "finish_reason": finish}
            else:
                delta = {"index": 0, "text": "w ", "finish_reason": finish, "logprobs": None}
            events.append({**common, "object": obj, "choices": [delta]})
        events.append(
            {**common, "object": obj, "choices": [], "usage": usage, "crosstask": crosstask}
        )
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return HTTP.Response(200, text=text, headers={"content-type": "text/event-stream"})


def send_all(server: FakeServer, kinds: list[Any], seqs: range) -> list[Any]:
    async def go() -> list[Any]:
        http_client = HTTP.AsyncClient(transport=HTTP.MockTransport(server))
        client = openai.AsyncOpenAI(
            base_url="http://load.test/v1", api_key="k", http_client=http_client, max_retries=0
        )
        ctx = {"run": "abcd1234", "crosstask": {"demonstrations": {"k": 4}}}
        try:
            return [await kind.send(client, seq, ctx) for kind in kinds for seq in seqs]
        finally:
            await client.close()

    return asyncio.run(go())


def test_adapter_kinds_send_adapter_models_merges_and_auto() -> None:
    plan = load.plan_adapter_traffic(ADAPTERS[:2], "abcd1234")
    kinds = load.adapter_kinds(plan)
    server = FakeServer()
    outcomes = send_all(server, kinds, range(len(plan.merges)))

    assert all(o.status == "ok" for o in outcomes), [(o.kind, o.status, o.detail) for o in outcomes]
    sent = dict(zip([(o.kind, o.seq) for o in outcomes], server.requests, strict=True))
    for (kind, seq), body in sent.items():
        # Retrieval stays on for every kind; every request asks for its own length.
        assert body["crosstask"]["demonstrations"] == {"k": 4}
        assert body["ignore_eos"] is True and body["max_tokens"] == 8 + seq % 17
        if "adapter" in kind:
            assert body["model"] == ADAPTERS[seq % 2] and "routing" not in body["crosstask"]
        elif "merge" in kind:
            assert body["model"] == load.MODEL
            assert body["crosstask"]["routing"] == plan.merges[seq].routing
        else:
            assert body["model"] == "auto" and "routing" not in body["crosstask"]
        assert body.get("stream", False) == kind.endswith("_stream")
    merged = {
        json.dumps(b["crosstask"]["routing"])
        for b in server.requests
        if "routing" in b["crosstask"]
    }
    assert len(merged) == len(plan.merges)
    assert {o.target for o in outcomes if o.kind == "chat_auto"} == {"auto"}
    assert {o.served for o in outcomes if o.kind.startswith("chat_auto")} == {"adapter"}
    assert all(o.served == "merge" for o in outcomes if "merge" in o.kind)


def test_an_answer_served_by_other_adapters_is_an_error() -> None:
    plan = load.plan_adapter_traffic(ADAPTERS[:2], "run")
    kinds = [k for k in load.adapter_kinds(plan) if "auto" not in k.name]
    outcomes = send_all(FakeServer(served={"mode": "off", "adapters": []}), kinds, range(2))
    assert {o.status for o in outcomes} == {"wrong_routing"}
    # `auto` may serve anything the router picks.
    auto = [k for k in load.adapter_kinds(plan) if "auto" in k.name]
    outcomes = send_all(FakeServer(served={"mode": "off", "adapters": []}), auto, range(2))
    assert {o.status for o in outcomes} == {"ok"} and {o.served for o in outcomes} == {"off"}


def test_base_kinds_send_what_they_sent_before() -> None:
    server = FakeServer()
    outcomes = send_all(server, load.base_kinds(), range(2))
    assert {o.status for o in outcomes} == {"ok", "disconnected"}
    assert all(b["model"] == load.MODEL for b in server.requests)
    assert all(b["crosstask"] == {"demonstrations": {"k": 4}} for b in server.requests)
    assert all(o.target is None and o.served is None for o in outcomes)


# -- the report ------------------------------------------------------------------------------

METRICS_BEFORE = """\
# HELP crosstask_merge_cache_hits_total Merged adapters found in the merge cache.
# TYPE crosstask_merge_cache_hits_total counter
crosstask_merge_cache_hits_total 3.0
crosstask_merge_cache_hits_created 1.7e+09
crosstask_merge_cache_misses_total 2.0
crosstask_routing_requests_total{mode="off"} 10.0
crosstask_adapter_requests_total{adapter="alpha"} 1.0
"""
METRICS_AFTER = """\
crosstask_merge_cache_hits_total 40.0
crosstask_merge_cache_misses_total 10.0
crosstask_routing_requests_total{mode="off"} 30.0
crosstask_routing_requests_total{mode="merge"} 48.0
crosstask_adapter_requests_total{adapter="alpha"} 50.0
crosstask_adapter_requests_total{adapter="beta"} 48.0
"""


def test_report_counts_kinds_targets_and_the_merge_cache() -> None:
    before, after = load.adapter_counters(METRICS_BEFORE), load.adapter_counters(METRICS_AFTER)
    assert before["merge_cache_hits"] == 3.0 and before["merge_cache_misses"] == 2.0
    assert after["routing_requests_by_mode"] == {"off": 30.0, "merge": 48.0}

    plan = load.plan_adapter_traffic(ADAPTERS[:2], "run")
    kinds = load.mix(load.base_kinds(), load.adapter_kinds(plan), 0.3)
    outcomes = [
        load.Outcome(1, "chat", "/v1/chat/completions", 0.0, 0.5),
        load.Outcome(2, "chat_merge", "/v1/chat/completions", 0.0, 1.5, target="m1"),
        load.Outcome(3, "chat_merge", "/v1/chat/completions", 0.0, 0.1, target="m1"),
        load.Outcome(4, "chat_merge", "/v1/chat/completions", 0.0, 0.1, status="http_500"),
        load.Outcome(5, "chat_auto", "/v1/chat/completions", 0.0, 0.2, target="auto"),
        load.Outcome(6, "chat_auto", "/v1/chat/completions", 0.0, 0.2, status="http_429"),
    ]
    outcomes[4].served = "off"
    report = load.adapter_report(plan, kinds, outcomes, before, after, 0.3)
    assert report["enabled"] and report["distinct_merges"] == len(plan.merges)
    assert report["share_sent"] == round(5 / 6, 3)
    merge = report["by_kind"]["chat_merge"]
    assert (merge["requests"], merge["ok"], merge["errors"]) == (3, 2, {"http_500": 1})
    assert merge["latency_s"]["p50"] == 1.5
    assert report["by_kind"]["chat_auto"]["http_429"] == 1
    assert report["by_target"]["m1"]["requests"] == 2
    assert report["auto_served_modes"] == {"off": 1}
    cache = report["merge_cache"]
    assert (cache["hits"], cache["misses"], cache["saw_hits_and_misses"]) == (37.0, 8.0, True)
    assert cache["before"] == {"hits": 3.0, "misses": 2.0}
    assert report["server_routing_requests_by_mode"] == {"off": 20.0, "merge": 48.0}
    assert report["server_adapter_requests"] == {"alpha": 49.0, "beta": 48.0}
    json.dumps(report)

    skipped = load.adapter_report(
        load.plan_adapter_traffic([], "run"), load.base_kinds(), outcomes[:1], before, after, 0.3
    )
    assert not skipped["enabled"] and "no adapters" in skipped["note"]
    assert skipped["by_kind"] == {} and skipped["share_asked"] == 0.0


def test_help_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(LOAD_PY), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "--no-adapters" in result.stdout and "--adapter-share" in result.stdout


def _rounds(totals: list[float], worker: list[float]) -> list[dict[str, Any]]:
    return [
        {
            "resources_after": {
                "total_rss_mib": total,
                "total_fds": 180,
                "processes": {
                    "python[1]": {"rss_mib": total - w},
                    "VLLM::Worker[2]": {"rss_mib": w},
                },
            }
        }
        for total, w in zip(totals, worker, strict=True)
    ]


def test_memory_trend_fails_a_steady_leak_and_passes_noise_around_a_level() -> None:
    # Totals of a real 8-round run before the primitive caches were bounded: ~40 MiB/round.
    leaking = [8013.4, 8064.0, 8147.5, 8168.8, 8213.8, 8236.8, 8268.9, 8336.3]
    trend = load.memory_trend(_rounds(leaking, [t - 1800 for t in leaking]), 10.0)
    assert trend is not None and not trend["flat"]
    assert 35 < trend["total_growth_mib_per_round"] < 45
    assert trend["growth_mib_per_round"]["VLLM::Worker[2]"] == trend["total_growth_mib_per_round"]

    # A big first round (caches filling), then tens of MiB either way without a trend.
    level = [7900.0, 8060.0, 8085.0, 8041.0, 8079.0, 8052.0, 8070.0]
    trend = load.memory_trend(_rounds(level, [6000.0] * len(level)), 10.0)
    assert trend is not None and trend["flat"]
    assert trend["growth_mib_per_round"]["VLLM::Worker[2]"] == 0.0


def test_memory_trend_needs_three_rounds() -> None:
    assert load.memory_trend(_rounds([1.0, 2.0], [1.0, 1.0]), 10.0) is None
