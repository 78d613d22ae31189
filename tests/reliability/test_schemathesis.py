"""schemathesis against the server's own OpenAPI document, with a key and without: no 5xx,
every status, content type, header and body as documented, schema-invalid requests
refused with a 4xx, and no operation that declares auth served without it.

Bounded: a fixed number of examples per operation, max_tokens and n capped so that
generation stays cheap, no shrinking (a failure prints the case to reproduce)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.server import Server

CONFORMANCE = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
GENERATION_PATHS = {"/v1/chat/completions", "/v1/completions"}
# Writes to the store: the admin key, and small bodies (each example is embedded and
# fsynced).
ADMIN_PATHS = {"/v1/demonstrations"}


@pytest.fixture(scope="module")
def schema(server: Server) -> Any:
    return schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")


def _operations(schema: Any) -> list[Any]:
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8, [op.label for op in operations]
    return operations


def _keep_cheap(body: Any, model: str | None) -> None:
    """Cap what makes generation expensive, keeping the body as valid (or invalid) as it
    was: max_tokens and n have no upper bound in the schema, so lowering a positive value
    cannot turn a bad body into a good one."""
    if not isinstance(body, dict):
        return
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        # Without either (or with null) generation runs to the end of the context: minutes
        # on a CPU. Both are optional, so setting one keeps a valid body valid.
        body["max_tokens"] = 4
    for name, cap in (("max_tokens", 4), ("max_completion_tokens", 4), ("n", 2)):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            body[name] = cap
    if model is not None:
        body["model"] = model
    examples = body.get("examples")
    if isinstance(examples, list):
        del examples[3:]
        for example in examples:
            if isinstance(example, dict):
                for key, value in example.items():
                    if isinstance(value, str):
                        example[key] = value[:200]


def _run(
    server: Server,
    operation: Any,
    mode: GenerationMode,
    headers: dict[str, str],
    examples: int,
    checks: list[Callable[..., Any]],
) -> None:
    served_model = server.model if mode is GenerationMode.POSITIVE else None

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        if operation.path in GENERATION_PATHS:
            _keep_cheap(case.body, served_model)
        elif operation.path in ADMIN_PATHS and mode is GenerationMode.POSITIVE:
            # (Shortening the texts of a negative body could make it valid.)
            _keep_cheap(case.body, None)
        response = case.call(base_url=server.base_url, headers=headers, timeout=120)
        case.validate_response(response, checks=checks)

    check()


def _failures(run: Callable[[Any], None], operations: list[Any]) -> list[str]:
    failed = []
    for operation in operations:
        try:
            run(operation)
        except Unsatisfiable:
            # No schema-violating input exists (an operation without parameters or body).
            continue
        except Exception as exc:  # collect every operation's failure, not just the first
            parts = getattr(exc, "exceptions", None) or [exc]
            failed.append(f"{operation.label}: " + "\n".join(str(e)[:3000] for e in parts))
    return failed


@pytest.mark.timeout(600)
def test_positive_with_a_key(server: Server, schema: Any) -> None:
    def run(operation: Any) -> None:
        key = server.admin_key if operation.path in ADMIN_PATHS else server.api_key
        _run(
            server,
            operation,
            GenerationMode.POSITIVE,
            server.headers(key),
            25,
            [*CONFORMANCE, ignored_auth],
        )

    failed = _failures(run, _operations(schema))
    assert not failed, "\n\n".join(failed)


EXPLICIT_BODIES: dict[str, list[dict[str, Any]]] = {
    # Streams, which random bodies reach only now and then: each event is checked against
    # the documented event schema (the chunk models, the error body, [DONE]).
    "/v1/chat/completions": [
        {"messages": [{"role": "user", "content": "hi"}], "stream": True},
        {
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "n": 2,
            "stream_options": {"include_usage": True},
            "logprobs": True,
            "top_logprobs": 2,
        },
        {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 1},
    ],
    "/v1/completions": [
        {"prompt": "Once upon", "stream": True},
        {"prompt": ["a", "b"], "stream": True, "n": 2, "logprobs": 2},
        {"prompt": [1, 2, 3], "stream_options": {"include_usage": True}, "stream": True},
        {"prompt": "Once upon", "logprobs": 1},
    ],
}


def test_explicit_streams_conform(server: Server, schema: Any) -> None:
    checked = 0
    for operation in _operations(schema):
        for body in EXPLICIT_BODIES.get(operation.path, []):
            full = {"model": server.model, "max_tokens": 4, **body}
            case = operation.Case(body=full, media_type="application/json")
            response = case.call(base_url=server.base_url, headers=server.headers(), timeout=120)
            assert response.status_code == 200, (full, response.text[:500])
            case.validate_response(response, checks=CONFORMANCE)
            checked += 1
    assert checked == sum(len(bodies) for bodies in EXPLICIT_BODIES.values())


@pytest.mark.timeout(600)
def test_negative_with_a_key(server: Server, schema: Any) -> None:
    def run(operation: Any) -> None:
        key = server.admin_key if operation.path in ADMIN_PATHS else server.api_key
        _run(
            server,
            operation,
            GenerationMode.NEGATIVE,
            server.headers(key),
            20,
            [*CONFORMANCE, negative_data_rejection],
        )

    failed = _failures(run, _operations(schema))
    assert not failed, "\n\n".join(failed)


@pytest.mark.timeout(300)
def test_without_a_key(server: Server, schema: Any) -> None:
    def run(operation: Any) -> None:
        _run(server, operation, GenerationMode.POSITIVE, {}, 8, CONFORMANCE)

    failed = _failures(run, _operations(schema))
    assert not failed, "\n\n".join(failed)
