"""The embedder's ONNX Runtime backend, without optimum: export once, cache, run.

sentence-transformers' own ONNX backend needs `optimum[onnxruntime]`, which pulls
transformers below the version vLLM pins, so the project exports the model itself:

1. `torch.onnx.export` (the TorchScript exporter: the dynamo one needs onnxscript, which
   the project does not otherwise need) of the transformer plus the sentence-transformers
   pooling and normalization, with eager attention, whose graph onnxruntime's BERT
   optimizer recognizes and fuses (SDPA's graph it does not);
2. onnxruntime's transformer optimizer (fused attention, skip-layer-norm, bias-GELU);
3. optionally dynamic int8 quantization of the weights (`quantize="int8"`);
4. validation against sentence-transformers on torch in float32: the export is used only
   if every probe text's cosine clears the mode's floor.

The result lives in `<cache_root>/<model name>-<content hash>-v<format>-<quantize>/`
(`model.onnx`, the fast tokenizer's `tokenizer.json`, `export.json` with the identity and
the validation figures), written beside the target and renamed into place, so a crash
never leaves a half export that a later run would trust. Running it needs only
onnxruntime, tokenizers and numpy: no torch import, which alone takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.durable import fsync_dir

# Bump when the export recipe changes: it is part of the cache key, so old exports are
# simply not found again (never half-trusted).
EXPORT_FORMAT = 1
QUANTIZE_MODES = ("none", "int8")
OPSET = 17
# Padded tokens per inference call: see OnnxRunner.encode.
DEFAULT_BATCH_TOKENS = 512
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
INFO_FILE = "export.json"
# An export is used only if every probe's cosine with sentence-transformers (torch,
# float32) is at least this: a little under what each measured (docs/retrieval.md, "The
# embedder"). float32 ONNX is the same arithmetic, reordered; int8 weights (per channel)
# move vectors a little, so their bar is lower.
MIN_PROBE_COSINE = {"none": 0.9999, "int8": 0.97}
# Files that define what the model computes: their contents key the cache.
_IDENTITY_FILES = (
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "model.safetensors",
    "pytorch_model.bin",
)
# By class name: sentence-transformers 6 moved them (sentence_transformers.models.Pooling
# is now sentence_transformers.sentence_transformer.modules.pooling.Pooling).
_SUPPORTED_MODULES = {"Transformer", "Pooling", "Normalize"}
# Texts of many shapes, one past the 256-token window, for the export's validation.
PROBE_TEXTS = (
    "How many legs does a spider have?",
    "Translate 'good morning' into French.",
    "Q: What is 17 plus 25?\nA:",
    "Sort these words alphabetically: pear apple fig banana cherry",
    "Definition: In this task, you are given a question and an answer. Generate the type "
    "of the given question-answer pair.\nQuestion: When was the bridge built? (Answer: 1922).",
    "Determine whether the following statement is true or false: the moon is made of cheese.",
    "x",
    "   leading and trailing spaces   ",
    "Ünïcödé, emoji 🙂 and CJK 漢字 in one line.",
    " ".join(
        f"Sentence {i}: the quick brown fox jumps over the lazy dog near river {i}."
        for i in range(40)
    ),
)


class OnnxExportError(RuntimeError):
    """The model cannot be exported, or its export does not match sentence-transformers."""


@dataclass(frozen=True, slots=True)
class OnnxExport:
    folder: Path
    info: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.folder / MODEL_FILE

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / TOKENIZER_FILE


def default_cache_root() -> Path:
    """`$CROSSTASK_HOME/embedders`, as serve.settings resolves the home folder."""
    home = os.environ.get("CROSSTASK_HOME") or "~/.cache/crosstask"
    return Path(home).expanduser() / "embedders"


def model_fingerprint(model_dir: Path) -> str:
    """SHA-256 over the files that define the model's output (cheap for MiniLM:
    docs/retrieval.md, "The embedder")."""
    digest = hashlib.sha256()
    for name in _IDENTITY_FILES:
        path = model_dir / name
        if not path.is_file():
            continue
        digest.update(name.encode() + b"\0")
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def export_folder(model_dir: Path, cache_root: Path, quantize: str) -> Path:
    """Where the export of `model_dir` with `quantize` lives (it may not exist yet)."""
    _check_quantize(quantize)
    key = model_fingerprint(model_dir)[:16]
    return cache_root / f"{model_dir.name}-{key}-v{EXPORT_FORMAT}-{quantize}"


def load_export(model_dir: Path, cache_root: Path, quantize: str) -> OnnxExport | None:
    """The cached, validated export of `model_dir`, or None if there is none."""
    folder = export_folder(model_dir, cache_root, quantize)
    try:
        info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (folder / MODEL_FILE).is_file() or not (folder / TOKENIZER_FILE).is_file():
        return None
    if info.get("format") != EXPORT_FORMAT or not info.get("validation", {}).get("passed"):
        return None
    return OnnxExport(folder, info)


def ensure_export(
    model_dir: Path, cache_root: Path | None = None, quantize: str = "none"
) -> OnnxExport:
    """The cached export of `model_dir`, exporting and validating it first if needed."""
    root = cache_root if cache_root is not None else default_cache_root()
    found = load_export(model_dir, root, quantize)
    if found is not None:
        return found
    target = export_folder(model_dir, root, quantize)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.exporting-", dir=root))
    os.chmod(work, 0o755)  # mkdtemp makes it private; the cache is shared like its parent.
    try:
        try:
            export_model(model_dir, work, quantize)
        except OnnxExportError:
            raise
        except Exception as exc:  # torch's exporter and onnxruntime's tools raise anything.
            raise OnnxExportError(f"exporting {model_dir} failed: {exc}") from exc
        try:
            os.rename(work, target)
        except OSError:
            # Another process finished the same export first: use theirs.
            if load_export(model_dir, root, quantize) is None:
                raise
        fsync_dir(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    found = load_export(model_dir, root, quantize)
    if found is None:  # pragma: no cover - export_model raises before this can happen
        raise OnnxExportError(f"the export of {model_dir} did not validate")
    return found


def export_model(model_dir: Path, out: Path, quantize: str) -> dict[str, Any]:
    """Export, optimize, quantize and validate `model_dir` into the folder `out`."""
    _check_quantize(quantize)
    pooling = _pooling_mode(model_dir)
    import onnx
    import onnxruntime
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise OnnxExportError(f"{model_dir} has no fast tokenizer (tokenizer.json)")
    # The backend tokenizer carries the normalizer and the [CLS]/[SEP] post-processor;
    # padding and truncation are set by the runner.
    tokenizer.backend_tokenizer.save(str(out / TOKENIZER_FILE))
    model = AutoModel.from_pretrained(
        str(model_dir),
        local_files_only=True,
        attn_implementation="eager",
        dtype=torch.float32,
    ).eval()
    wrapper = _pooled_module(model, pooling)
    sample = tokenizer(
        ["a short text", "a somewhat longer text to pad against"], padding=True, return_tensors="pt"
    )
    raw = out / "raw.onnx"
    with warnings.catch_warnings(), torch.inference_mode():
        # The tracer warns about Python booleans in transformers' mask code: they hold for
        # every encoder input (mask as long as the sequence), and validation checks it.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (sample["input_ids"], sample["attention_mask"]),
            str(raw),
            input_names=["input_ids", "attention_mask"],
            output_names=["sentence_embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "sentence_embedding": {0: "batch"},
            },
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    fused: dict[str, int] = {}
    optimized = out / "optimized.onnx"
    if config.model_type == "bert":
        from onnxruntime.transformers.optimizer import optimize_model

        opt = optimize_model(
            str(raw),
            model_type="bert",
            num_heads=int(config.num_attention_heads),
            hidden_size=int(config.hidden_size),
            opt_level=0,
        )
        fused = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
        opt.save_model_to_file(str(optimized))
        raw.unlink()
    else:  # Other architectures run unfused; onnxruntime still optimizes at load.
        raw.rename(optimized)
    final = out / MODEL_FILE
    if quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            str(optimized),
            str(final),
            weight_type=QuantType.QInt8,
            # One scale per output channel: per-tensor scales moved vectors far further
            # from float32's (docs/retrieval.md, "The embedder").
            per_channel=True,
            # The fused contrib ops defeat shape inference; their outputs are float.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        optimized.unlink()
    else:
        optimized.rename(final)

    validation = _validate(model_dir, out, quantize)
    info: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "model": model_dir.name,
        "fingerprint": model_fingerprint(model_dir),
        "quantize": quantize,
        "pooling": pooling,
        "opset": OPSET,
        "fused_operators": fused,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "validation": validation,
    }
    if not validation["passed"]:
        raise OnnxExportError(
            f"the {quantize} ONNX export of {model_dir} differs from sentence-transformers: "
            f"minimum cosine {validation['min_cosine']:.5f} < {validation['floor']}"
        )
    with open(out / INFO_FILE, "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    return info


class OnnxRunner:
    """Runs an export: tokenize, bucket by length, infer, in the order given.

    Threads are data-parallel: each batch runs on one thread (a session whose
    intra-op pool is one thread), and `num_threads` batches run at once. On 2 cores that
    beat one batch split across both threads, whose small matrices spend much of their
    time waiting for each other. onnxruntime's `run` is thread-safe and releases the GIL.
    """

    def __init__(
        self,
        export: OnnxExport,
        max_seq_length: int,
        num_threads: int,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        max_batch: int = 128,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.export = export
        self.max_seq_length = max_seq_length
        self.num_threads = max(1, num_threads)
        self.batch_tokens = batch_tokens
        self.max_batch = max_batch
        tokenizer = Tokenizer.from_file(str(export.tokenizer_path))
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=max_seq_length)
        self._tokenizer = tokenizer
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(
            str(export.model_path), options, providers=["CPUExecutionProvider"]
        )
        out = self._session.get_outputs()[0]
        self.dim = int(out.shape[-1]) if isinstance(out.shape[-1], int) else 0

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        # sentence-transformers strips every text before tokenizing; so must we.
        return [e.ids for e in self._tokenizer.encode_batch([t.strip() for t in texts])]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length float32 rows in the order of `texts`.

        Length bucketing: texts are sorted by token count and cut into batches of at most
        `batch_tokens` padded tokens (and `max_batch` texts), so each batch pads only to
        its own longest text, and a batch's activations stay in cache: on the seen tasks'
        texts, small batches ran more texts per CPU-second than large ones
        (docs/retrieval.md, "The embedder").
        """
        ids = self.token_ids(texts)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        batches = length_buckets([len(x) for x in ids], self.batch_tokens, self.max_batch)

        def run(batch: list[int]) -> None:
            width = len(ids[batch[-1]])
            input_ids = np.zeros((len(batch), width), dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = ids[i]
                mask[row, : len(ids[i])] = 1
            (vectors,) = self._session.run(
                ["sentence_embedding"], {"input_ids": input_ids, "attention_mask": mask}
            )
            out[batch] = vectors  # Disjoint rows per batch: no lock needed.

        if self.num_threads == 1 or len(batches) == 1:
            for batch in batches:
                run(batch)
        else:
            with ThreadPoolExecutor(self.num_threads, thread_name_prefix="onnx-embed") as pool:
                # list(): re-raise the first error from any batch.
                list(pool.map(run, batches))
        return out


def length_buckets(lengths: Sequence[int], batch_tokens: int, max_batch: int) -> list[list[int]]:
    """Indices into `lengths`, shortest first, cut into batches whose padded size
    (count x longest) stays within `batch_tokens` and whose count within `max_batch`.
    Every index appears exactly once; a batch lists its longest text last."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted ascending, so this text is the longest of the batch it would join.
        if current and (
            len(current) >= max_batch or (len(current) + 1) * lengths[i] > batch_tokens
        ):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _check_quantize(quantize: str) -> None:
    if quantize not in QUANTIZE_MODES:
        raise OnnxExportError(f"quantize must be one of {QUANTIZE_MODES}, not {quantize!r}")


def _pooling_mode(model_dir: Path) -> str:
    """'mean' or 'cls', from the sentence-transformers folder; anything else is refused
    (a Dense layer, max pooling, ... would need their own export)."""
    try:
        modules = json.loads((model_dir / "modules.json").read_text(encoding="utf-8"))
        kinds = {str(m["type"]).rsplit(".", 1)[-1]: str(m["path"]) for m in modules}
        pooling = json.loads((model_dir / kinds["Pooling"] / "config.json").read_text("utf-8"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OnnxExportError(f"{model_dir} is not a sentence-transformers folder: {exc}") from exc
    # The export always normalizes, Normalize module or not: the store compares by cosine.
    unsupported = set(kinds) - _SUPPORTED_MODULES
    if unsupported:
        raise OnnxExportError(f"the ONNX export does not support {sorted(unsupported)}")
    # sentence-transformers 6 writes "pooling_mode": "mean"; earlier versions one boolean
    # per mode ("pooling_mode_mean_tokens": true, ...).
    modes = [str(pooling["pooling_mode"])] if "pooling_mode" in pooling else []
    modes += [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v is True]
    if modes in (["mean"], ["pooling_mode_mean_tokens"]):
        return "mean"
    if modes in (["cls"], ["pooling_mode_cls_token"]):
        return "cls"
    raise OnnxExportError(f"the ONNX export supports mean or CLS pooling, not {modes}")


def _pooled_module(model: Any, pooling: str) -> Any:
    import torch

    class Pooled(torch.nn.Module):
        """The transformer, then sentence-transformers' pooling and normalization."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask)[0]
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return Pooled()


def _validate(model_dir: Path, folder: Path, quantize: str) -> dict[str, Any]:
    """Cosine of the export's embeddings with sentence-transformers' (torch, float32) on
    PROBE_TEXTS, encoded together (padded batches) and one by one."""
    import torch
    from sentence_transformers import SentenceTransformer

    reference_model = SentenceTransformer(
        str(model_dir),
        device="cpu",
        local_files_only=True,
        model_kwargs={"dtype": torch.float32},
    )
    max_len = int(reference_model.max_seq_length or 256)
    reference = reference_model.encode(
        list(PROBE_TEXTS), convert_to_numpy=True, normalize_embeddings=True, batch_size=4
    )
    runner = OnnxRunner(
        OnnxExport(folder, {}), max_seq_length=max_len, num_threads=torch.get_num_threads()
    )
    together = runner.encode(PROBE_TEXTS)
    alone = np.concatenate([runner.encode([t]) for t in PROBE_TEXTS])
    cosines = np.concatenate(
        [np.sum(together * reference, axis=1), np.sum(alone * reference, axis=1)]
    )
    floor = MIN_PROBE_COSINE[quantize]
    return {
        "probes": len(PROBE_TEXTS),
        "max_seq_length": max_len,
        "min_cosine": round(float(cosines.min()), 6),
        "mean_cosine": round(float(cosines.mean()), 6),
        "floor": floor,
        "passed": bool(cosines.min() >= floor),
    }
