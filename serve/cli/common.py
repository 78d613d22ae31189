"""What the commands share: logging, settings from flags, the engine's flags."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from serve.settings import Settings


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def settings_from_args(args: argparse.Namespace, fields: Sequence[str]) -> Settings:
    """The settings, with the flags given overriding the environment; flags left out leave
    the environment's (or the default) value."""
    given = {f: getattr(args, f) for f in fields if getattr(args, f, None) not in (None, [])}
    return Settings(**given)


def add_bigbench_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bigbench",
        "--bigbench-sdist",
        dest="bigbench",
        type=Path,
        metavar="PATH",
        help="BIG-bench to read: bigbench-1.0.0.tar.gz or a checkout of the BIG-bench "
        "repository (env CROSSTASK_BIGBENCH; default: the sdist cached in the home "
        "folder, downloaded the first time where an index still serves it).",
    )


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--adapters",
        type=Path,
        help="Adapter library folder: PEFT LoRA folders (with crosstask_adapter.json to be "
        "routed); runtime loads are confined below it (default: the library shipped with "
        "crosstask, routing/library).",
    )
    p.add_argument(
        "--no-adapters",
        dest="adapters_enabled",
        action="store_const",
        const=False,
        help="Serve the base model alone: LoRA off in the engine (env "
        "CROSSTASK_ADAPTERS_ENABLED=false).",
    )
    p.add_argument(
        "--no-fusion",
        dest="fusion_enabled",
        action="store_const",
        const=False,
        help="Leave crosstask's logit-fusion processor and scheduler out of the engine; "
        "routing.mode 'fuse' is then refused (env CROSSTASK_FUSION_ENABLED=false).",
    )
    p.add_argument(
        "--model",
        type=Path,
        help="A Hugging Face-format model folder to serve instead of the embedded "
        "SmolLM2-135M-Instruct (converted once into CROSSTASK_HOME).",
    )
    p.add_argument(
        "--served-model-name",
        dest="served_model_name",
        help="The name requests use in `model` (default: smollm2-135m-instruct for the "
        "embedded model, else the folder name).",
    )
    p.add_argument(
        "--store",
        type=Path,
        help="Demonstration store folder (default: CROSSTASK_HOME/store if built).",
    )
    p.add_argument(
        "--embedder",
        type=Path,
        help="sentence-transformers folder (default: embedded all-MiniLM-L6-v2).",
    )
    p.add_argument(
        "--default-k",
        dest="default_k",
        type=int,
        help="Demonstrations per request when a request does not say (default 6, measured "
        "best of 2 to 8 on the dev tasks).",
    )
    p.add_argument(
        "--demo-scope",
        dest="demo_scope",
        choices=["task", "input"],
        help="What demonstrations are chosen by when a request does not say: its task "
        "definition (default: shared and prefix-cached across the task's requests) or its "
        "definition and input.",
    )
    p.add_argument(
        "--demo-min-score",
        dest="demo_min_score",
        type=float,
        help="The gate for requests that send neither k nor min_score: demonstrations "
        "scoring below it stay out (default chosen by cross-validation, docs/retrieval.md).",
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
        "--max-num-batched-tokens",
        dest="max_num_batched_tokens",
        type=int,
        help="Most tokens the engine schedules in one step (default: vLLM's).",
    )
    p.add_argument(
        "--enforce-eager",
        dest="enforce_eager",
        action="store_const",
        const=True,
        help="Skip compilation: starts faster, decodes slower.",
    )
    p.add_argument("--log-level", dest="log_level", choices=["debug", "info", "warning", "error"])


ENGINE_FIELDS = [
    "model",
    "adapters",
    "adapters_enabled",
    "fusion_enabled",
    "served_model_name",
    "store",
    "embedder",
    "default_k",
    "demo_scope",
    "demo_min_score",
    "home",
    "max_model_len",
    "kv_cache_gb",
    "max_num_seqs",
    "max_num_batched_tokens",
    "enforce_eager",
    "log_level",
]
# `crosstask batch` always reads the store read-only and never reloads it.
SERVE_FIELDS = [
    *ENGINE_FIELDS,
    "store_readonly",
    "store_publish_snapshots",
    "store_reload_seconds",
]
