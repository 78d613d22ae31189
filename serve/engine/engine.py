"""The engine: vLLM's V1 async engine (continuous batching, prefix caching, streaming)
behind plain dataclasses (serve/engine/types.py) for the rest of crosstask."""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
import threading
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from serve.engine.lora_slots import LoraSlots
from serve.engine.types import (
    EngineConfig,
    EngineDeadError,
    FusionError,
    FusionTarget,
    GenerationParams,
    InvalidParamsError,
    LoraLoadError,
    LoraTarget,
    OutputDelta,
    TokenLogprob,
)

log = logging.getLogger(__name__)

_GIB = 1 << 30


def import_engine_libraries() -> None:
    """Import vLLM and the transformers modules it and the embedder share, in the calling
    thread. The server then loads the engine and the embedder in two threads at once; two
    threads importing transformers' lazy modules together can deadlock in the import
    system, which then hands one of them a half-built module (start-up failed once with
    "cannot import name 'PreTrainedConfig' from 'transformers'")."""
    import transformers
    from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: F401
    from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401

    for name in ("AutoConfig", "AutoModel", "AutoTokenizer", "PreTrainedConfig"):
        getattr(transformers, name)


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
        self._preemptions = 0
        self._prefix_cache = (0, 0)
        self._slots = LoraSlots()

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
            **_lora_args(config),
            **_fusion_args(config),
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

    def queue_lengths(self) -> tuple[int, int]:
        """(running, waiting) requests. Scheduler stats arrive only with engine steps, so an
        idle engine (nothing unfinished) is reported as idle rather than as its last step."""
        if self._llm.output_processor.get_num_unfinished_requests() == 0:
            return (0, 0)
        with self._load_lock:
            return self._load

    @property
    def preemptions(self) -> int:
        """Requests the scheduler has preempted (KV cache full) since the engine started, as
        vLLM reports them: with the request's next output once it is recomputed, so one
        aborted while preempted is not counted."""
        with self._load_lock:
            return self._preemptions

    def _record_load(self, running: int, waiting: int) -> None:
        with self._load_lock:
            self._load = (running, waiting)

    def _record_preemptions(self, count: int) -> None:
        with self._load_lock:
            self._preemptions += count

    @property
    def prefix_cache(self) -> tuple[int, int]:
        """(queries, hits) of the prefix cache since the engine started, in prompt tokens,
        as vLLM counts them for its prefix_cache_queries and prefix_cache_hits."""
        with self._load_lock:
            return self._prefix_cache

    def _record_prefix_cache(self, queries: int, hits: int) -> None:
        with self._load_lock:
            old_queries, old_hits = self._prefix_cache
            self._prefix_cache = (old_queries + queries, old_hits + hits)

    # -- requests ----------------------------------------------------------------------

    def fusion_prompt_limit(self, members: int) -> int:
        """The longest prompt a fusion group of `members` can have: every member prefills
        it in one step (serve/engine/fusion_scheduler.py), beside one token per running request."""
        scheduler = self._llm.vllm_config.scheduler_config
        room = int(scheduler.max_num_batched_tokens) - int(scheduler.max_num_seqs)
        return max(0, room // members)

    def render_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(ids["input_ids"])

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: GenerationParams,
        request_id: str,
        lora: LoraTarget | None = None,
        extra_args: dict[str, Any] | None = None,
    ) -> AsyncGenerator[list[OutputDelta], None]:
        """Yield the deltas of each engine step until every choice has finished. Closing the
        iterator early (client gone) aborts the request inside vLLM. With `lora`, generate
        with that adapter (loaded first if need be; LoraLoadError if vLLM refuses it)."""
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        sampling = self._sampling_params(params)
        if extra_args:
            sampling.extra_args = extra_args
        lora_request = await self._acquire_lora(lora) if lora is not None else None
        try:
            stream = self._llm.generate(
                TokensPrompt(prompt_token_ids=prompt_token_ids),
                sampling,
                request_id,
                lora_request=lora_request,
            )
            try:
                async for output in stream:
                    yield [self._delta(o, params.logprobs) for o in output.outputs]
            except VllmEngineDeadError as exc:
                raise EngineDeadError(str(exc) or "the engine died") from exc
            finally:
                await stream.aclose()
        finally:
            if lora_request is not None:
                await self._release_lora(lora_request.lora_int_id)

    async def generate_fused(
        self,
        prompt_token_ids: list[int],
        params: GenerationParams,
        request_id: str,
        fusion: FusionTarget,
        retries: int = 1,
    ) -> AsyncGenerator[list[OutputDelta], None]:
        """Like `generate`, for a fusion group: the base and each adapter decode the prompt
        as member requests whose logits the engine fuses at every step (routing/fusion);
        the base only when its coefficient is not 0 (spec.needs_base).
        Yields the group's deltas once every member has produced the same tokens. A group
        that lost lockstep before yielding anything is rerun (`retries` times; the same
        seed, so the same text); after that, or once text has gone out, FusionError."""
        from routing.fusion.group import FusionLockstepError, lockstep
        from routing.fusion.spec import FusionSpec, needs_base

        if not self.config.fusion_on:
            raise FusionError("logit fusion is not enabled on this engine")
        if params.n != 1:
            raise FusionError("fusion generates one choice per request (n = 1)")
        if params.seed is None and params.temperature > 0:
            # Every member draws its token with its own generator: one seed for the group
            # makes them draw the same one (and a rerun give the same text).
            params = dataclasses.replace(params, seed=secrets.randbits(31))
        with_base = needs_base(fusion.alphas)
        members: list[LoraTarget | None] = (
            [None, *fusion.adapters] if with_base else list(fusion.adapters)
        )
        for attempt in range(retries + 1):
            group = f"{request_id}~{attempt}"
            streams = [
                self.generate(
                    prompt_token_ids,
                    params,
                    f"{group}~m{i}",
                    lora=lora,
                    extra_args=FusionSpec(
                        group=group,
                        member=i,
                        size=len(members),
                        alphas=None if fusion.alphas is None else tuple(fusion.alphas),
                        prior=tuple(fusion.prior),
                        base=with_base,
                    ).to_extra_args(),
                )
                for i, lora in enumerate(members)
            ]
            # Load every adapter first: a member that fails to start after others were
            # sent would leave them held back in the scheduler until aborted.
            for lora in fusion.adapters:
                await self._ensure_lora(lora)
            yielded = False
            merged = lockstep(streams)
            try:
                async for delta in merged:
                    yielded = True
                    yield [delta]
                return
            except FusionLockstepError as exc:
                if yielded or attempt == retries:
                    raise FusionError(
                        f"the fusion group lost lockstep inside the engine ({exc}); "
                        "retrying the request may succeed"
                    ) from exc
                log.warning("fusion group %s lost lockstep (%s); rerunning it", group, exc)
            finally:
                await merged.aclose()

    # -- LoRA ---------------------------------------------------------------------------

    async def add_lora(self, target: LoraTarget) -> None:
        """Load an adapter into vLLM now (its files read and checked in the worker), so a
        broken one is refused here, as LoraLoadError, rather than at its first request."""
        await self._ensure_lora(target)

    async def remove_lora(self, name: str) -> bool:
        """Forget the adapter `name` and drop it from vLLM's caches (at once, or when its
        running requests end). False when no adapter of that name was in use. To serve new
        files under the same name and folder, remove it first: the next request loads anew."""
        known, lora_id = self._slots.remove(name)
        if lora_id is not None and not self.errored:  # a dead engine holds nothing to drop
            await self._llm.remove_lora(lora_id)
        return known

    def lora_names(self) -> list[str]:
        """The adapters this engine has been asked for and not told to remove."""
        return self._slots.names()

    async def _ensure_lora(self, target: LoraTarget) -> Any:
        from vllm.lora.request import LoRARequest

        if not self.config.enable_lora:
            raise LoraLoadError("LoRA adapters are not enabled on this engine")
        slot, replaced = self._slots.claim(target)
        loaded = slot.loaded
        if replaced is not None:
            await self._llm.remove_lora(replaced)
        # vLLM compares LoRARequests by name (its batches hold sets of them) and keys prefix
        # cache blocks by (name, path): the id in the name keeps a re-loaded adapter, or a
        # retired one still finishing its requests, from being mistaken for the other.
        request = LoRARequest(
            lora_name=f"{target.name}#{slot.lora_id}",
            lora_int_id=slot.lora_id,
            lora_path=str(slot.path),
        )
        if loaded:
            return request
        try:
            # Concurrent first requests may both get here; vLLM loads once, answers both.
            await self._llm.add_lora(request)
        except Exception as exc:
            self._slots.failed(target.name, slot)
            raise LoraLoadError(
                f"adapter {target.name!r} could not be loaded: {_worker_error(exc)}"
            ) from exc
        self._slots.loaded(slot)
        return request

    async def _acquire_lora(self, target: LoraTarget) -> Any:
        request = await self._ensure_lora(target)
        self._slots.acquire(target.name, request.lora_int_id)
        return request

    async def _release_lora(self, lora_id: int) -> None:
        if self._slots.release(lora_id) and not self.errored:
            await self._llm.remove_lora(lora_id)

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

    def shutdown(self) -> None:
        self._llm.shutdown()


