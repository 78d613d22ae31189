"""Python client for crosstask servers.

crosstask serves instruction-following language models through an OpenAI-compatible HTTP
API, adding cross-task demonstration retrieval and LoRA routing (the ``crosstask`` request
extension and response annotation). This package is its typed client::

    from crosstask_client import Crosstask, Demonstrations, Routing

    with Crosstask("http://127.0.0.1:8000", api_key="...") as client:
        reply = client.chat(
            [{"role": "user", "content": "How many legs do 3 spiders have?"}],
            demonstrations=Demonstrations(k=4),
            routing=Routing(mode="auto"),
            max_tokens=32,
        )
        print(reply.text, reply.crosstask)

See the README for streaming, management, errors, retries and batch files.
"""

from ._client import (
    AdaptersAPI,
    AsyncAdaptersAPI,
    AsyncCrosstask,
    AsyncDemonstrationsAPI,
    Crosstask,
    DemonstrationsAPI,
)
from ._streaming import AsyncStream, Stream
from ._version import __version__
from .batch import (
    BatchOutput,
    BatchResponse,
    batch_completion_line,
    batch_line,
    read_batch_output,
)
from .errors import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    CrosstaskError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    UnprocessableEntityError,
)
from .types import (
    Adapter,
    AdapterWeight,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CrosstaskInfo,
    Delta,
    DemonstrationHit,
    DemonstrationRef,
    Demonstrations,
    Example,
    Health,
    Model,
    ModelList,
    Routing,
    RetrievalInfo,
    RoutingDecision,
    Usage,
)

__all__ = [
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "Adapter",
    "AdapterWeight",
    "AdaptersAPI",
    "AsyncAdaptersAPI",
    "AsyncCrosstask",
    "AsyncDemonstrationsAPI",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "BatchOutput",
    "BatchResponse",
    "ChatChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatMessage",
    "ChunkChoice",
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "Crosstask",
    "CrosstaskError",
    "CrosstaskInfo",
    "Delta",
    "DemonstrationHit",
    "DemonstrationRef",
    "Demonstrations",
    "DemonstrationsAPI",
    "Example",
    "Health",
    "Model",
    "ModelList",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "Routing",
    "RetrievalInfo",
    "RoutingDecision",
    "ServerError",
    "Stream",
    "UnprocessableEntityError",
    "Usage",
    "__version__",
    "batch_completion_line",
    "batch_line",
    "read_batch_output",
]
