"""The one settings object: built once at start-up (env `CROSSTASK_*`, then CLI flags) and
passed to whatever needs it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything configurable about a crosstask process.

    Every field reads `CROSSTASK_<FIELD>` from the environment; CLI flags override it.
    """

    model_config = SettingsConfigDict(env_prefix="CROSSTASK_", extra="ignore")

    home: Path = Field(
        default=Path("~/.cache/crosstask"),
        description="Cache folder for the embedded defaults (model, embedder, store, adapters).",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    # What is served.
    model: Path | None = Field(
        default=None,
        description="A Hugging Face-format model folder; None serves the embedded default.",
    )
    served_model_name: str | None = Field(
        default=None, description="Name under which the model is served; default from the folder."
    )
    store: Path | None = Field(
        default=None,
        description="Demonstration store folder; None uses CROSSTASK_HOME/store if built.",
    )
    adapters: Path | None = Field(
        default=None,
        description="Adapter library folder (runtime loads are confined below it); None "
        "serves the default library shipped with crosstask (routing/library).",
    )
    adapters_enabled: bool = Field(
        default=True,
        description="False serves the base model alone: LoRA off in the engine, no "
        "adapters, every routing mode but `off` refused.",
    )
    fusion_enabled: bool = Field(
        default=True,
        description="Install the logit-fusion logits processor and group scheduler in the "
        "engine (routing.mode `fuse`); false runs vLLM's own, and `fuse` is refused.",
    )
    embedder: Path | None = Field(
        default=None,
        description="A sentence-transformers folder; None is the embedded all-MiniLM-L6-v2.",
    )
    bigbench: Path | None = Field(
        default=None,
        description="BIG-bench to read tasks from: the bigbench-1.0.0 sdist or a checkout of "
        "the BIG-bench repository; None is the sdist cached under CROSSTASK_HOME, "
        "downloaded with pip the first time where an index still serves it.",
    )

    # The demonstration store with several replicas (deploy/README.md): one read-write
    # server publishes snapshots of the store; read-only ones serve the newest snapshot.
    store_readonly: bool = Field(
        default=False,
        description="Serve the store read-only (a replica): open the snapshot CURRENT "
        "names (or a flat store as it is) and answer writes 403 `store_read_only`.",
    )
    store_publish_snapshots: bool = Field(
        default=False,
        description="A read-write server (the store's one writer) publishes a snapshot of "
        "the store after writes, for read-only replicas. Off for a lone server: each "
        "snapshot is a full copy of the store.",
    )
    store_reload_seconds: float = Field(
        default=30.0,
        ge=0,
        allow_inf_nan=False,
        description="A read-only server checks the store's CURRENT this often and swaps "
        "in a newer snapshot (0: never).",
    )
    store_snapshot_grace_seconds: float = Field(
        default=120.0,
        ge=0,
        allow_inf_nan=False,
        description="The writer deletes a replaced snapshot this long after it stopped "
        "being current or previous; must exceed the readers' reload period plus the time "
        "they take to open a snapshot.",
    )

    # Retrieval.
    default_k: int = Field(
        default=6,
        ge=0,
        le=32,
        description="Demonstrations per request when the request does not say (with a store).",
    )
    demo_scope: Literal["task", "input"] = Field(
        default="task",
        description="What a request's demonstrations are chosen by when it does not say: its "
        "task definition (shared, and prefix-cached, by every request of the task; the input "
        "when there is no definition) or its definition and input (docs/retrieval.md).",
    )
    # The one gate, in every mode, for requests that send neither `k` nor `min_score`:
    # demonstrations scoring below it stay out. Chosen by cross-validation over groups of
    # seen tasks (bench/calibrate_demo_gate.py, bench/calibration/demo_gate_seen_cv.json):
    # there, a task's demonstrations helped at every nearest score seen, so the gate only
    # keeps out what is farther than any seen task's (docs/retrieval.md, "The gate").
    demo_min_score: float = Field(default=0.275, ge=0, le=1, allow_inf_nan=False)
    embedding_cache_size: int = Field(
        default=4096,
        ge=0,
        description="Query embeddings kept by text (0: none); a few KiB each.",
    )
    prompt_format: Literal["plain", "chat"] = Field(
        default="chat",
        description="How chat requests with demonstrations are laid out (docs/retrieval.md).",
    )

    # Adapters and routing (see routing/router.py; thresholds calibrated on the dev tasks).
    max_loras: int = Field(default=8, ge=1, description="Distinct LoRAs in one engine batch.")
    max_cpu_loras: int = Field(default=32, ge=1, description="LoRAs kept loaded in memory.")
    max_lora_rank: int = Field(default=32, ge=1, le=512)
    # Calibrated on the dev tasks (bench/calibrate_router.py, recorded in
    # bench/calibration/router_dev_tasks.json): the nearest specialist when its similarity
    # is >= 0.6, else the generalist. Merging the two nearest never beat the nearest alone
    # there (docs/routing.md, "The router"), so auto does not merge unless merge_min is
    # lowered.
    router_single_min: float = Field(default=0.6, ge=-1, le=1, allow_inf_nan=False)
    router_single_margin: float = Field(default=0.05, ge=0, le=2, allow_inf_nan=False)
    router_merge_min: float = Field(default=1.0, ge=-1, le=1, allow_inf_nan=False)
    router_top_k: int = Field(default=2, ge=1, le=8)
    router_temperature: float = Field(default=0.05, gt=0, le=10, allow_inf_nan=False)
    router_fallback: Literal["generalist", "off"] = "generalist"
    # How `auto` combines several close specialists: one merged LoRA, or logit fusion (each
    # specialist and the base decode in lockstep). Only reached when merge_min lets `auto`
    # combine at all; docs/fusion.md gives the dev-task figures behind the default.
    router_combine: Literal["merge", "fuse"] = "merge"
    merge_cache_size: int = Field(default=16, ge=1, description="Merged adapters kept on disk.")

    # Access.
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    admin_key: SecretStr | None = None
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Engine.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto: float32 on CPU, the model's own dtype on GPU."
    )
    max_model_len: int | None = Field(default=None, ge=16)
    kv_cache_gb: float = Field(default=4.0, gt=0)
    enforce_eager: bool = False
    max_num_seqs: int | None = Field(default=None, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=16)
    enable_prefix_caching: bool = True

    # Request limits: each one, when exceeded, is a 400 rather than work the server
    # cannot do well.
    max_n: int = Field(default=16, ge=1)
    max_stop: int = Field(default=16, ge=1)
    max_top_logprobs: int = Field(default=20, ge=0)
    max_prompts_per_request: int = Field(default=64, ge=1)
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024,
        description="Largest request body accepted (413 beyond), checked while it arrives.",
    )

    # Admission: beyond this many generation requests waiting (in flight beyond what the
    # engine runs at once, max_num_seqs), new ones get a quick 429 with Retry-After rather
    # than a queue whose latency grows without end. See serve/api/admission.py. The wait is
    # bounded by max_waiting / throughput: with a long queue on a small CPU that was
    # minutes, past any client timeout, so the default keeps the queue short
    # (docs/memory.md, "Other findings").
    max_waiting: int = Field(default=32, ge=0)
    retry_after_seconds: int = Field(
        default=1, ge=1, description="Retry-After of 429 (overloaded) and 503 answers."
    )

    # Lifecycle: on SIGTERM, /health and new requests answer 503 while the requests in
    # flight get up to this long to finish; then the process exits 0.
    drain_seconds: float = Field(default=30.0, ge=0)
    # How long an idle keep-alive connection stays open. It must outlast the clients' own
    # pool expiry (httpx, so the openai client: 5 s; load balancers: typically 60 s):
    # at uvicorn's 5 s both ends close at once, and a request sent on a connection the
    # server is just closing fails with a connection error, never reaching the server (seen
    # under bench/load.py: docs/memory.md, "Other findings").
    keep_alive_seconds: int = Field(default=75, ge=1)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("admin_key", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser()

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys) or self.admin_key is not None
