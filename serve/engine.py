"""The only module that talks to vLLM: it owns the V1 async engine (continuous batching,
prefix caching, streaming) and speaks plain dataclasses to the rest of crosstask."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_GIB = 1 << 30


@dataclass(frozen=True)
class EngineConfig:
    model_dir: Path
    served_name: str
    dtype: str = "auto"
    max_model_len: int | None = None
    kv_cache_gb: float = 4.0
    enforce_eager: bool = False
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True


@dataclass
class GenerationParams:
    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # None: no logprobs; k >= 0: the sampled token's logprob plus the top k alternatives.
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class OutputDelta:
    """What one choice produced since the previous delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None


class EngineNotReadyError(RuntimeError):
    pass


class EngineDeadError(RuntimeError):
    pass


class InvalidParamsError(ValueError):
    """Sampling settings the engine refuses."""


def _resolve_dtype(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    # vLLM's CPU path answers garbage for SmolLM2 in bfloat16 while transformers is fine;
    # float32 is the safe choice on CPU. On GPU the model's own dtype is right.
    return "auto" if torch.cuda.is_available() else "float32"


class Engine:
    """A started vLLM AsyncLLM plus what the request path needs from it."""

    def __init__(self, config: EngineConfig, llm: Any) -> None:
        self.config = config
        self._llm = llm
        self.tokenizer: Any = llm.get_tokenizer()
        self.max_model_len: int = int(llm.model_config.max_model_len)
        self._load_lock = threading.Lock()
        self._load: tuple[int, int] = (0, 0)

    @classmethod
    def start(cls, config: EngineConfig) -> Engine:
        """Build the engine (blocking: loads weights, compiles unless eager). Safe to call
        from a worker thread; the output loop starts on the first request."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        holder: list[Engine] = []

        def stat_logger(vllm_config: Any, engine_index: int = 0) -> Any:
            return _LoadLogger(holder)

        args = AsyncEngineArgs(
            model=str(config.model_dir),
            served_model_name=[config.served_name],
            dtype=_resolve_dtype(config.dtype),  # type: ignore[arg-type]
            max_model_len=config.max_model_len,  # type: ignore[arg-type]
            kv_cache_memory_bytes=int(config.kv_cache_gb * _GIB),
            enforce_eager=config.enforce_eager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            enable_prefix_caching=config.enable_prefix_caching,
            trust_remote_code=False,
            disable_log_stats=True,
        )
        log.info(
            "Starting vLLM on %s (dtype %s, eager %s, KV cache %.1f GiB)",
            config.model_dir,
            args.dtype,
            config.enforce_eager,
            config.kv_cache_gb,
        )
        # The API server's context gives the batch defaults vLLM's own server uses.
        llm = AsyncLLM.from_engine_args(
            args, usage_context=UsageContext.OPENAI_API_SERVER, stat_loggers=[stat_logger]
        )
        engine = cls(config, llm)
        holder.append(engine)
        return engine

    # -- state -------------------------------------------------------------------------

    @property
    def errored(self) -> bool:
        return bool(self._llm.errored)

    def load(self) -> tuple[int, int]:
        """(running, waiting) requests. Scheduler stats arrive only with engine steps, so an
        idle engine (nothing unfinished) is reported as idle rather than as its last step."""
        if self._llm.output_processor.get_num_unfinished_requests() == 0:
            return (0, 0)
        with self._load_lock:
            return self._load

    def _record_load(self, running: int, waiting: int) -> None:
        with self._load_lock:
            self._load = (running, waiting)

    # -- requests ----------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def render_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(ids["input_ids"])

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    async def generate(
        self, prompt_token_ids: list[int], params: GenerationParams, request_id: str
    ) -> AsyncIterator[list[OutputDelta]]:
        """Yield the deltas of each engine step until every choice has finished. Closing the
        iterator early (client gone) aborts the request inside vLLM."""
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        sampling = self._sampling_params(params)
        stream = self._llm.generate(
            TokensPrompt(prompt_token_ids=prompt_token_ids), sampling, request_id
        )
        try:
            async for output in stream:
                yield [self._delta(o, params.logprobs) for o in output.outputs]
        except VllmEngineDeadError as exc:
            raise EngineDeadError(str(exc) or "the engine died") from exc
        finally:
            await stream.aclose()

    def check_params(self, params: GenerationParams) -> None:
        """Raise InvalidParamsError for settings vLLM refuses (say n > 1 with greedy
        sampling) before the request is admitted, so the client gets a 400, not a 500."""
        self._sampling_params(params)

    def _sampling_params(self, params: GenerationParams) -> Any:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        try:
            return self._build_sampling_params(params, SamplingParams, RequestOutputKind)
        except (ValueError, VLLMClientError) as exc:
            raise InvalidParamsError(str(exc)) from exc

    @staticmethod
    def _build_sampling_params(params: GenerationParams, sampling: Any, kind: Any) -> Any:
        return sampling(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            stop=list(params.stop) or None,
            seed=params.seed,
            logprobs=params.logprobs,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            ignore_eos=params.ignore_eos,
            output_kind=kind.DELTA,
        )

    @staticmethod
    def _delta(output: Any, want_logprobs: int | None) -> OutputDelta:
        logprobs: list[TokenLogprob] | None = None
        if want_logprobs is not None and output.logprobs is not None:
            logprobs = []
            for token_id, alternatives in zip(output.token_ids, output.logprobs, strict=False):
                chosen = alternatives[token_id]
                ranked = sorted(
                    (lp for tid, lp in alternatives.items() if lp.rank is not None),
                    key=lambda lp: lp.rank,
                )[:want_logprobs]
                logprobs.append(
                    TokenLogprob(
                        token=chosen.decoded_token or "",
                        logprob=max(float(chosen.logprob), -9999.0),
                        top=[
                            (lp.decoded_token or "", max(float(lp.logprob), -9999.0))
                            for lp in ranked
                        ],
                    )
                )
        return OutputDelta(
            index=output.index,
            text=output.text,
            token_ids=list(output.token_ids),
            logprobs=logprobs,
            finish_reason=output.finish_reason,
        )

    async def check_health(self) -> None:
        await self._llm.check_health()

    def shutdown(self) -> None:
        self._llm.shutdown()


class _LoadLogger:
    """A vLLM stat logger that keeps only what /metrics needs: running and waiting counts."""

    def __init__(self, holder: list[Engine]) -> None:
        self._holder = holder

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None and self._holder:
            self._holder[0]._record_load(
                int(scheduler_stats.num_running_reqs),
                int(scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs),
            )

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass
