"""Seeded sampling with chunked prefill: the engine survives it, and a seed gives the same
text whether the prompt was prefilled in one step or split across several (vLLM-CPU's own
rewind of the discarded partial-prefill draw crashes; serve/engine/seeded_sampling.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.server import Server

PROMPT_TOKENS = 700  # six of these exceed one step's 2,048 batched tokens: some are chunked
REQUESTS = 6


def _complete(server: Server, i: int) -> str:
    prompt = [(i * 7919 + j * 31) % 40000 + 100 for j in range(PROMPT_TOKENS)]
    body = {
        "model": server.model,
        "prompt": prompt,
        "max_tokens": 8,
        "temperature": 1.0,
        "seed": 1000 + i,
    }
    response = httpx.post(
        f"{server.v1}/completions",
        json=body,
        headers={"Authorization": f"Bearer {server.api_key}"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def test_seeded_burst_with_chunked_prefill_matches_requests_sent_alone(server: Server) -> None:
    with ThreadPoolExecutor(REQUESTS) as pool:
        burst = list(pool.map(lambda i: _complete(server, i), range(REQUESTS)))
    assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200
    alone = [_complete(server, i) for i in range(REQUESTS)]
    assert burst == alone
    assert len(set(alone)) > 1, "different seeds and prompts all gave one text"
