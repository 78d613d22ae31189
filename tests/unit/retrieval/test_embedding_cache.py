"""The retriever's embedding cache: repeated texts cost no encode, concurrent requests for
one text share one, the cache stays within its size, and a caller that gives up does not
cancel the encode others wait for."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from retrieval.retriever import EmbeddingCache, Retriever


class CountingEmbedder:
    """One encode call per batch, recorded; optionally held until released."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.release.set()

    def encode(self, texts: list[str]) -> np.ndarray:
        self.release.wait(10)
        self.batches.append(list(texts))
        out = np.array([[len(t), 1.0] for t in texts], dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


class NoStore:
    def close(self) -> None:
        pass


def _retriever(size: int = 4) -> tuple[Retriever, CountingEmbedder]:
    embedder = CountingEmbedder()
    retriever = Retriever(embedder, NoStore(), cache=EmbeddingCache(size))  # type: ignore[arg-type]
    return retriever, embedder


def test_a_repeated_text_is_encoded_once() -> None:
    async def scenario() -> None:
        retriever, embedder = _retriever()
        first = await retriever.embed("a definition")
        again = await retriever.embed("a definition")
        assert again is first and not again.flags.writeable  # shared, so read-only
        assert embedder.batches == [["a definition"]]
        assert (retriever.cache.hits, retriever.cache.misses) == (1, 1)
        await retriever.close()

    asyncio.run(scenario())


def test_concurrent_requests_for_one_text_share_one_encode() -> None:
    async def scenario() -> None:
        retriever, embedder = _retriever()
        embedder.release.clear()
        waiting = [asyncio.create_task(retriever.embed("same")) for _ in range(5)]
        await asyncio.sleep(0.05)
        embedder.release.set()
        vectors = await asyncio.gather(*waiting)
        assert all(v is vectors[0] for v in vectors)
        assert embedder.batches == [["same"]]
        await retriever.close()

    asyncio.run(scenario())


def test_the_cache_keeps_the_most_recently_used() -> None:
    async def scenario() -> None:
        retriever, embedder = _retriever(size=2)
        for text in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" comes
            await retriever.embed(text)
        assert len(retriever.cache) == 2
        await retriever.embed("a")
        await retriever.embed("b")
        assert [b for batch in embedder.batches for b in batch] == ["a", "b", "c", "b"]
        await retriever.close()

    asyncio.run(scenario())


def test_size_zero_caches_nothing() -> None:
    async def scenario() -> None:
        retriever, embedder = _retriever(size=0)
        await retriever.embed("a")
        await retriever.embed("a")
        assert len(embedder.batches) == 2 and len(retriever.cache) == 0
        await retriever.close()

    asyncio.run(scenario())


def test_a_caller_that_gives_up_leaves_the_encode_to_the_others() -> None:
    async def scenario() -> None:
        retriever, embedder = _retriever()
        embedder.release.clear()
        quitter = asyncio.create_task(retriever.embed("text"))
        stayer = asyncio.create_task(retriever.embed("text"))
        await asyncio.sleep(0.05)
        quitter.cancel()
        embedder.release.set()
        vector = await stayer
        with pytest.raises(asyncio.CancelledError):
            await quitter
        assert vector.shape == (2,)
        assert await retriever.embed("text") is vector  # cached for the next caller too
        assert embedder.batches == [["text"]]
        await retriever.close()

    asyncio.run(scenario())
