"""The routing modes a request can ask for (`crosstask.routing.mode`)."""

from __future__ import annotations

from enum import StrEnum


class RoutingMode(StrEnum):
    OFF = "off"  # the base model alone
    ADAPTER = "adapter"  # one adapter
    MERGE = "merge"  # a weighted merge of adapters, served as one LoRA
    FUSE = "fuse"  # adapters (and the base) decode in lockstep, their logits fused
    AUTO = "auto"  # the router chooses
