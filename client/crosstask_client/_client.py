"""The clients: :class:`Crosstask` (blocking) and :class:`AsyncCrosstask` (asyncio)."""

from __future__ import annotations

import asyncio
import builtins
import time
import types
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, TypeVar, Union, overload

import httpx

from . import _core
from ._body import DemonstrationsArg, ExamplesArg, MessagesArg, PromptArg, RoutingArg
from ._core import Call, ClientConfig, TimeoutArg
from ._retry import Kind, RetryPolicy
from ._streaming import AsyncStream, Stream
from .errors import error_from_response
from .types import (
    Adapter,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    DemonstrationHit,
    Health,
    ModelList,
)

__all__ = [
    "AdaptersAPI",
    "AsyncAdaptersAPI",
    "AsyncCrosstask",
    "AsyncDemonstrationsAPI",
    "Crosstask",
    "DemonstrationsAPI",
]

T = TypeVar("T")


def _config(
    base_url: str,
    api_key: Optional[str],
    admin_key: Optional[str],
    timeout: TimeoutArg,
    own_timeout: bool,
    max_retries: int,
    backoff_base: float,
    backoff_max: float,
    retry_after_max: float,
    headers: Optional[Mapping[str, str]],
) -> ClientConfig:
    if max_retries < 0:
        raise ValueError("max_retries must be >= 0")
    return ClientConfig(
        base_url,
        api_key=api_key,
        admin_key=admin_key,
        timeout=timeout,
        own_timeout=own_timeout,
        retry=RetryPolicy(
            max_retries=max_retries,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            retry_after_max=retry_after_max,
        ),
        headers=headers,
    )


# ======================================================================================
# Blocking client.
# ======================================================================================


class Crosstask:
    """Blocking client of a crosstask server.

    Args:
        base_url: the server's address, e.g. ``"http://127.0.0.1:8000"`` (a trailing
            ``/v1`` is accepted and dropped).
        api_key: sent as ``Authorization: Bearer <key>`` when the server has keys.
        admin_key: sent instead of ``api_key`` on management writes (``adapters.load``,
            ``adapters.unload``, ``demonstrations.add``); reads use ``api_key``, falling
            back to ``admin_key`` when only that one is given.
        timeout: seconds, or an ``httpx.Timeout``; ``None`` means the default (300 s,
            10 s to connect), or the timeout of ``http_client`` when one is given.
        max_retries: how many times a failed request may be tried again (0: never).
            Which failures are retried depends on the operation; see ``crosstask_client``'s
            README ("Retries").
        backoff_base: first retry delay ceiling in seconds; it doubles on each retry.
        backoff_max: largest retry delay ceiling in seconds.
        retry_after_max: largest ``Retry-After`` (seconds) honoured.
        headers: extra headers sent with every request.
        http_client: an ``httpx.Client`` to use (proxies, transports, limits); the caller
            keeps ownership of it and closes it.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str,
        api_key: Optional[str] = None,
        *,
        admin_key: Optional[str] = None,
        timeout: TimeoutArg = None,
        max_retries: int = _core.DEFAULT_MAX_RETRIES,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        retry_after_max: float = 60.0,
        headers: Optional[Mapping[str, str]] = None,
        http_client: Optional[httpx.Client] = None,
    ) -> None:
        self._config = _config(
            base_url,
            api_key,
            admin_key,
            timeout,
            http_client is None or timeout is not None,
            max_retries,
            backoff_base,
            backoff_max,
            retry_after_max,
            headers,
        )
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client()
        self.adapters = AdaptersAPI(self)
        """Adapter management: ``list``, ``load``, ``unload``."""
        self.demonstrations = DemonstrationsAPI(self)
        """Demonstration store: ``add``, ``search``."""

    @property
    def base_url(self) -> str:
        """The server's address, without ``/v1``."""
        return self._config.base_url

    # -- transport --------------------------------------------------------------------

    def _send(self, call: Call[Any]) -> httpx.Response:
        policy = self._config.retry
        attempt = 0
        while True:
            request = self._config.build_request(self._http, call)
            try:
                response = self._http.send(request, stream=call.stream)
            except httpx.TransportError as exc:
                if not policy.retry_exception(call.kind, exc, attempt):
                    raise _core.connection_error(exc) from exc
                delay = policy.delay(attempt)
                _core.log.info(
                    "%s %s failed (%r); retrying in %.2fs", call.method, call.path, exc, delay
                )
                time.sleep(delay)
                attempt += 1
                continue
            if response.is_success or call.kind is Kind.PROBE:
                return response
            if policy.retry_status(call.kind, response.status_code, attempt):
                delay = policy.delay(attempt, response.headers.get("retry-after"))
                response.close()
                _core.log.info(
                    "%s %s answered %d; retrying in %.2fs",
                    call.method,
                    call.path,
                    response.status_code,
                    delay,
                )
                time.sleep(delay)
                attempt += 1
                continue
            try:
                response.read()
            except httpx.TransportError as exc:
                raise _core.connection_error(exc) from exc
            finally:
                response.close()
            raise error_from_response(response)

    def _run(self, call: Call[T]) -> T:
        return call.parse(self._send(call))

    def _stream(self, call: Call[Any], chunk_type: type[_core.M]) -> Stream[_core.M]:
        return Stream(self._send(call), chunk_type)

    # -- generation -------------------------------------------------------------------

    @overload
    def chat(
        self,
        messages: MessagesArg,
        model: str = ...,
        *,
        task: Optional[str] = ...,
        demonstrations: DemonstrationsArg = ...,
        routing: RoutingArg = ...,
        exclude_tasks: Optional[Sequence[str]] = ...,
        stream: Literal[False] = ...,
        **sampling: Any,
    ) -> ChatCompletion: ...

    @overload
    def chat(
        self,
        messages: MessagesArg,
        model: str = ...,
        *,
        task: Optional[str] = ...,
        demonstrations: DemonstrationsArg = ...,
        routing: RoutingArg = ...,
        exclude_tasks: Optional[Sequence[str]] = ...,
        stream: Literal[True],
        **sampling: Any,
    ) -> Stream[ChatCompletionChunk]: ...

    @overload
    def chat(
        self,
        messages: MessagesArg,
        model: str = ...,
        *,
        task: Optional[str] = ...,
        demonstrations: DemonstrationsArg = ...,
        routing: RoutingArg = ...,
        exclude_tasks: Optional[Sequence[str]] = ...,
        stream: bool,
        **sampling: Any,
    ) -> Union[ChatCompletion, Stream[ChatCompletionChunk]]: ...

    def chat(
        self,
        messages: MessagesArg,
        model: str = "auto",
        *,
        task: Optional[str] = None,
        demonstrations: DemonstrationsArg = None,
        routing: RoutingArg = None,
        exclude_tasks: Optional[Sequence[str]] = None,
        stream: bool = False,
        **sampling: Any,
    ) -> Union[ChatCompletion, Stream[ChatCompletionChunk]]:
        """Create a chat completion (``POST /v1/chat/completions``).

        Args:
            messages: ``[{"role": ..., "content": ...}, ...]`` (dicts or ``ChatMessage``).
            model: the base model's name, an adapter's name, or ``"auto"`` (the router).
            task: the task definition for retrieval and routing (server default: the
                system message).
            demonstrations: ``Demonstrations(k=..., min_score=...)`` (or a dict).
            routing: ``Routing(mode=..., adapters=..., weights=..., top_k=...)`` (or a dict).
            exclude_tasks: task names treated as unseen (no demonstrations, no adapters
                trained on them under ``auto``).
            stream: return a :class:`Stream` of ``ChatCompletionChunk`` instead.
            **sampling: other OpenAI parameters (``max_tokens``, ``temperature``,
                ``top_p``, ``n``, ``stop``, ``seed``, ``logprobs``, ``top_logprobs``,
                ``stream_options``, ...); ``None`` values are left out.

        Returns:
            A ``ChatCompletion`` whose ``crosstask`` tells what was done, or a stream.
        """
        call = _core.chat_call(
            messages,
            model,
            task=task,
            demonstrations=demonstrations,
            routing=routing,
            exclude_tasks=exclude_tasks,
            stream=stream,
            sampling=sampling,
        )
        if stream:
            return self._stream(call, ChatCompletionChunk)
        return self._run(call)

    @overload
    def complete(
        self,
        prompt: PromptArg,
        model: str = ...,
        *,
        task: Optional[str] = ...,
        demonstrations: DemonstrationsArg = ...,
        routing: RoutingArg = ...,
        exclude_tasks: Optional[Sequence[str]] = ...,
        stream: Literal[False] = ...,
        **sampling: Any,
    ) -> Completion: ...

    @overload
    def complete(
        self,
        prompt: PromptArg,
        model: str = ...,
        *,
        task: Optional[str] = ...,
        demonstrations: DemonstrationsArg = ...,
        routing: RoutingArg = ...,
        exclude_tasks: Optional[Sequence[str]] = ...,
        stream: Literal[True],
        **sampling: Any,
    ) -> Stream[CompletionChunk]: ...

    @overload
    def complete(
        self,
        prompt: PromptArg,
        model: str = ...,
        *,
        task: Optional[str] = ...,
        demonstrations: DemonstrationsArg = ...,
        routing: RoutingArg = ...,
        exclude_tasks: Optional[Sequence[str]] = ...,
        stream: bool,
        **sampling: Any,
    ) -> Union[Completion, Stream[CompletionChunk]]: ...

    def complete(
        self,
        prompt: PromptArg,
        model: str = "auto",
        *,
        task: Optional[str] = None,
        demonstrations: DemonstrationsArg = None,
        routing: RoutingArg = None,
        exclude_tasks: Optional[Sequence[str]] = None,
        stream: bool = False,
        **sampling: Any,
    ) -> Union[Completion, Stream[CompletionChunk]]:
        """Create a text completion (``POST /v1/completions``).

        ``prompt`` is a string (or a list of strings, or token ids); the other arguments are
        those of :meth:`chat`. Returns a ``Completion``, or a :class:`Stream` of
        ``CompletionChunk`` with ``stream=True``.
        """
        call = _core.completion_call(
            prompt,
            model,
            task=task,
            demonstrations=demonstrations,
            routing=routing,
            exclude_tasks=exclude_tasks,
            stream=stream,
            sampling=sampling,
        )
        if stream:
            return self._stream(call, CompletionChunk)
        return self._run(call)

    # -- the rest ---------------------------------------------------------------------

    def models(self) -> ModelList:
        """List the served models (``GET /v1/models``).

        The list holds the base model, every adapter (``parent`` set to the base) and ``auto``.
        """
        return self._run(_core.models_call())

    def health(self) -> Health:
        """Ask whether the server is ready (``GET /health``).

        Returns a :class:`Health`, true when the server answered 2xx (503 means not ready,
        or failed). Raises :class:`APIConnectionError` if the server cannot be reached.
        """
        return self._run(_core.health_call())

    def metrics(self) -> str:
        """The Prometheus metrics text (``GET /metrics``)."""
        return self._run(_core.metrics_call())

    def close(self) -> None:
        """Close the underlying HTTP client (unless it was passed in)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Crosstask:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[types.TracebackType],
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Crosstask({self.base_url!r})"


class AdaptersAPI:
    """``client.adapters``: the LoRA adapters a server serves."""

    def __init__(self, client: Crosstask) -> None:
        self._client = client

    def list(self) -> builtins.list[Adapter]:
        """The registered adapters with their training tasks and rank (``GET /v1/adapters``)."""
        return self._client._run(_core.adapters_list_call())

    def load(self, name: str, path: str) -> str:
        """Register the adapter in folder ``path`` (on the server) under ``name``.

        ``POST /v1/load_lora_adapter``; sends the admin key. Returns the server's message.
        """
        return self._client._run(_core.adapters_load_call(name, path))

    def unload(self, name: str) -> str:
        """Unregister adapter ``name`` (``POST /v1/unload_lora_adapter``; admin key).

        Returns the server's message.
        """
        return self._client._run(_core.adapters_unload_call(name))


class DemonstrationsAPI:
    """``client.demonstrations``: the server's demonstration store."""

    def __init__(self, client: Crosstask) -> None:
        self._client = client

    def add(self, task: str, definition: str, examples: ExamplesArg) -> list[str]:
        """Add a task's examples to the store (``POST /v1/demonstrations``; admin key).

        ``examples`` is a list of ``{"input": ..., "output": ...}`` (or ``Example``). The
        server answers once the additions are durable; returns the new ids. Never retried
        unless the connection failed before anything was sent.
        """
        return self._client._run(_core.demonstrations_add_call(task, definition, examples))

    def search(
        self,
        query: str,
        k: Optional[int] = None,
        exclude_tasks: Optional[Sequence[str]] = None,
    ) -> list[DemonstrationHit]:
        """Search the store (``POST /v1/demonstrations/search``).

        Returns the ``k`` demonstrations nearest to ``query``, best first, with their scores,
        leaving out ``exclude_tasks``; ``None`` leaves the server default.
        """
        return self._client._run(_core.demonstrations_search_call(query, k, exclude_tasks))


