"""A plain transformers + PEFT implementation of logit fusion, used only by the tests to
check the engine token for token under greedy decoding: one model with every adapter
loaded, switched per member, and its own decoding loop (no KV cache: the prompts are short).
The fusion rule itself is routing/fusion/logits.py, whose exactness the unit tests check."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from routing.fusion.logits import alphas_for, fuse


class FusionReference:
    def __init__(self, base_model: Any, adapters: dict[str, Path]) -> None:
        from peft import PeftModel

        names = list(adapters)
        self._model = PeftModel.from_pretrained(
            base_model, str(adapters[names[0]]), adapter_name=names[0]
        )
        for name in names[1:]:
            self._model.load_adapter(str(adapters[name]), adapter_name=name)
        self._model.eval()

    def close(self) -> None:
        self._model.unload()  # the shared base model goes back to having no LoRA layers

    def _last_logits(self, ids: list[int], adapter: str | None) -> Any:
        import torch

        batch = torch.tensor([ids])
        if adapter is None:
            with self._model.disable_adapter():
                return self._model(input_ids=batch).logits[0, -1].float()
        self._model.set_adapter(adapter)
        return self._model(input_ids=batch).logits[0, -1].float()

    def greedy(
        self,
        prompt_ids: Sequence[int],
        adapters: Sequence[str],
        alphas: Sequence[float] | None,
        prior: Sequence[float],
        max_tokens: int,
        eos: int,
    ) -> list[int]:
        import torch

        ids = list(prompt_ids)
        out: list[int] = []
        with torch.inference_mode():
            for _ in range(max_tokens):
                base = self._last_logits(ids, None)
                experts = torch.stack([self._last_logits(ids, a) for a in adapters])
                fused = fuse(base, experts, alphas_for(base, experts, alphas, prior))
                token = int(fused.argmax())
                out.append(token)
                ids.append(token)
                if token == eos:
                    break
        return out
