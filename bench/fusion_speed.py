"""What logit fusion costs: a fused request against the same request with one adapter, and
unfused traffic with the fusion processor and scheduler installed against without them.

Starts `crosstask serve` (compiled, float32, the shipped adapter library, no retrieval)
with fusion on, and drives it with the openai client:
- `adapter`: the request with one specialist (spec-0) and `fused`: the same request fusing
  two specialists (spec-0 and spec-1, weights 0.5 / 0.5), at 1 and at 16 concurrent, in
  alternating rounds; wall time per request (c = 1) and per batch (c = 16);
- `unfused`: base-model requests at 32 concurrent (output tokens/s).
Then starts it with `--no-fusion` and runs `unfused` again, alternating servers for
`--rounds`. Every completion is `--max-tokens` long (ignore_eos), so the kinds compare like
with like. Targets (issue 5): fused <= 1.6x adapter at 1 and 16 concurrent; unfused with
fusion installed >= 0.97x without.

    .venv/bin/python bench/fusion_speed.py [--rounds 2] [--out bench/results/fusion_speed.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve_overhead import _free_port, _stop, _wait_ready

NAME = "smollm2-135m-instruct"
PROMPTS = [
    "Explain why the sky is blue to a child.",
    "Write a short story about a lighthouse keeper.",
    "List the planets of the solar system with one fact each.",
    "Describe how to make a cup of tea, step by step.",
]


def start(model_dir: Path, port: int, log_dir: Path, fusion: bool) -> Any:
    import subprocess

    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        CROSSTASK_HOME=str(log_dir / "empty-home"),  # no store: retrieval off
    )
    command = [
        sys.executable, "-m", "serve.cli", "serve", "--model", str(model_dir),
        "--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(port),
        "--kv-cache-gb", "4", "--log-level", "warning",
    ]  # fmt: skip
    if not fusion:
        command.append("--no-fusion")
    log = open(log_dir / f"server-{'fusion' if fusion else 'plain'}.log", "wb")  # noqa: SIM115
    return subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


async def one(client: Any, i: int, routing: dict[str, Any] | None, max_tokens: int) -> int:
    extra: dict[str, Any] = {"ignore_eos": True}
    if routing is not None:
        extra["crosstask"] = {"routing": routing}
    response = await client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        max_tokens=max_tokens,
        temperature=0,
        extra_body=extra,
    )
    return int(response.usage.completion_tokens)


async def drive(
    client: Any, routing: dict[str, Any] | None, requests: int, concurrency: int, max_tokens: int
) -> dict[str, float]:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def run(i: int) -> int:
        async with gate:
            started = time.perf_counter()
            tokens = await one(client, i, routing, max_tokens)
            latencies.append(time.perf_counter() - started)
            return tokens

    started = time.perf_counter()
    tokens = await asyncio.gather(*(run(i) for i in range(requests)))
    wall = time.perf_counter() - started
    return {
        "wall_s": round(wall, 3),
        "mean_latency_s": round(statistics.mean(latencies), 3),
        "output_tok_per_s": round(sum(tokens) / wall, 2),
    }


def routings(first: str, second: str) -> dict[str, dict[str, Any]]:
    """One specialist alone, two fused at fixed weights, and the same with dynamic weights
    (the base decodes as a third member; fixed weights summing to 1 need not)."""
    fused = {"mode": "fuse", "adapters": [first, second], "weights": [0.5, 0.5]}
    return {
        "adapter": {"mode": "adapter", "adapters": [first]},
        "fused": fused,
        "fused_dynamic": {**fused, "weights": [1.0, 1.0], "alpha": "dynamic"},
    }


async def two_specialists(client: Any) -> tuple[str, str]:
    """The first two specialists the server lists (by name: the library's first two)."""
    listed = sorted(m.id for m in (await client.models.list()).data if m.id.startswith("spec-"))
    if len(listed) < 2:
        raise SystemExit(f"the server lists {len(listed)} specialists; fusion needs two")
    return listed[0], listed[1]


async def fusion_rounds(url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=600)
    ways = routings(*await two_specialists(client))
    for routing in ways.values():  # warm: adapters loaded, graphs hot
        await drive(client, routing, 2, 2, 8)
    rows = []
    for r in range(args.rounds):
        for concurrency, requests in ((1, args.requests_c1), (16, args.requests_c16)):
            for kind, routing in ways.items():
                result = await drive(client, routing, requests, concurrency, args.max_tokens)
                rows.append({"round": r, "kind": kind, "concurrency": concurrency, **result})
                print(json.dumps(rows[-1]), flush=True)
    return rows


async def unfused(url: str, args: argparse.Namespace, server: str, r: int) -> dict[str, Any]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=600)
    await drive(client, None, 4, 4, 8)
    result = await drive(client, None, args.unfused_requests, 32, args.max_tokens)
    row = {"round": r, "kind": "unfused", "server": server, "concurrency": 32, **result}
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-c1", type=int, default=6)
    parser.add_argument("--requests-c16", type=int, default=32)
    parser.add_argument("--unfused-requests", type=int, default=96)
    parser.add_argument("--skip-fusion", action="store_true", help="unfused traffic only")
    parser.add_argument("--only-fusion", action="store_true", help="fused traffic only")
    parser.add_argument("--out", type=Path, default=Path("bench/results/fusion_speed.json"))
    args = parser.parse_args()

    from serve.default_model import ensure_default_model

    home = Path(os.environ.get("CROSSTASK_HOME", "~/.cache/crosstask")).expanduser()
    model_dir = ensure_default_model(home)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp)
        # Fused rounds run on the first fusion server; unfused traffic alternates servers.
        for r in range(1 if args.only_fusion else args.rounds):
            for fusion in (True,) if args.only_fusion else (True, False):
                port = _free_port()
                process = start(model_dir, port, log_dir, fusion)
                url = f"http://127.0.0.1:{port}"
                try:
                    _wait_ready(f"{url}/health", process)
                    rows.append(asyncio.run(unfused(url, args, "fusion" if fusion else "plain", r)))
                    if fusion and r == 0 and not args.skip_fusion:
                        rows.extend(asyncio.run(fusion_rounds(url, args)))
                finally:
                    _stop(process)

    def median(kind: str, concurrency: int, field: str, server: str | None = None) -> float:
        values = [
            row[field]
            for row in rows
            if row["kind"] == kind
            and row["concurrency"] == concurrency
            and (server is None or row.get("server") == server)
        ]
        return statistics.median(values)

    summary: dict[str, Any] = {
        "targets": {"fused_over_adapter": 1.6, "unfused_with_over_without": 0.97}
    }
    if any(row["kind"] == "fused" for row in rows):
        for kind in ("fused", "fused_dynamic"):
            summary[f"{kind}_over_adapter_latency_c1"] = round(
                median(kind, 1, "mean_latency_s") / median("adapter", 1, "mean_latency_s"), 3
            )
            summary[f"{kind}_over_adapter_wall_c16"] = round(
                median(kind, 16, "wall_s") / median("adapter", 16, "wall_s"), 3
            )
    if any(row.get("server") == "plain" for row in rows):
        summary["unfused_with_over_without"] = round(
            median("unfused", 32, "output_tok_per_s", "fusion")
            / median("unfused", 32, "output_tok_per_s", "plain"),
            3,
        )
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"args": vars(args) | {"out": str(args.out)}, "rows": rows, "summary": summary},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
