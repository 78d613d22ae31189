"""What the sync and async clients share.

Configuration, the calls (route, body, retry kind, key, parser) of every public method, and
the parsing of answers. The two clients differ only in how they send a call.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Generic, Optional, TypeVar, Union

import httpx
from pydantic import BaseModel, ValidationError

from . import _body
from ._retry import Kind, RetryPolicy
from ._version import __version__
from .errors import APIConnectionError, APIResponseValidationError, APITimeoutError
from .types import (
    Adapter,
    ChatCompletion,
    Completion,
    DemonstrationHit,
    Health,
    ModelList,
)

log = logging.getLogger("crosstask_client")

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
DEFAULT_MAX_RETRIES = 2

TimeoutArg = Union[float, httpx.Timeout, None]


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request of a public method: what to send, how to retry it, how to read the answer."""

    method: str
    path: str
    kind: Kind
    parse: Callable[[httpx.Response], T]
    body: Optional[dict[str, Any]] = None
    admin: bool = False
    stream: bool = False


class ClientConfig:
    """Base URL, keys, timeout and retry policy, and building requests from calls."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: Optional[str],
        admin_key: Optional[str],
        timeout: TimeoutArg,
        own_timeout: bool,
        retry: RetryPolicy,
        headers: Optional[Mapping[str, str]],
    ) -> None:
        base = str(base_url).strip().rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if base.endswith("/v1"):  # an OpenAI-style base URL: the routes add /v1 themselves
            base = base[: -len("/v1")]
        self.base_url = base
        self.api_key = api_key
        self.admin_key = admin_key
        self.timeout: Optional[httpx.Timeout] = None
        if own_timeout:
            self.timeout = (
                timeout
                if isinstance(timeout, httpx.Timeout)
                else (DEFAULT_TIMEOUT if timeout is None else httpx.Timeout(timeout))
            )
        self.retry = retry
        self.headers = {"User-Agent": f"crosstask-client/{__version__}", **(headers or {})}

    def key_for(self, call: Call[Any]) -> Optional[str]:
        """The key sent with a call: the admin key on management writes, else the API key."""
        if call.admin:
            return self.admin_key or self.api_key
        return self.api_key or self.admin_key

    def build_request(
        self, http: Union[httpx.Client, httpx.AsyncClient], call: Call[Any]
    ) -> httpx.Request:
        """The ``httpx.Request`` of a call."""
        headers = dict(self.headers)
        headers["Accept"] = "text/event-stream" if call.stream else "application/json"
        key = self.key_for(call)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        extra: dict[str, Any] = {}
        if self.timeout is not None:
            extra["timeout"] = self.timeout
        return http.build_request(
            call.method, self.base_url + call.path, json=call.body, headers=headers, **extra
        )


def connection_error(exc: httpx.TransportError) -> APIConnectionError:
    """The client exception for an httpx transport failure."""
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"Request timed out ({message})", cause=exc)
    return APIConnectionError(f"Connection error ({message})", cause=exc)


# --------------------------------------------------------------------------------------
# Parsing answers.
# --------------------------------------------------------------------------------------


def response_json(response: httpx.Response) -> Any:
    """The decoded JSON body of a success answer."""
    try:
        return response.json()
    except ValueError as exc:
        raise APIResponseValidationError(
            f"{response.request.method} {response.request.url.path}: the answer is not JSON",
            status_code=response.status_code,
            body=response.text,
        ) from exc


def validate(cls: type[M], data: Any, status_code: int = 200) -> M:
    """``cls.model_validate(data)``, raising :class:`APIResponseValidationError` on failure."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise APIResponseValidationError(
            f"the answer is not a valid {cls.__name__}: {exc}", status_code=status_code, body=data
        ) from exc


def parse_as(cls: type[M]) -> Callable[[httpx.Response], M]:
    """A parser validating the JSON body as ``cls``."""

    def parse(response: httpx.Response) -> M:
        return validate(cls, response_json(response), response.status_code)

    return parse


def _items(data: Any, *keys: str) -> list[Any]:
    """The list inside an answer: the answer itself, or under the first of ``keys`` present."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        for key in keys:
            value = data.get(key)
            if isinstance(value, list):
                return value
    raise APIResponseValidationError(
        f"expected a list (or an object with one of {', '.join(keys)})",
        status_code=200,
        body=data,
    )


def parse_list(cls: type[M], *keys: str) -> Callable[[httpx.Response], list[M]]:
    """A parser for a list of ``cls``, bare or under one of ``keys``."""

    def parse(response: httpx.Response) -> list[M]:
        items = _items(response_json(response), *keys)
        return [validate(cls, item, response.status_code) for item in items]

    return parse


def parse_ids(response: httpx.Response) -> list[str]:
    """The new ids from the answer of ``POST /v1/demonstrations``."""
    items = _items(response_json(response), "ids", "data", "demonstrations", "added")
    ids: list[str] = []
    for item in items:
        if isinstance(item, dict) and "id" in item:
            ids.append(str(item["id"]))
        elif isinstance(item, (str, int)):
            ids.append(str(item))
        else:
            raise APIResponseValidationError(
                f"not a demonstration id: {item!r}", status_code=response.status_code, body=item
            )
    return ids


def parse_message(response: httpx.Response) -> str:
    """The server's message on a load/unload: its text, or the ``message`` of a JSON body."""
    try:
        data = response.json()
    except ValueError:
        return response.text
    if isinstance(data, str):
        return data
    if isinstance(data, dict):
        for key in ("message", "status", "detail"):
            if isinstance(data.get(key), str):
                return str(data[key])
    return json.dumps(data)


def parse_health(response: httpx.Response) -> Health:
    """``GET /health``: any status is an answer; 2xx means ready."""
    body: Union[dict[str, Any], str, None]
    try:
        decoded = response.json()
        body = decoded if isinstance(decoded, dict) else response.text or None
    except ValueError:
        body = response.text or None
    return Health(ok=response.is_success, status_code=response.status_code, body=body)


def parse_text(response: httpx.Response) -> str:
    """The body as text (``/metrics``)."""
    return response.text


# --------------------------------------------------------------------------------------
# The calls of every public method.
# --------------------------------------------------------------------------------------


def chat_call(
    messages: _body.MessagesArg,
    model: str,
    *,
    task: Optional[str],
    demonstrations: _body.DemonstrationsArg,
    routing: _body.RoutingArg,
    exclude_tasks: Optional[Sequence[str]],
    stream: bool,
    sampling: Mapping[str, Any],
) -> Call[ChatCompletion]:
    """``POST /v1/chat/completions``."""
    body = _body.chat_body(
        messages,
        model,
        task=task,
        demonstrations=demonstrations,
        routing=routing,
        exclude_tasks=exclude_tasks,
        stream=stream,
        sampling=sampling,
    )
    return Call(
        "POST", "/v1/chat/completions", Kind.GENERATE, parse_as(ChatCompletion), body, stream=stream
    )


def completion_call(
    prompt: _body.PromptArg,
    model: str,
    *,
    task: Optional[str],
    demonstrations: _body.DemonstrationsArg,
    routing: _body.RoutingArg,
    exclude_tasks: Optional[Sequence[str]],
    stream: bool,
    sampling: Mapping[str, Any],
) -> Call[Completion]:
    """``POST /v1/completions``."""
    body = _body.completion_body(
        prompt,
        model,
        task=task,
        demonstrations=demonstrations,
        routing=routing,
        exclude_tasks=exclude_tasks,
        stream=stream,
        sampling=sampling,
    )
    return Call("POST", "/v1/completions", Kind.GENERATE, parse_as(Completion), body, stream=stream)


def models_call() -> Call[ModelList]:
    """``GET /v1/models``."""
    return Call("GET", "/v1/models", Kind.READ, parse_as(ModelList))


def health_call() -> Call[Health]:
    """``GET /health``."""
    return Call("GET", "/health", Kind.PROBE, parse_health)


def metrics_call() -> Call[str]:
    """``GET /metrics``."""
    return Call("GET", "/metrics", Kind.READ, parse_text)


def adapters_list_call() -> Call[list[Adapter]]:
    """``GET /v1/adapters``."""
    return Call("GET", "/v1/adapters", Kind.READ, parse_list(Adapter, "data", "adapters"))


def adapters_load_call(name: str, path: str) -> Call[str]:
    """``POST /v1/load_lora_adapter``."""
    return Call(
        "POST",
        "/v1/load_lora_adapter",
        Kind.WRITE,
        parse_message,
        {"lora_name": name, "lora_path": str(path)},
        admin=True,
    )


def adapters_unload_call(name: str) -> Call[str]:
    """``POST /v1/unload_lora_adapter``."""
    return Call(
        "POST",
        "/v1/unload_lora_adapter",
        Kind.WRITE,
        parse_message,
        {"lora_name": name},
        admin=True,
    )


def demonstrations_add_call(
    task: str, definition: str, examples: _body.ExamplesArg
) -> Call[list[str]]:
    """``POST /v1/demonstrations``."""
    body = {"task": task, "definition": definition, "examples": _body.examples_list(examples)}
    return Call("POST", "/v1/demonstrations", Kind.WRITE, parse_ids, body, admin=True)


def demonstrations_search_call(
    query: str, k: Optional[int], exclude_tasks: Optional[Sequence[str]]
) -> Call[list[DemonstrationHit]]:
    """``POST /v1/demonstrations/search``."""
    body: dict[str, Any] = {"query": query}
    if k is not None:
        body["k"] = k
    if exclude_tasks is not None:
        if isinstance(exclude_tasks, str):
            raise TypeError("exclude_tasks must be a list of task names, not a string")
        body["exclude_tasks"] = list(exclude_tasks)
    return Call(
        "POST",
        "/v1/demonstrations/search",
        Kind.READ,
        parse_list(DemonstrationHit, "hits", "data", "results"),
        body,
    )
