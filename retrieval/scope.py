"""What a request's demonstrations are chosen by."""

from __future__ import annotations

from enum import StrEnum


class RetrievalScope(StrEnum):
    # By the task definition alone: every request of a task gets the same demonstrations
    # in the same order, so their prompts share one long prefix that the engine's prefix
    # cache computes once (docs/retrieval.md, "Scope").
    TASK = "task"
    # By the definition and the request's own input, as the stored demonstrations are
    # embedded: the nearest examples for each input, and a prompt prefix of its own.
    INPUT = "input"