# ======================================================================================
# Async client.
# ======================================================================================


class AsyncCrosstask:
    """Asyncio client of a crosstask server: the surface of :class:`Crosstask`, awaited.

    Takes the same arguments as :class:`Crosstask` (``http_client`` is an
    ``httpx.AsyncClient``). Use as ``async with``, or ``await client.aclose()``.
    Streaming: ``async with await client.chat(..., stream=True) as stream:``.
    """

    def __init__(
        self,
        base_url: str,
        api_key: Optional[str] = None,
        *,
        admin_key: Optional[str] = None,
        timeout: TimeoutArg = None,
        max_retries: int = _core.DEFAULT_MAX_RETRIES,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        retry_after_max: float = 60.0,
        headers: Optional[Mapping[str, str]] = None,
        http_client: Optional[httpx.AsyncClient] = None,
    ) -> None:
        self._config = _config(
            base_url,
            api_key,
            admin_key,
            timeout,
            http_client is None or timeout is not None,
            max_retries,
            backoff_base,
            backoff_max,
            retry_after_max,
            headers,
        )
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.AsyncClient()
        self.adapters = AsyncAdaptersAPI(self)
        """Adapter management: ``list``, ``load``, ``unload``."""
        self.demonstrations = AsyncDemonstrationsAPI(self)
        """Demonstration store: ``add``, ``search``."""

    @property
    def base_url(self) -> str:
        """The server's address, without ``/v1``."""
        return self._config.base_url

    async def _send(self, call: Call[Any]) -> httpx.Response:
        policy = self._config.retry
        attempt = 0
        while True:
            request = self._config.build_request(self._http, call)
            try:
                response = await self._http.send(request, stream=call.stream)
            except httpx.TransportError as exc:
                if not policy.retry_exception(call.kind, exc, attempt):
                    raise _core.connection_error(exc) from exc
                delay = policy.delay(attempt)
                _core.log.info(
                    "%s %s failed (%r); retrying in %.2fs", call.method, call.path, exc, delay
                )
                await asyncio.sleep(delay)
                attempt += 1
                continue
            if response.is_success or call.kind is Kind.PROBE:
                return response
            if policy.retry_status(call.kind, response.status_code, attempt):
                delay = policy.delay(attempt, response.headers.get("retry-after"))
                await response.aclose()
                _core.log.info(
                    "%s %s answered %d; retrying in %.2fs",
                    call.method,
                    call.path,
                    response.status_code,
                    delay,
                )
                await asyncio.sleep(delay)
                attempt += 1
                continue
            try:
                await response.aread()
            except httpx.TransportError as exc:
                raise _core.connection_error(exc) from exc
            finally:
                await response.aclose()
            raise error_from_response(response)

    async def _run(self, call: Call[T]) -> T:
        return call.parse(await self._send(call))

    async def _stream(self, call: Call[Any], chunk_type: type[_core.M]) -> AsyncStream[_core.M]:
        return AsyncStream(await self._send(call), chunk_type)

    @overload
    async def chat(
        self,
        messages: MessagesArg,
        model: str = ...,
        *,
        task: Optional[str] = ...,
        demonstrations: DemonstrationsArg = ...,
        routing: RoutingArg = ...,
        exclude_tasks: Optional[Sequence[str]] = ...,
        stream: Literal[False] = ...,
        **sampling: Any,
    ) -> ChatCompletion: ...

    @overload
    async def chat(
        self,
        messages: MessagesArg,
        model: str = ...,
        *,
        task: Optional[str] = ...,
        demonstrations: DemonstrationsArg = ...,
        routing: RoutingArg = ...,
        exclude_tasks: Optional[Sequence[str]] = ...,
        stream: Literal[True],
        **sampling: Any,
    ) -> AsyncStream[ChatCompletionChunk]: ...

    @overload
    async def chat(
        self,
        messages: MessagesArg,
        model: str = ...,
        *,
        task: Optional[str] = ...,
        demonstrations: DemonstrationsArg = ...,
        routing: RoutingArg = ...,
        exclude_tasks: Optional[Sequence[str]] = ...,
        stream: bool,
        **sampling: Any,
    ) -> Union[ChatCompletion, AsyncStream[ChatCompletionChunk]]: ...

    async def chat(
        self,
        messages: MessagesArg,
        model: str = "auto",
        *,
        task: Optional[str] = None,
        demonstrations: DemonstrationsArg = None,
        routing: RoutingArg = None,
        exclude_tasks: Optional[Sequence[str]] = None,
        stream: bool = False,
        **sampling: Any,
    ) -> Union[ChatCompletion, AsyncStream[ChatCompletionChunk]]:
        """Create a chat completion; see :meth:`Crosstask.chat`.

        With ``stream=True`` returns an :class:`AsyncStream` of ``ChatCompletionChunk``.
        """
        call = _core.chat_call(
            messages,
            model,
            task=task,
            demonstrations=demonstrations,
            routing=routing,
            exclude_tasks=exclude_tasks,
            stream=stream,
            sampling=sampling,
        )
        if stream:
            return await self._stream(call, ChatCompletionChunk)
        return await self._run(call)

    @overload
    async def complete(
        self,
        prompt: PromptArg,
        model: str = ...,
        *,
        task: Optional[str] = ...,
        demonstrations: DemonstrationsArg = ...,
        routing: RoutingArg = ...,
        exclude_tasks: Optional[Sequence[str]] = ...,
        stream: Literal[False] = ...,
        **sampling: Any,
    ) -> Completion: ...

    @overload
    async def complete(
        self,
        prompt: PromptArg,
        model: str = ...,
        *,
        task: Optional[str] = ...,
        demonstrations: DemonstrationsArg = ...,
        routing: RoutingArg = ...,
        exclude_tasks: Optional[Sequence[str]] = ...,
        stream: Literal[True],
        **sampling: Any,
    ) -> AsyncStream[CompletionChunk]: ...

    @overload
    async def complete(
        self,
        prompt: PromptArg,
        model: str = ...,
        *,
        task: Optional[str] = ...,
        demonstrations: DemonstrationsArg = ...,
        routing: RoutingArg = ...,
        exclude_tasks: Optional[Sequence[str]] = ...,
        stream: bool,
        **sampling: Any,
    ) -> Union[Completion, AsyncStream[CompletionChunk]]: ...

    async def complete(
        self,
        prompt: PromptArg,
        model: str = "auto",
        *,
        task: Optional[str] = None,
        demonstrations: DemonstrationsArg = None,
        routing: RoutingArg = None,
        exclude_tasks: Optional[Sequence[str]] = None,
        stream: bool = False,
        **sampling: Any,
    ) -> Union[Completion, AsyncStream[CompletionChunk]]:
        """Create a text completion; see :meth:`Crosstask.complete`.

        With ``stream=True`` returns an :class:`AsyncStream` of ``CompletionChunk``.
        """
        call = _core.completion_call(
            prompt,
            model,
            task=task,
            demonstrations=demonstrations,
            routing=routing,
            exclude_tasks=exclude_tasks,
            stream=stream,
            sampling=sampling,
        )
        if stream:
            return await self._stream(call, CompletionChunk)
        return await self._run(call)

    async def models(self) -> ModelList:
        """List the served models; see :meth:`Crosstask.models`."""
        return await self._run(_core.models_call())

    async def health(self) -> Health:
        """Ask whether the server is ready; see :meth:`Crosstask.health`."""
        return await self._run(_core.health_call())

    async def metrics(self) -> str:
        """The Prometheus metrics text (``GET /metrics``)."""
        return await self._run(_core.metrics_call())

    async def aclose(self) -> None:
        """Close the underlying HTTP client (unless it was passed in)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncCrosstask:
        return self

    async def __aexit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[types.TracebackType],
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncCrosstask({self.base_url!r})"


class AsyncAdaptersAPI:
    """``client.adapters`` of :class:`AsyncCrosstask`; see :class:`AdaptersAPI`."""

    def __init__(self, client: AsyncCrosstask) -> None:
        self._client = client

    async def list(self) -> builtins.list[Adapter]:
        """The registered adapters (``GET /v1/adapters``)."""
        return await self._client._run(_core.adapters_list_call())

    async def load(self, name: str, path: str) -> str:
        """Register an adapter; see :meth:`AdaptersAPI.load`."""
        return await self._client._run(_core.adapters_load_call(name, path))

    async def unload(self, name: str) -> str:
        """Unregister an adapter; see :meth:`AdaptersAPI.unload`."""
        return await self._client._run(_core.adapters_unload_call(name))


class AsyncDemonstrationsAPI:
    """``client.demonstrations`` of :class:`AsyncCrosstask`; see :class:`DemonstrationsAPI`."""

    def __init__(self, client: AsyncCrosstask) -> None:
        self._client = client

    async def add(self, task: str, definition: str, examples: ExamplesArg) -> list[str]:
        """Add a task's examples; see :meth:`DemonstrationsAPI.add`."""
        return await self._client._run(_core.demonstrations_add_call(task, definition, examples))

    async def search(
        self,
        query: str,
        k: Optional[int] = None,
        exclude_tasks: Optional[Sequence[str]] = None,
    ) -> list[DemonstrationHit]:
        """Search the store; see :meth:`DemonstrationsAPI.search`."""
        return await self._client._run(_core.demonstrations_search_call(query, k, exclude_tasks))
