from __future__ import annotations

from typing import Any, Union

import httpx
import pytest

from crosstask_client import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AsyncCrosstask,
    AuthenticationError,
    BadRequestError,
    Crosstask,
    CrosstaskError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    UnprocessableEntityError,
)


def _client(status: int, body: Union[dict[str, Any], str, bytes], **headers: str) -> Crosstask:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, dict):
            return httpx.Response(status, json=body, headers=headers)
        content = body.encode() if isinstance(body, str) else body
        return httpx.Response(status, content=content, headers=headers)

    return Crosstask(
        "http://test",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
    )


def _openai_error(message: str, type_: str, param: Any = None, code: Any = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, BadRequestError),
        (413, BadRequestError),
        (418, BadRequestError),
        (422, UnprocessableEntityError),
        (429, RateLimitError),
        (500, ServerError),
        (502, ServerError),
        (503, ServerError),
    ],
)
def test_status_maps_to_class(status: int, cls: type[APIStatusError]) -> None:
    client = _client(status, _openai_error("nope", "some_error", "max_tokens", "bad_value"))
    with pytest.raises(cls) as caught:
        client.models()
    err = caught.value
    assert type(err) is cls
    assert isinstance(err, APIStatusError) and isinstance(err, CrosstaskError)
    assert (err.status_code, err.message, err.type, err.param, err.code) == (
        status,
        "nope",
        "some_error",
        "max_tokens",
        "bad_value",
    )
    assert err.response is not None and err.response.status_code == status
    assert str(err) == f"HTTP {status} some_error: nope"


def test_non_json_body() -> None:
    with pytest.raises(ServerError) as caught:
        _client(502, "<html>Bad Gateway</html>").models()
    assert caught.value.message == "<html>Bad Gateway</html>"
    assert caught.value.type is None and caught.value.code is None
    with pytest.raises(NotFoundError) as missing:
        _client(404, b"").models()
    assert missing.value.message == "Not Found"
    with pytest.raises(BadRequestError) as binary:
        _client(400, b"\xff\xfe\x00garbage").models()
    assert binary.value.status_code == 400


def test_other_error_shapes() -> None:
    flat = {
        "object": "error",
        "message": "model x does not exist",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }
    with pytest.raises(NotFoundError) as caught:
        _client(404, flat).models()
    assert caught.value.message == "model x does not exist" and caught.value.code == 404
    fastapi = {"detail": [{"loc": ["body", "messages"], "msg": "field required"}]}
    with pytest.raises(UnprocessableEntityError) as unprocessable:
        _client(422, fastapi).models()
    assert "field required" in unprocessable.value.message
    with pytest.raises(AuthenticationError) as auth:
        _client(401, {"error": "Unauthorized"}).models()
    assert auth.value.message == "Unauthorized"


def test_success_that_is_not_json() -> None:
    with pytest.raises(APIResponseValidationError):
        _client(200, "hello").models()
    with pytest.raises(APIResponseValidationError):
        _client(200, {"object": "list", "data": [{"no_id": 1}]}).models()


@pytest.mark.parametrize(
    ("exc", "cls"),
    [
        (httpx.ConnectError("refused"), APIConnectionError),
        (httpx.ReadError("reset"), APIConnectionError),
        (httpx.RemoteProtocolError("Server disconnected"), APIConnectionError),
        (httpx.ConnectTimeout("slow"), APITimeoutError),
        (httpx.ReadTimeout("slow"), APITimeoutError),
    ],
)
def test_transport_errors(exc: Exception, cls: type[APIConnectionError]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    client = Crosstask(
        "http://test",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
    )
    with pytest.raises(cls) as caught:
        client.chat([{"role": "user", "content": "x"}])
    assert caught.value.cause is exc
    assert isinstance(caught.value, CrosstaskError)


async def test_async_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json=_openai_error("bad key", "authentication_error"))

    client = AsyncCrosstask(
        "http://test", http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler))
    )
    with pytest.raises(AuthenticationError) as caught:
        await client.chat([{"role": "user", "content": "x"}], stream=True)
    assert caught.value.message == "bad key" and caught.value.status_code == 401
