"""Weighted merges of LoRA adapters, served by vLLM as one LoRA.

A LoRA adapter adds `s * B @ A` to each target weight (A: r x in, B: out x r, s its
scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA). A weighted merge
`sum_i w_i s_i B_i A_i` is itself a LoRA:

- exact: stack the factors, A = [A_1; ...; A_n] and B = [w_1 s_1 B_1 | ... | w_n s_n B_n],
  rank = sum of ranks, scaling 1 (lora_alpha = r). Identical update, no approximation.
- svd: the best rank-t approximation of the same update, computed without forming the
  out x in matrix: QR of B and of A^T, then the SVD of the small R_B R_A^T.

`auto` is exact when the summed rank fits `max_rank`, else svd at `max_rank`. Weights
must be finite with a positive sum and are normalized to sum 1, so [2, 1] and [0.67, 0.33]
are the same merge (LoraHub's convention of an affine combination).

Merges are materialized once into a cache folder keyed by (adapters and their content,
weights, method, rank), evicted least-recently-used; concurrent requests for the same new
merge share one build.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.durable import fsync_tree
from routing.adapter_meta import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

METHODS = ("auto", "exact", "svd")
_A, _B = ".lora_A.weight", ".lora_B.weight"


class MergeError(ValueError):
    """A merge that cannot be built: bad weights, unsupported adapter features."""


def normalize_weights(weights: Sequence[float], count: int) -> list[float]:
    if len(weights) != count:
        raise MergeError(f"{count} adapters need {count} weights, got {len(weights)}")
    values = [float(w) for w in weights]
    if not all(math.isfinite(w) for w in values):
        raise MergeError("merge weights must be finite numbers")
    total = sum(values)
    if not total > 0:
        raise MergeError("merge weights must have a positive sum")
    return [w / total for w in values]


@dataclass(frozen=True)
class Source:
    name: str
    path: Path
    fingerprint: str  # content hash of the weights: a changed file is a different merge


def _load(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors.torch import load_file

    config = json.loads((path / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{path}: only LoRA adapters can be merged")
    if config.get("use_dora"):
        raise MergeError(f"{path}: DoRA adapters cannot be merged as LoRA")
    if config.get("modules_to_save") or config.get("bias", "none") != "none":
        raise MergeError(f"{path}: adapters with trained biases or full modules cannot merge")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise MergeError(f"{path}: per-module rank or alpha patterns are not supported")
    return config, load_file(str(path / ADAPTER_WEIGHTS_FILE))


def _scaling(config: dict[str, Any], rank: int) -> float:
    alpha = float(config.get("lora_alpha", rank))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def merge_adapters(
    sources: Sequence[Path],
    weights: Sequence[float],
    out: Path,
    method: str = "auto",
    max_rank: int = 64,
    rank: int | None = None,
) -> dict[str, Any]:
    """Write the weighted merge of the PEFT adapters in `sources` to the folder `out`."""
    import torch
    from safetensors.torch import save_file

    if method not in METHODS:
        raise MergeError(f"merge method must be one of {', '.join(METHODS)}")
    if not sources:
        raise MergeError("a merge needs at least one adapter")
    normalized = normalize_weights(weights, len(sources))
    loaded = [_load(p) for p in sources]
    ranks = [int(cfg["r"]) for cfg, _ in loaded]
    total_rank = sum(ranks)
    if method == "auto":
        method = "exact" if total_rank <= max_rank else "svd"
    target = total_rank if method == "exact" else min(rank or max_rank, total_rank)
    if target > max_rank:
        raise MergeError(
            f"an exact merge has rank {total_rank}, above the server's max LoRA rank "
            f"{max_rank}: use the svd method"
        )

    modules = sorted({k[: -len(_A)] for _, tensors in loaded for k in tensors if k.endswith(_A)})
    merged: dict[str, torch.Tensor] = {}
    for module in modules:
        a_parts, b_parts = [], []
        shape: tuple[int, int] | None = None
        for (config, tensors), r, w in zip(loaded, ranks, normalized, strict=True):
            a, b = tensors.get(module + _A), tensors.get(module + _B)
            if a is not None and b is not None:
                shape = (int(b.shape[0]), int(a.shape[1]))
                a_parts.append(a.float())
                b_parts.append(b.float() * (w * _scaling(config, r)))
            else:
                a_parts.append(None)
                b_parts.append(None)
        assert shape is not None
        out_features, in_features = shape
        # An adapter without this module contributes nothing: zero factors of its rank.
        a_cat = torch.cat(
            [
                p if p is not None else torch.zeros(r, in_features)
                for p, r in zip(a_parts, ranks, strict=True)
            ]
        )
        b_cat = torch.cat(
            [
                p if p is not None else torch.zeros(out_features, r)
                for p, r in zip(b_parts, ranks, strict=True)
            ],
            dim=1,
        )
        if method == "svd":
            b_cat, a_cat = _truncate(b_cat, a_cat, target)
        merged[module + _A] = a_cat.contiguous()
        merged[module + _B] = b_cat.contiguous()

    config = dict(loaded[0][0])
    targets: set[str] = set()
    for cfg, _ in loaded:
        t = cfg.get("target_modules")
        targets.update([t] if isinstance(t, str) else (t or []))
    config.update(
        r=target,
        lora_alpha=target,  # scaling 1: the weights and scalings are inside B
        use_rslora=False,
        target_modules=sorted(targets),
        rank_pattern={},
        alpha_pattern={},
    )
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out / ADAPTER_WEIGHTS_FILE))
    (out / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return {"method": method, "rank": target, "weights": normalized, "modules": len(modules)}


def _truncate(b: Any, a: Any, rank: int) -> tuple[Any, Any]:
    """The best rank-`rank` factors of B @ A (Eckart-Young), via the small core matrix."""
    import torch

    q_b, r_b = torch.linalg.qr(b)  # b: out x R
    q_a, r_a = torch.linalg.qr(a.T)  # a.T: in x R
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    root = s[:rank].sqrt()
    new_b = (q_b @ u[:, :rank]) * root
    new_a = root[:, None] * (vh[:rank] @ q_a.T)
    return new_b, new_a


# -- the cache ---------------------------------------------------------------------------------


@dataclass
class MergeResult:
    name: str
    path: Path
    hit: bool
    build_seconds: float


def merge_key(sources: Sequence[Source], weights: Sequence[float], method: str, rank: int) -> str:
    normalized = normalize_weights(weights, len(sources))
    payload = json.dumps(
        {
            "adapters": [[s.name, s.fingerprint] for s in sources],
            # Rounded: 0.1 + 0.2 and 0.3 must not make two merges.
            "weights": [round(w, 6) for w in normalized],
            "method": method,
            "rank": rank,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class MergeCache:
    """Merged adapters on disk under `root`, at most `capacity` of them, LRU."""

    def __init__(
        self,
        root: Path,
        capacity: int = 32,
        max_rank: int = 64,
        on_evict: Callable[[str], Awaitable[object]] | None = None,
    ) -> None:
        self.root = root
        self.capacity = max(1, capacity)
        self.max_rank = max_rank
        self.on_evict = on_evict
        self._entries: OrderedDict[str, Path] = OrderedDict()
        self._building: dict[str, asyncio.Future[MergeResult]] = {}
        self.hits = 0
        self.misses = 0
        root.mkdir(parents=True, exist_ok=True)
        # Merges from an earlier run are valid (their key covers content), oldest first.
        found = [p for p in root.iterdir() if p.is_dir() and (p / ADAPTER_CONFIG_FILE).is_file()]
        for path in sorted(found, key=lambda p: p.stat().st_mtime):
            self._entries[path.name] = path
        for stale in root.glob(".building-*"):
            shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def served_name(key: str) -> str:
        return f"merge-{key}"

    async def get(
        self, sources: Sequence[Source], weights: Sequence[float], method: str = "auto"
    ) -> MergeResult:
        total = sum(_rank_of(s.path) for s in sources)
        if method == "auto":
            method = "exact" if total <= self.max_rank else "svd"
        rank = total if method == "exact" else min(self.max_rank, total)
        key = merge_key(sources, weights, method, rank)
        name = self.served_name(key)
        if name in self._entries:
            self._entries.move_to_end(name)
            self.hits += 1
            return MergeResult(name, self._entries[name], True, 0.0)
        pending = self._building.get(name)
        if pending is not None:
            # Someone is building this very merge: wait for it rather than build twice.
            result = await asyncio.shield(pending)
            self.hits += 1
            return MergeResult(result.name, result.path, True, 0.0)
        future: asyncio.Future[MergeResult] = asyncio.get_running_loop().create_future()
        self._building[name] = future
        try:
            started = time.perf_counter()
            path = await asyncio.to_thread(self._build, name, sources, weights, method, rank)
            result = MergeResult(name, path, False, time.perf_counter() - started)
            self.misses += 1
            self._entries[name] = path
            future.set_result(result)
        except BaseException as exc:
            future.set_exception(exc)
            # Waiters see the exception; retrieve it so asyncio does not log it as lost.
            future.exception()
            raise
        finally:
            del self._building[name]
        await self._evict()
        return result

    def _build(
        self,
        name: str,
        sources: Sequence[Source],
        weights: Sequence[float],
        method: str,
        rank: int,
    ) -> Path:
        final = self.root / name
        tmp = self.root / f".building-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        merge_adapters(
            [s.path for s in sources], weights, tmp, method, max_rank=self.max_rank, rank=rank
        )
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final

    async def _evict(self) -> None:
        while len(self._entries) > self.capacity:
            name, path = self._entries.popitem(last=False)
            if self.on_evict is not None:
                await self.on_evict(name)
            await asyncio.to_thread(shutil.rmtree, path, True)


def _rank_of(path: Path) -> int:
    config = json.loads((path / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    return int(config["r"])
