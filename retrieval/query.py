"""The one text that gets embedded for a (task definition, input) pair.

Stored demonstrations and incoming requests must be embedded identically, so both the
store build and the server call `query_text`. Change it and every store must be rebuilt
(`QUERY_TEXT_VERSION` is recorded in a store's metadata for that reason).
"""

from __future__ import annotations

QUERY_TEXT_VERSION = 1

# The embedder reads at most a few hundred tokens. Natural Instructions definitions run to
# 2,400 characters; left whole they would fill the window, every example of a task would
# embed alike and the input would never be seen. A definition's opening sentences say
# what the task is; that is all retrieval needs of it.
DEFINITION_CHARS = 320


def query_text(definition: str, input: str) -> str:
    """`definition` (shortened to its opening) and `input`, as one text to embed."""
    head = _shorten(" ".join(definition.split()), DEFINITION_CHARS)
    body = input.strip()
    if not head:
        return body
    if not body:
        return head
    return f"{head}\n{body}"


def _shorten(text: str, limit: int) -> str:
    """At most `limit` characters, cut at a word boundary."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    return cut[:space] if space > limit // 2 else cut
