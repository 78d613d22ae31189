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
merge share one build. A merge handed to a request is leased to it until the request ends:
vLLM reads the folder when it schedules the request (and again whenever it has dropped the
LoRA from its own caches), so an evicted merge keeps its folder until its last lease goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.durable import fsync_tree
from routing.adapter_meta import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

log = logging.getLogger(__name__)

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


class MergeLease:
    """A request's hold on a merge: the cache keeps the merge's folder (and leaves vLLM's
    copy loaded) until release(). Release is idempotent and thread-safe; a lease dropped
    without it is released when garbage collected, so a request that ends on a path that
    never releases cannot keep a folder for good."""

    def __init__(self, name: str, release: Callable[[], None]) -> None:
        self.name = name
        # `release` must not refer to this lease, or the lease is never collected.
        self._finalizer = weakref.finalize(self, release)
        self._finalizer.atexit = False  # at exit the folders stay: the next start reuses them

    def release(self) -> None:
        self._finalizer()


@dataclass
class MergeResult:
    name: str
    path: Path
    hit: bool
    build_seconds: float
    lease: MergeLease | None = None


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
        # Leases per merge, merges evicted while leased (their folders still whole), and
        # folder removals under way. Touched on the event loop only.
        self._pins: Counter[str] = Counter()
        self._evicted: dict[str, Path] = {}
        self._removals: dict[str, asyncio.Task[None]] = {}
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
        self,
        sources: Sequence[Source],
        weights: Sequence[float],
        method: str = "auto",
        pin: bool = False,
    ) -> MergeResult:
        """The merge, built if need be. With `pin`, the result holds a lease: its folder
        stays until the lease is released, evicted or not; a request must hold one from
        the moment it is handed the merge until the engine is done with it."""
        total = sum(_rank_of(s.path) for s in sources)
        if method == "auto":
            method = "exact" if total <= self.max_rank else "svd"
        rank = total if method == "exact" else min(self.max_rank, total)
        key = merge_key(sources, weights, method, rank)
        name = self.served_name(key)
        while True:
            removal = self._removals.get(name)
            if removal is not None:
                # Its old folder is on its way out: let that finish before building anew.
                await asyncio.wait({removal})
                continue
            kept = self._evicted.pop(name, None)
            if kept is not None:
                # Evicted while leased, so its folder is whole: back into the cache.
                self._entries[name] = kept
            if name in self._entries:
                self._entries.move_to_end(name)
                self.hits += 1
                result = MergeResult(name, self._entries[name], True, 0.0, self._lease(name, pin))
                if kept is not None:
                    await self._evict()
                return result
            pending = self._building.get(name)
            if pending is None:
                break
            # Someone is building this very merge: wait for it rather than build twice,
            # then look again (it may have been evicted in between).
            await asyncio.shield(pending)
        future: asyncio.Future[MergeResult] = asyncio.get_running_loop().create_future()
        self._building[name] = future
        try:
            started = time.perf_counter()
            path = await asyncio.to_thread(self._build, name, sources, weights, method, rank)
            result = MergeResult(
                name, path, False, time.perf_counter() - started, self._lease(name, pin)
            )
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

    def _lease(self, name: str, pin: bool) -> MergeLease | None:
        if not pin:
            return None
        self._pins[name] += 1
        loop = asyncio.get_running_loop()
        return MergeLease(name, functools.partial(self._release, loop, name))

    def _release(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        # Any thread: a lease's finalizer runs wherever the garbage collector does.
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is ending
            loop.call_soon_threadsafe(self._unpin, name)

    def _unpin(self, name: str) -> None:
        self._pins[name] -= 1
        if self._pins[name] > 0:
            return
        del self._pins[name]
        path = self._evicted.pop(name, None)
        if path is not None:
            self._start_removal(name, path)

    async def _evict(self) -> None:
        while len(self._entries) > self.capacity:
            name, path = self._entries.popitem(last=False)
            if self._pins[name] > 0:
                self._evicted[name] = path  # removed when its last lease is released
                continue
            # Waited on without being tied to this request: cancelling it must not leave
            # the folder half removed.
            await asyncio.wait({self._start_removal(name, path)})

    def _start_removal(self, name: str, path: Path) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._remove(name, path))
        self._removals[name] = task
        return task

    async def _remove(self, name: str, path: Path) -> None:
        try:
            if self.on_evict is not None:
                await self.on_evict(name)
            await asyncio.to_thread(shutil.rmtree, path, True)
        except Exception:
            log.exception("Removing the evicted merge %s failed", name)
        finally:
            self._removals.pop(name, None)


def _rank_of(path: Path) -> int:
    config = json.loads((path / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    return int(config["r"])
