"""Which vLLM LoRA id each adapter name holds, and which ids still have requests running.

Ids are never reused: vLLM caches weights by id, so a name re-loaded (perhaps from another
folder) must not hit the old weights. An id unloaded while requests still run on it is
retired, and leaves vLLM when its last request ends: vLLM would otherwise reload it
mid-request from a folder that may be gone, and a failed load inside a step kills the
engine. Thread-safe; the engine makes the vLLM calls these answers ask for.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from serve.engine.types import LoraLoadError, LoraTarget


@dataclass
class LoraSlot:
    lora_id: int
    path: Path
    loaded: bool = False


class LoraSlots:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[str, LoraSlot] = {}
        self._next_id = 1
        self._running: dict[int, int] = {}
        self._retired: set[int] = set()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._slots)

    def claim(self, target: LoraTarget) -> tuple[LoraSlot, int | None]:
        """The slot for `target` (a new id when the name is new or its folder changed), and
        an id that the caller must remove from vLLM now (the one replaced, unless requests
        still run on it: then it is retired instead)."""
        with self._lock:
            slot = self._slots.get(target.name)
            if slot is not None and slot.path == target.path:
                return slot, None
            replaced = slot.lora_id if slot is not None else None
            slot = LoraSlot(lora_id=self._next_id, path=target.path)
            self._next_id += 1
            self._slots[target.name] = slot
            if replaced is not None and self._running.get(replaced, 0) > 0:
                self._retired.add(replaced)
                replaced = None
            return slot, replaced

    def loaded(self, slot: LoraSlot) -> None:
        with self._lock:
            slot.loaded = True

    def failed(self, name: str, slot: LoraSlot) -> None:
        """vLLM refused the slot's files: forget the name unless it was claimed anew since."""
        with self._lock:
            if self._slots.get(name) is slot:
                del self._slots[name]

    def acquire(self, name: str, lora_id: int) -> None:
        """Count a request running on `lora_id`. LoraLoadError when the name was unloaded
        (or re-loaded) while it was being loaded: better refused than run on an adapter on
        its way out."""
        with self._lock:
            slot = self._slots.get(name)
            if slot is None or slot.lora_id != lora_id:
                raise LoraLoadError(f"adapter {name!r} was unloaded")
            self._running[lora_id] = self._running.get(lora_id, 0) + 1

    def release(self, lora_id: int) -> bool:
        """A request on `lora_id` ended. True when the id must now leave vLLM."""
        with self._lock:
            running = self._running.get(lora_id, 0) - 1
            if running > 0:
                self._running[lora_id] = running
                return False
            self._running.pop(lora_id, None)
            if lora_id not in self._retired:
                return False
            self._retired.discard(lora_id)
            return True

    def remove(self, name: str) -> tuple[bool, int | None]:
        """Forget `name`: (whether it was known, the id to remove from vLLM now; None while
        requests still run on it, which then retire it)."""
        with self._lock:
            slot = self._slots.pop(name, None)
            if slot is None:
                return False, None
            if self._running.get(slot.lora_id, 0) > 0:
                self._retired.add(slot.lora_id)
                return True, None
            return True, slot.lora_id
