"""The adapters a server may use: folders of PEFT LoRA adapters below one root.

Every adapter is checked before it is served, at start-up and on runtime loads alike:
its path must resolve (symlinks followed) inside the adapters root; it must be a LoRA in
safetensors (never a pickle); its rank at most the engine's max LoRA rank; its tensors
readable, finite and shaped for the base model being served. The optional
`crosstask_adapter.json` (routing/adapter_meta.py) adds the training tasks and the routing
prototype; an adapter without it can be asked for by name but is never chosen by `auto`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routing.adapter_meta import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    META_FILE,
    AdapterMeta,
    base_signature,
    read_meta,
)

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RESERVED_PREFIX = "merge-"


class AdapterError(ValueError):
    """An adapter that cannot be served, with the API error code to answer with."""

    def __init__(self, message: str, code: str = "invalid_adapter", status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    rank: int
    fingerprint: str
    meta: AdapterMeta | None

    @property
    def tasks(self) -> list[str]:
        return list(self.meta.tasks) if self.meta else []

    @property
    def kind(self) -> str:
        return self.meta.kind if self.meta else "unrouted"


@dataclass(frozen=True)
class BaseShapes:
    """What an adapter's tensors must agree with: the base model's layer count and the
    feature sizes of its linear layers."""

    signature: dict[str, Any]
    num_layers: int
    features: frozenset[int]

    @classmethod
    def of(cls, model_dir: Path) -> BaseShapes:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        config = {**config, **config.get("text_config", {})}
        hidden = int(config["hidden_size"])
        heads = int(config.get("num_attention_heads", 1))
        head_dim = int(config.get("head_dim") or hidden // heads)
        kv = int(config.get("num_key_value_heads", heads)) * head_dim
        sizes = {hidden, heads * head_dim, kv, int(config.get("intermediate_size", hidden))}
        return cls(base_signature(model_dir), int(config["num_hidden_layers"]), frozenset(sizes))


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _layer_index(key: str) -> int | None:
    match = re.search(r"\.layers\.(\d+)\.", key)
    return int(match.group(1)) if match else None


def _shown(path: Path, limit: int = 120) -> str:
    """The path as the caller gave it, cut short: a message need not echo kilobytes."""
    text = str(path)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _path_error(path: Path, exc: OSError) -> AdapterError:
    """What the file system refused about a path below the root, as the caller's error.
    Only the path as given is named: the resolved one would show the server's folders."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return AdapterError(f"adapter path {_shown(path)} does not exist", "adapter_not_found", 404)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return AdapterError(
            f"adapter path {_shown(path)} cannot be read (permission denied)",
            "adapter_path_forbidden",
            403,
        )
    reason = {
        errno.ENAMETOOLONG: "a name in it, or the whole path, is too long",
        errno.ELOOP: "it runs into a loop of symbolic links",
    }.get(exc.errno or 0, exc.strerror or "it cannot be read")
    return AdapterError(f"adapter path {_shown(path)}: {reason}", "invalid_adapter_path")


def inspect_adapter(
    name: str, path: Path, root: Path, base: BaseShapes, max_rank: int, embedder: str | None
) -> Adapter:
    """The checked adapter in `path`, or AdapterError saying what is wrong with it."""
    if not NAME_PATTERN.match(name) or name.startswith(RESERVED_PREFIX):
        raise AdapterError(
            f"adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', not starting "
            f"with {RESERVED_PREFIX!r}",
            "invalid_adapter_name",
        )
    resolved_root = root.resolve()
    candidate = path if path.is_absolute() else resolved_root / path
    # Confinement first (symlinks resolved as far as they exist), existence second, so the
    # answers say nothing about what exists outside the root.
    try:
        resolved = candidate.resolve(strict=False)
    except (OSError, RuntimeError):  # a symlink loop
        resolved = resolved_root.parent
    except ValueError:  # a NUL byte, or text that no file name can encode
        raise AdapterError(
            f"adapter path {_shown(path)} is not a valid path", "invalid_adapter_path"
        ) from None
    if not resolved.is_relative_to(resolved_root) or resolved == resolved_root:
        raise AdapterError(
            f"adapter path {str(path)!r} is outside the adapters root",
            "adapter_path_forbidden",
            403,
        )
    try:
        return _inspect_folder(name, path, resolved, base, max_rank, embedder)
    except OSError as exc:
        # The folder's checks stat and open files below a path from the request; what the
        # file system refuses there (a name too long, a symlink loop, no permission) is a
        # 4xx about that path, not a server fault.
        raise _path_error(path, exc) from None


def _inspect_folder(
    name: str, path: Path, resolved: Path, base: BaseShapes, max_rank: int, embedder: str | None
) -> Adapter:
    """inspect_adapter's checks of the folder `resolved`, confined below the root."""
    import torch
    from safetensors.torch import load_file

    if not resolved.exists():
        raise AdapterError(f"adapter path {str(path)!r} does not exist", "adapter_not_found", 404)
    if not resolved.is_dir():
        raise AdapterError(f"adapter path {str(path)!r} is not a folder")
    weights = resolved / ADAPTER_WEIGHTS_FILE
    if not weights.is_file():
        pickle = (resolved / "adapter_model.bin").exists()
        raise AdapterError(
            f"adapter {name!r}: no {ADAPTER_WEIGHTS_FILE}"
            + (" (pickled .bin adapters are refused: convert to safetensors)" if pickle else "")
        )
    try:
        config = json.loads((resolved / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
        rank = int(config["r"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"adapter {name!r}: unreadable {ADAPTER_CONFIG_FILE}: {exc}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r}: only LoRA adapters are served")
    if rank < 1 or rank > max_rank:
        raise AdapterError(
            f"adapter {name!r} has rank {rank}; this server serves ranks 1 to {max_rank} "
            "(CROSSTASK_MAX_LORA_RANK)",
            "adapter_rank_too_high",
        )
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for broken files
        raise AdapterError(f"adapter {name!r}: broken {ADAPTER_WEIGHTS_FILE}: {exc}") from None
    if not tensors:
        raise AdapterError(f"adapter {name!r}: {ADAPTER_WEIGHTS_FILE} holds no tensors")
    for key, tensor in tensors.items():
        layer = _layer_index(key)
        if layer is not None and layer >= base.num_layers:
            raise AdapterError(
                f"adapter {name!r} has layer {layer}; the base model has {base.num_layers}: "
                "it belongs to another base model",
                "adapter_base_mismatch",
            )
        if key.endswith("lora_A.weight") and int(tensor.shape[-1]) not in base.features:
            raise AdapterError(
                f"adapter {name!r}: {key} has input size {tensor.shape[-1]}, which no layer of "
                "the base model has: it belongs to another base model",
                "adapter_base_mismatch",
            )
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"adapter {name!r}: {key} holds NaN or infinite values")
    meta: AdapterMeta | None = None
    if (resolved / META_FILE).exists():
        try:
            meta = read_meta(resolved)
        except ValueError as exc:
            raise AdapterError(f"adapter {name!r}: {exc}") from None
        if meta.base_model != base.signature:
            raise AdapterError(
                f"adapter {name!r} was trained for {meta.base_model}, not the served model "
                f"{base.signature}",
                "adapter_base_mismatch",
            )
        if embedder is not None and meta.prototype.embedder != embedder:
            log.warning(
                "Adapter %s: its prototype was embedded with %s, requests with %s; "
                "it will be served by name but not routed to",
                name,
                meta.prototype.embedder,
                embedder,
            )
            meta = None
    return Adapter(name, resolved, rank, _fingerprint(weights), meta)


class AdapterRegistry:
    """Name -> checked adapter. Thread-safe; lookups are cheap."""

    def __init__(
        self, root: Path, base_dir: Path, max_rank: int, embedder: str | None = None
    ) -> None:
        self.root = root.resolve()
        self.base = BaseShapes.of(base_dir)
        self.max_rank = max_rank
        self.embedder = embedder
        self._lock = threading.Lock()
        self._adapters: dict[str, Adapter] = {}

    def scan(self) -> list[str]:
        """Register every adapter folder directly below the root; returns the problems of
        the ones refused (logged, not fatal: the server serves the rest)."""
        problems = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if folder.name.startswith("."):
                continue
            try:
                self.register(folder.name, folder)
            except AdapterError as exc:
                problems.append(str(exc))
                log.warning("Skipping adapter folder %s: %s", folder, exc)
        return problems

    def inspect(self, name: str, path: Path) -> Adapter:
        return inspect_adapter(name, path, self.root, self.base, self.max_rank, self.embedder)

    def register(self, name: str, path: Path) -> Adapter:
        adapter = self.inspect(name, path)
        self.add(adapter)
        return adapter

    def add(self, adapter: Adapter) -> None:
        with self._lock:
            if adapter.name in self._adapters:
                raise AdapterError(
                    f"an adapter named {adapter.name!r} is already loaded; unload it first",
                    "adapter_exists",
                )
            self._adapters[adapter.name] = adapter

    def remove(self, name: str) -> Adapter:
        with self._lock:
            adapter = self._adapters.pop(name, None)
        if adapter is None:
            raise AdapterError(f"no adapter named {name!r} is loaded", "adapter_not_found", 404)
        return adapter

    def get(self, name: str) -> Adapter | None:
        with self._lock:
            return self._adapters.get(name)

    def all(self) -> list[Adapter]:
        with self._lock:
            return sorted(self._adapters.values(), key=lambda a: a.name)

    def routable(self) -> list[AdapterMeta]:
        """Metadata of the adapters `auto` may choose, named as registered."""
        from dataclasses import replace

        return [replace(a.meta, name=a.name) for a in self.all() if a.meta is not None]
