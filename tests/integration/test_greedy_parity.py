"""vLLM's greedy output on this CPU equals transformers' float32 greedy output, token for
token (bfloat16 on vLLM-CPU gave garbage for this model: this guards the dtype choice)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.server import Server

PROMPTS = [
    "What is the capital of France?",
    "Translate to French: good morning",
    "List three fruits.",
    "Is 17 a prime number? Answer yes or no.",
    "Write one sentence about the sea.",
    "What is 12 plus 30?",
]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def reference(model_dir: Path):  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return tokenizer, model


@pytest.mark.parametrize("prompt", PROMPTS)
def test_server_greedy_equals_transformers(
    prompt: str,
    reference,
    openai_client: openai.OpenAI,
    server: Server,  # type: ignore[no-untyped-def]
) -> None:
    import torch

    tokenizer, model = reference
    messages = [{"role": "user", "content": prompt}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    expected_ids = output[0][inputs["input_ids"].shape[1] :].tolist()

    result = openai_client.chat.completions.create(
        model=server.model,
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=True,
    )
    content = result.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None
    got_tokens = [item.token for item in content]
    expected_tokens = [tokenizer.decode([t]) for t in expected_ids]
    assert got_tokens == expected_tokens
    assert result.choices[0].message.content == tokenizer.decode(
        expected_ids, skip_special_tokens=True
    )