def _worker_error(exc: BaseException) -> str:
    """The worker's own message out of vLLM's wrapping ("Call to add_lora method failed:
    Worker failed with error '...', please check the stack trace above ..."): the stack trace
    is in the server's log, not the client's."""
    text = str(exc)
    match = re.search(r"Worker failed with error '(.*)', please check", text, re.DOTALL)
    return match.group(1) if match else text


def _fusion_args(config: EngineConfig) -> dict[str, Any]:
    """The fusion logits processor and scheduler, when fusion is on."""
    if not config.fusion_on:
        return {}
    from serve.engine.fusion_processor import processor_args
    from serve.engine.fusion_scheduler import scheduler_args

    return {**processor_args(), **scheduler_args()}


def _lora_args(config: EngineConfig) -> dict[str, Any]:
    """vLLM's LoRA engine arguments; none when LoRA is off (vLLM's defaults then)."""
    if not config.enable_lora:
        return {}
    if config.max_cpu_loras < config.max_loras:
        raise ValueError(
            f"max_cpu_loras ({config.max_cpu_loras}) must be at least max_loras "
            f"({config.max_loras})"
        )
    from serve.engine.lora_cpu import ENV_SWITCH, fast_lora_enabled

    # The fast path itself is installed in vLLM's worker by the vllm.general_plugins entry
    # point (serve/engine/lora_cpu.py); this only says which one the worker will use.
    log.info(
        "LoRA on: max_loras %d, max_cpu_loras %d, max_lora_rank %d, fast CPU LoRA path %s",
        config.max_loras,
        config.max_cpu_loras,
        config.max_lora_rank,
        "on" if fast_lora_enabled() else f"off ({ENV_SWITCH}=0)",
    )
    return {
        "enable_lora": True,
        "max_loras": config.max_loras,
        "max_cpu_loras": config.max_cpu_loras,
        "max_lora_rank": config.max_lora_rank,
    }


class _LoadLogger:
    """A vLLM stat logger that keeps only what /metrics needs: running and waiting counts,
    preemptions and the prefix cache's counts."""

    def __init__(self, holder: list[Engine]) -> None:
        self._holder = holder

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if not self._holder:
            return
        if scheduler_stats is not None:
            self._holder[0]._record_load(
                int(scheduler_stats.num_running_reqs),
                int(scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs),
            )
            prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
            if prefix is not None and (prefix.queries or prefix.hits):
                self._holder[0]._record_prefix_cache(int(prefix.queries), int(prefix.hits))
        preempted = int(getattr(iteration_stats, "num_preempted_reqs", 0) or 0)
        if preempted:
            self._holder[0]._record_preemptions(preempted)

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass
