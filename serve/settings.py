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
    adapters: Path | None = None
    embedder: Path | None = Field(
        default=None,
        description="A sentence-transformers folder; None is the embedded all-MiniLM-L6-v2.",
    )

    # Retrieval.
    default_k: int = Field(
        default=4,
        ge=0,
        le=32,
        description="Demonstrations per request when the request does not say (with a store).",
    )
    prompt_format: Literal["plain", "chat"] = Field(
        default="chat",
        description="How chat requests with demonstrations are laid out (see README).",
    )

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

    # Lifecycle.
    drain_seconds: float = Field(default=30.0, ge=0)
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
