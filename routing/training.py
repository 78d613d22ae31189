"""LoRA adapter training with PEFT on the CPU, in the prompt format the server uses.

One recipe (routing/library/recipe.json for the default library) fixes everything:

1. Examples. For each task, a seeded permutation of its usable examples; the last
   `holdout_per_task` are held out (for evaluation), the first `per_task` that fit in
   `max_seq_len` tokens (prompt and answer) are trained on.
2. Prompts. A `demo_fraction` of the examples (chosen per example, seeded) get `k`
   cross-task demonstrations retrieved from the demonstration store for their own query,
   their own task excluded: exactly what the server retrieves for an unseen task. The
   prompt is laid out by `retrieval.prompt.request_prompt` and tokenized as the engine
   does (chat template with the generation prompt), so training sees the very prompts
   serving will send. Demonstrations beyond `demo_seq_len` tokens are dropped farthest
   first (`retrieval.prompt.fit`, as the server does against its context length).
   The loss covers the answer tokens and the end-of-turn token only.
3. Training. Batches of similar length (little padding) under a token budget; bf16
   autocast where the CPU has native bf16; logits are computed only where there is a
   label (the 49k-word head over every prompt token was a fifth of the work);
   checkpoints every `checkpoint_every_s` seconds and on interruption, so a killed run
   continues where it stopped and ends with the same weights.
4. Output. `<out>/<name>/` with PEFT's adapter_config.json, adapter_model.safetensors
   (float16) and crosstask_adapter.json (tasks, rank, base signature, routing prototype:
   centroids of the embedded training queries).

Every speed choice above was measured with bench/adapter_train.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import numpy as np

from retrieval.build import usable_examples
from retrieval.durable import replace_dir, write_atomic
from retrieval.prompt import Demonstration, Turn, fit, request_prompt
from retrieval.query import QUERY_TEXT_VERSION, query_text
from retrieval.sources import Example, Task
from routing.adapter_meta import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AdapterMeta,
    Kind,
    Prototype,
    base_signature,
    read_meta,
    write_meta,
)
from routing.grouping import Grouping, group_tasks, spherical_kmeans, task_means

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

RECIPE_FORMAT = 1
RECIPE_FILE = "recipe.json"
WORK_DIR = ".work"
CHECKPOINT_FILE = "checkpoint.pt"
GENERALIST = "generalist"
# The modules PEFT calls "all-linear" for Llama, spelled out so the adapter config names
# exactly what vLLM's LoRA support looks for.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE = -100


class TrainingError(RuntimeError):
    """The recipe cannot be trained as asked (bad settings, no usable examples, ...)."""


# --------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class DataConfig:
    """Which examples, and how their prompts are built."""

    seed: int = 0
    holdout_per_task: int = 20
    demo_fraction: float = 0.4
    k: int = 4
    # Longest example (prompt and answer) trained on; longer ones are passed over.
    max_seq_len: int = 1024
    # Demonstrations are dropped (farthest first) until the example fits this: prompts
    # with demonstrations are the long ones, and every token costs training time.
    demo_seq_len: int = 512
    max_target_tokens: int = 64
    prompt_format: Literal["chat", "plain"] = "chat"


@dataclass(frozen=True)
class TrainConfig:
    """How to optimize; the same for every adapter of a recipe."""

    seed: int = 0
    batch_tokens: int = 2048
    warmup_fraction: float = 0.06
    min_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # "auto": bfloat16 autocast where the CPU has native bf16 matmuls, else float32.
    autocast: Literal["auto", "bfloat16", "off"] = "auto"
    save_dtype: Literal["float16", "bfloat16", "float32"] = "float16"


@dataclass(frozen=True)
class AdapterSettings:
    """One kind of adapter's shape and schedule (the generalist's, the specialists')."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ALL_LINEAR
    per_task: int = 6
    epochs: float = 1.0
    learning_rate: float = 1e-3
    # Routing prototype: at most this many centroids of the training queries.
    centroids: int = 1


@dataclass(frozen=True)
class SpecialistSettings(AdapterSettings):
    # Small and briefly trained, so that 7-8 of them and the generalist stay within the
    # 30 MB the default library may weigh and its build within about 15 minutes.
    rank: int = 4
    alpha: float = 8.0
    per_task: int = 3
    groups: int = 8
    grouping_seed: int = 0
    # Start from the generalist (its update truncated to this rank by SVD) rather than
    # from zero: a specialist then only has to add what its group needs on top of what
    # every task taught, which a few steps on a few examples per task can do.
    init_from_generalist: bool = True


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter to train: resolved from a recipe."""

    name: str
    kind: Kind
    tasks: tuple[str, ...]
    settings: AdapterSettings
    init_from: str | None = None  # the adapter (of the same library) it starts from

    def fingerprint(self, recipe: Recipe) -> str:
        """What makes two trainings of this adapter the same (for resuming)."""
        spec = _plain(self)
        if self.init_from is None:
            del spec["init_from"]  # as before starting points existed: same adapters, same hash
        payload: dict[str, Any] = {
            "spec": spec,
            "data": _plain(recipe.data),
            "train": _plain(recipe.train),
        }
        if self.init_from is not None:
            # A different starting adapter is a different training.
            start = next(s for s in recipe.adapters() if s.name == self.init_from)
            payload["init"] = start.fingerprint(recipe)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Recipe:
    """Everything needed to reproduce an adapter library."""

    tasks: tuple[str, ...]
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generalist: AdapterSettings | None = field(default_factory=AdapterSettings)
    specialists: SpecialistSettings | None = None
    grouping: dict[str, Any] | None = None
    format: int = RECIPE_FORMAT

    def adapters(self) -> list[AdapterSpec]:
        """The adapters this recipe trains, generalist first. Specialists need the
        grouping to be resolved first (`resolve_grouping`)."""
        specs: list[AdapterSpec] = []
        if self.generalist is not None:
            specs.append(AdapterSpec(GENERALIST, "generalist", self.tasks, self.generalist))
        if self.specialists is not None:
            if self.grouping is None:
                raise TrainingError("the specialists' grouping is not resolved yet")
            init = (
                GENERALIST
                if self.specialists.init_from_generalist and self.generalist is not None
                else None
            )
            for group in self.grouping["groups"]:
                tasks = tuple(group["tasks"])
                specs.append(
                    AdapterSpec(group["name"], "specialist", tasks, self.specialists, init)
                )
        return specs

    def to_json(self) -> dict[str, Any]:
        return cast(dict[str, Any], _plain(self))


def _plain(value: Any) -> Any:
    """Dataclasses (and tuples) as JSON-ready dicts and lists."""
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _build(cls: type[Any], raw: object, where: str) -> Any:
    """A config dataclass from JSON, refusing unknown keys (a typo must not silently
    train something else)."""
    if not isinstance(raw, dict):
        raise TrainingError(f"recipe: `{where}` must be an object")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise TrainingError(f"recipe: unknown key(s) in `{where}`: {', '.join(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    try:
        return cls(**values)
    except TypeError as exc:
        raise TrainingError(f"recipe: `{where}`: {exc}") from exc


def recipe_from_json(raw: object) -> Recipe:
    if not isinstance(raw, dict):
        raise TrainingError("recipe: not a JSON object")
    if raw.get("format") != RECIPE_FORMAT:
        raise TrainingError(f"recipe: format {raw.get('format')!r} is not {RECIPE_FORMAT}")
    tasks = raw.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise TrainingError("recipe: `tasks` must be a non-empty list of task names")
    grouping = raw.get("grouping")
    if grouping is not None and not (
        isinstance(grouping, dict) and isinstance(grouping.get("groups"), list)
    ):
        raise TrainingError("recipe: `grouping` must be an object with `groups`")
    recipe = Recipe(
        tasks=tuple(tasks),
        data=_build(DataConfig, raw.get("data", {}), "data"),
        train=_build(TrainConfig, raw.get("train", {}), "train"),
        generalist=None
        if raw.get("generalist") is None
        else _build(AdapterSettings, raw["generalist"], "generalist"),
        specialists=None
        if raw.get("specialists") is None
        else _build(SpecialistSettings, raw["specialists"], "specialists"),
        grouping=grouping,
    )
    check_recipe(recipe)
    return recipe


def read_recipe(path: Path | str) -> Recipe:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingError(f"cannot read the recipe {path}: {exc}") from exc
    return recipe_from_json(raw)


def write_recipe(path: Path, recipe: Recipe) -> None:
    text = json.dumps(recipe.to_json(), indent=2, ensure_ascii=False) + "\n"
    write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


def check_recipe(recipe: Recipe) -> None:
    d = recipe.data
    if not 0.0 <= d.demo_fraction <= 1.0:
        raise TrainingError("demo_fraction must be within [0, 1]")
    if d.k < 0 or d.max_seq_len < 32 or d.max_target_tokens < 1 or d.holdout_per_task < 0:
        raise TrainingError("k >= 0, max_seq_len >= 32, max_target_tokens >= 1 needed")
    if d.demo_seq_len < 1:
        raise TrainingError("demo_seq_len must be positive (it is capped at max_seq_len)")
    if d.prompt_format not in ("chat", "plain"):
        raise TrainingError("prompt_format must be chat or plain")
    if recipe.train.batch_tokens < d.max_seq_len:
        raise TrainingError("batch_tokens must be at least max_seq_len")
    for name, settings in (("generalist", recipe.generalist), ("specialists", recipe.specialists)):
        if settings is None:
            continue
        if settings.rank < 1 or settings.per_task < 1 or settings.epochs <= 0:
            raise TrainingError(f"{name}: rank, per_task and epochs must be positive")
        if settings.learning_rate <= 0 or settings.centroids < 1:
            raise TrainingError(f"{name}: learning_rate and centroids must be positive")
        bad = sorted(set(settings.target_modules) - set(ALL_LINEAR))
        if bad or not settings.target_modules:
            raise TrainingError(f"{name}: target_modules must be among {', '.join(ALL_LINEAR)}")
    if recipe.generalist is None and recipe.specialists is None:
        raise TrainingError("the recipe trains nothing (no generalist, no specialists)")
    if recipe.specialists is not None and recipe.specialists.init_from_generalist:
        if recipe.generalist is None:
            raise TrainingError("specialists start from the generalist: the recipe has none")
        missing = set(recipe.specialists.target_modules) - set(recipe.generalist.target_modules)
        if missing:
            raise TrainingError(
                f"specialists start from the generalist, which has no {', '.join(sorted(missing))}"
            )


# --------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class TrainExample:
    """One training sequence: the prompt as the server would send it, then the answer."""

    task: str
    index: int  # position among the task's usable examples
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]  # the answer's tokens and the end-of-turn token
    demo_tasks: tuple[str, ...] = ()  # tasks of the demonstrations in the prompt

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


@dataclass(frozen=True)
class TaskSplit:
    train_candidates: list[int]  # indices into usable_examples(task), in seeded order
    held_out: list[int]


def split_task(task: Task, seed: int, holdout_per_task: int) -> TaskSplit:
    """A seeded permutation of the task's usable examples: the last ones are held out
    (at most a quarter of the task), the rest are candidates for training, in order."""
    n = len(usable_examples(task))
    order = list(range(n))
    random.Random(f"{seed}:split:{task.name}").shuffle(order)
    hold = min(holdout_per_task, n // 4)
    return TaskSplit(train_candidates=order[: n - hold], held_out=sorted(order[n - hold :]))


class Tokenizer(Protocol):
    eos_token_id: int

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


def render_ids(tokenizer: Tokenizer, prompt: str | Sequence[Turn]) -> list[int]:
    """Token ids of a prompt exactly as serve.engine.Engine tokenizes it: text with the
    special tokens (`encode`), chat turns through the chat template with the generation
    prompt (`render_chat`). tests/unit/routing checks the two agree."""
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt, add_special_tokens=True))
    ids = tokenizer.apply_chat_template(
        [{"role": t.role, "content": t.content} for t in prompt],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    return list(ids["input_ids"])


def target_ids(tokenizer: Tokenizer, output: str) -> list[int]:
    """The answer as the model must write it after the generation prompt: its tokens and
    the end-of-turn token (the chat template's `<|im_end|>`, the tokenizer's eos)."""
    return [*tokenizer.encode(output.strip(), add_special_tokens=False), tokenizer.eos_token_id]


def request_turns(definition: str, text: str) -> list[Turn]:
    """How a client (and `crosstask eval`) asks: the task definition as the system
    message, the input as the user message."""
    return [Turn("system", definition), Turn("user", text)]


class DemoSource(Protocol):
    """Retrieval for training: the store's search, with the default embedder."""

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...

    def search(self, vector: np.ndarray, k: int, exclude_task: str) -> list[Demonstration]: ...


@dataclass
class StoreDemoSource:
    """The server's retrieval, synchronously: the default embedder and a read-only store
    (so training may run beside a server that has the store open)."""

    store_dir: Path
    embedder_dir: Path | None = None
    _embedder: Any = field(default=None, init=False)
    _store: Any = field(default=None, init=False)

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from retrieval.embedder import Embedder

            self._embedder = Embedder(self.embedder_dir)
        return self._embedder

    @property
    def embedder_name(self) -> str:
        return str(self.embedder.name)

    def _open(self) -> Any:
        if self._store is None:
            from retrieval.store import DemonstrationStore, StoreError

            store = DemonstrationStore.open(self.store_dir, self.embedder.dim, read_only=True)
            meta = store.metadata()
            if meta.get("embedder") not in (None, self.embedder.name) or meta.get(
                "query_text_version"
            ) not in (None, str(QUERY_TEXT_VERSION)):
                store.close()
                raise StoreError(
                    f"the store {self.store_dir} was embedded differently "
                    f"({meta.get('embedder')}, query text v{meta.get('query_text_version')})"
                )
            self._store = store
        return self._store

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return cast(np.ndarray, self.embedder.encode(list(texts)))

    def search(self, vector: np.ndarray, k: int, exclude_task: str) -> list[Demonstration]:
        hits = self._open().search(vector, k, 0.0, [exclude_task])
        return [Demonstration(h.task, h.definition, h.input, h.output) for h in hits]

    def ids(self, vector: np.ndarray, k: int, exclude_task: str) -> list[str]:
        return [h.id for h in self._open().search(vector, k, 0.0, [exclude_task])]

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


@dataclass
class PreparedData:
    """The training examples of every task of a recipe, and their query embeddings."""

    examples: dict[str, list[TrainExample]]  # per task, in seeded order
    queries: dict[str, np.ndarray]  # per task: (n, dim) embeddings, aligned with examples

    def trained(self, tasks: Iterable[str]) -> list[str]:
        """The tasks among `tasks` that have training examples (see _prepare_all)."""
        return [t for t in tasks if self.examples.get(t)]

    def for_tasks(self, tasks: Iterable[str], per_task: int) -> list[TrainExample]:
        return [ex for t in self.trained(tasks) for ex in self.examples[t][:per_task]]

    def query_vectors(self, tasks: Iterable[str], per_task: int) -> np.ndarray:
        return np.concatenate([self.queries[t][:per_task] for t in self.trained(tasks)])


def wants_demos(seed: int, task: str, index: int, fraction: float) -> bool:
    """Whether this example is trained with demonstrations: a seeded coin per example, so
    it does not change with which other examples or adapters are trained."""
    return random.Random(f"{seed}:demos:{task}:{index}").random() < fraction


def prepare_task(
    task: Task,
    count: int,
    data: DataConfig,
    tokenizer: Tokenizer,
    demos: DemoSource | None,
) -> tuple[list[TrainExample], np.ndarray]:
    """The first `count` training examples of `task` (see the module docstring), with
    their query embeddings (zeros when there is no demo source to embed with)."""
    usable = usable_examples(task)
    split = split_task(task, data.seed, data.holdout_per_task)
    chosen: list[tuple[int, Example, list[int], list[int]]] = []
    for index in split.train_candidates:
        if len(chosen) == count:
            break
        example = usable[index]
        target = target_ids(tokenizer, example.output)
        if len(target) > data.max_target_tokens:
            continue
        bare = render_ids(tokenizer, training_prompt(task, example, [], data))
        if len(bare) + len(target) > data.max_seq_len:
            continue
        chosen.append((index, example, bare, target))
    if not chosen:
        return [], np.zeros((0, 1), dtype=np.float32)
    texts = [query_text(task.definition, ex.input) for _, ex, _, _ in chosen]
    vectors = demos.embed(texts) if demos is not None else np.zeros((len(chosen), 1), np.float32)
    out: list[TrainExample] = []
    for (index, example, bare, target), vector in zip(chosen, vectors, strict=True):
        prompt_ids, used = bare, list[Demonstration]()
        if (
            demos is not None
            and data.k > 0
            and wants_demos(data.seed, task.name, index, data.demo_fraction)
        ):
            found = demos.search(vector, data.k, task.name)
            prompt_ids, used = _fit_demos(task, example, found, target, data, tokenizer)
        out.append(
            TrainExample(
                task=task.name,
                index=index,
                prompt_ids=tuple(prompt_ids),
                target_ids=tuple(target),
                demo_tasks=tuple(d.task for d in used),
            )
        )
    return out, np.asarray(vectors, dtype=np.float32)


def training_prompt(
    task: Task, example: Example, found: Sequence[Demonstration], data: DataConfig
) -> str | list[Turn]:
    """The prompt the server builds when a client asks `example` of `task` (definition
    as the system message, input as the user message) with `found` retrieved."""
    turns = request_turns(task.definition, example.input)
    return request_prompt(turns, task.definition, example.input, found, data.prompt_format)


def _fit_demos(
    task: Task,
    example: Example,
    found: Sequence[Demonstration],
    target: Sequence[int],
    data: DataConfig,
    tokenizer: Tokenizer,
) -> tuple[list[int], list[Demonstration]]:
    """The prompt with as many of the demonstrations as fit in demo_seq_len, dropped
    farthest first: the server's own rule (`fit`), with the training length as context."""
    cache: dict[int, list[int]] = {}

    def size(kept: Sequence[Demonstration]) -> int:
        cache[len(kept)] = render_ids(tokenizer, training_prompt(task, example, kept, data))
        return len(cache[len(kept)])

    kept, _ = fit(found, size, min(data.demo_seq_len, data.max_seq_len) - len(target))
    return cache[len(kept)], kept


# --------------------------------------------------------------------------- batching


def plan_batches(
    lengths: Sequence[int], epochs: float, batch_tokens: int, seed: int
) -> list[list[int]]:
    """The whole run's batches, as example indices: each epoch is shuffled (seeded),
    cut into windows, each window sorted by length and split into batches whose padded
    size (rows x longest) stays within `batch_tokens`; the batches of an epoch are then
    shuffled. Sorting within windows keeps padding small without the order becoming
    "short examples first". A fractional last epoch takes that many of its batches."""
    n = len(lengths)
    if n == 0:
        return []
    rng = random.Random(f"{seed}:batches")
    plan: list[list[int]] = []
    full = math.ceil(epochs)
    window = 256
    for epoch in range(full):
        order = list(range(n))
        rng.shuffle(order)
        batches: list[list[int]] = []
        for start in range(0, n, window):
            chunk = sorted(order[start : start + window], key=lambda i: (lengths[i], i))
            current: list[int] = []
            longest = 0
            for i in chunk:
                size = max(longest, lengths[i]) * (len(current) + 1)
                if current and size > batch_tokens:
                    batches.append(current)
                    current, longest = [], 0
                current.append(i)
                longest = max(longest, lengths[i])
            if current:
                batches.append(current)
        rng.shuffle(batches)
        if epoch == full - 1 and epochs < full:
            batches = batches[: max(1, round(len(batches) * (epochs - (full - 1))))]
        plan.extend(batches)
    return plan


def collate(
    examples: Sequence[TrainExample], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, right-padded, and the labels: the target tokens
    only, everything else IGNORE (the loss is on the answer, never on the prompt)."""
    import torch

    width = max(ex.length for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, ex in enumerate(examples):
        seq = torch.tensor([*ex.prompt_ids, *ex.target_ids], dtype=torch.long)
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
        labels[row, len(ex.prompt_ids) : len(seq)] = seq[len(ex.prompt_ids) :]
    return ids, mask, labels


# --------------------------------------------------------------------------- training


@dataclass
class Progress:
    adapter: str
    step: int
    steps: int
    loss: float
    tokens: int  # real (unpadded) tokens processed since the (re)start
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class TrainResult:
    name: str
    steps: int
    first_loss: float  # mean over the first tenth of the steps run (at most 10)
    last_loss: float  # and over the last tenth
    tokens: int
    seconds: float
    resumed_from: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class RunOptions:
    """How to run (not what to train: these never change the result)."""

    threads: int | None = None
    checkpoint_every_s: float = 60.0
    progress: Callable[[Progress], None] | None = None


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN runs bfloat16 matmuls natively (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _use_autocast(setting: str) -> bool:
    if setting == "auto":
        return cpu_has_fast_bf16()
    return setting == "bfloat16"


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # Not Linux.
        return max(1, os.cpu_count() or 1)


def load_base(model_dir: Path) -> tuple[Any, Any]:
    """The base model (float32, sdpa attention) and its tokenizer, from a local folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
    )
    model.config.use_cache = False
    return model, tokenizer


def lora_model(base: Any, settings: AdapterSettings, seed: int) -> Any:
    """The base wrapped with a fresh LoRA of `settings` (initialized from `seed`)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # PEFT's hint says int; floats work
        target_modules=list(settings.target_modules),
        # No dropout: the adapters are small and trained briefly, and without randomness
        # in the forward pass a resumed run ends exactly where an unbroken one does.
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, config)


def init_lora_from(model: Any, adapter_dir: Path, settings: AdapterSettings) -> int:
    """Set the fresh LoRA of `model` to the update of the adapter in `adapter_dir`,
    truncated to `settings.rank` by SVD when that is lower (routing.merge does both, and
    leaves the scaling inside B); returns how many modules were set."""
    from safetensors.torch import load_file

    from routing.merge import merge_adapters

    with tempfile.TemporaryDirectory(prefix="crosstask-init-") as tmp:
        source_rank = int(json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text())["r"])
        method = "exact" if settings.rank == source_rank else "svd"
        top = max(settings.rank, source_rank)
        merge_adapters([adapter_dir], [1.0], Path(tmp), method, top, rank=settings.rank)
        factors = load_file(str(Path(tmp) / ADAPTER_WEIGHTS_FILE))
    ranks = {f.shape[0] if k.endswith("lora_A.weight") else f.shape[1] for k, f in factors.items()}
    if ranks != {settings.rank}:
        raise TrainingError(
            f"{adapter_dir.name}: rank {source_rank} cannot start rank {settings.rank}"
        )
    scaling = settings.alpha / settings.rank
    params = dict(model.named_parameters())
    done = 0
    for key, value in factors.items():
        # PEFT's saved keys drop the adapter name its parameters carry ("default").
        name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        )
        if name not in params:
            continue  # a module the new adapter does not target
        tensor = value.float() / scaling if ".lora_B." in key else value.float()
        with_grad = params[name]
        with_grad.data.copy_(tensor.to(with_grad.dtype))
        done += 1
    return done // 2


def learning_rate(step: int, steps: int, peak: float, train: TrainConfig) -> float:
    """Linear warmup, then cosine decay to `min_lr_fraction` of the peak: a function of
    the step alone, so a resumed run needs no scheduler state."""
    warmup = max(1, round(steps * train.warmup_fraction))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    floor = train.min_lr_fraction
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def answer_loss(model: Any, ids: torch.Tensor, labels: torch.Tensor) -> Any:
    """Mean cross-entropy over the labelled (answer) tokens of a right-padded batch.

    Two savings, both measured (bench/adapter_train.py): the LM head (49k words x 576)
    runs only at the positions that predict a label, not over the whole prompt; and no
    attention mask is passed. Padding sits after every real token, so causal attention
    alone keeps real tokens from seeing it (only the unscored pad positions see garbage),
    and without a mask SDPA takes its causal kernel instead of materializing masks.
    """
    import torch

    causal = model.get_base_model()
    hidden = causal.model(input_ids=ids).last_hidden_state
    targets = labels[:, 1:]
    where = targets != IGNORE
    logits = causal.lm_head(hidden[:, :-1][where]).float()
    return torch.nn.functional.cross_entropy(logits, targets[where])


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train_adapter(
    base: Any,
    tokenizer: Any,
    spec: AdapterSpec,
    examples: Sequence[TrainExample],
    train: TrainConfig,
    work_dir: Path,
    fingerprint: str,
    options: RunOptions,
    init_from: Path | None = None,
) -> tuple[Any, TrainResult]:
    """Train one LoRA on `examples`; resumes from `work_dir/checkpoint.pt` when it holds
    a checkpoint of the same training (same fingerprint). Returns the PEFT model (its
    LoRA freshly trained) and what happened. The caller unloads the LoRA afterwards."""
    import torch

    if not examples:
        raise TrainingError(f"{spec.name}: no training examples")
    torch.set_num_threads(options.threads or default_threads())
    model = lora_model(base, spec.settings, train.seed)
    if init_from is not None:
        # Before the checkpoint: a resumed run overwrites these with its own weights.
        modules = init_lora_from(model, init_from, spec.settings)
        log.info("%s: starts from %s (%d modules)", spec.name, init_from.name, modules)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=spec.settings.learning_rate, weight_decay=train.weight_decay
    )
    plan = plan_batches(
        [ex.length for ex in examples], spec.settings.epochs, train.batch_tokens, train.seed
    )
    steps = len(plan)
    checkpoint = work_dir / CHECKPOINT_FILE
    start = _load_checkpoint(checkpoint, fingerprint, model, optimizer)
    if start:
        log.info("%s: resuming at step %d of %d", spec.name, start, steps)
    autocast = _use_autocast(train.autocast)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    started = time.perf_counter()
    last_save = started
    tokens = 0
    losses: list[float] = []
    completed = start
    try:
        for step in range(start, steps):
            batch = [examples[i] for i in plan[step]]
            ids, mask, labels = collate(batch, pad_id)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, steps, spec.settings.learning_rate, train)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = answer_loss(model, ids, labels)
            loss.backward()
            if train.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            optimizer.step()
            completed = step + 1
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            tokens += int(mask.sum())
            now = time.perf_counter()
            if options.progress is not None:
                options.progress(
                    Progress(spec.name, step + 1, steps, losses[-1], tokens, now - started)
                )
            if now - last_save >= options.checkpoint_every_s and step + 1 < steps:
                _save_checkpoint(checkpoint, fingerprint, step + 1, model, optimizer)
                last_save = time.perf_counter()
    except BaseException:
        # Interrupted (Ctrl-C, an error): keep what was done, unless the interruption
        # fell inside an optimizer update (its step counter ahead of the finished steps),
        # where the weights may be half-updated; the periodic checkpoint stands then.
        if completed > start and _optimizer_steps(optimizer) == completed:
            _save_checkpoint(checkpoint, fingerprint, completed, model, optimizer)
        raise
    seconds = time.perf_counter() - started
    return model, TrainResult(
        name=spec.name,
        steps=steps,
        first_loss=_mean(losses[: _tenth(len(losses))]),
        last_loss=_mean(losses[-_tenth(len(losses)) :]),
        tokens=tokens,
        seconds=seconds,
        resumed_from=start,
    )


def _tenth(n: int) -> int:
    return max(1, min(10, n // 10))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _optimizer_steps(optimizer: Any) -> int:
    """How many updates the optimizer has begun (AdamW counts them per parameter)."""
    return max((int(s["step"]) for s in optimizer.state.values() if "step" in s), default=0)


def _save_checkpoint(path: Path, fingerprint: str, step: int, model: Any, optimizer: Any) -> None:
    import torch

    payload = {
        "fingerprint": fingerprint,
        "step": step,
        "lora": trainable_state(model),
        "optimizer": optimizer.state_dict(),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(path, lambda fh: fh.write(buffer.getvalue()))


def _load_checkpoint(path: Path, fingerprint: str, model: Any, optimizer: Any) -> int:
    """The step to start from: that of a matching checkpoint (loaded into the model and
    optimizer), else 0. A checkpoint of another training is ignored, not trusted."""
    import torch

    if not path.is_file():
        return 0
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # A torn or foreign file: start over rather than fail.
        log.warning("ignoring unreadable checkpoint %s: %s", path, exc)
        return 0
    if payload.get("fingerprint") != fingerprint:
        log.info("ignoring checkpoint %s of a different training", path)
        return 0
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in payload["lora"].items():
            named[name].copy_(value)
    optimizer.load_state_dict(payload["optimizer"])
    return int(payload["step"])


# --------------------------------------------------------------------------- saving


def prototype_of(vectors: np.ndarray, max_centroids: int, seed: int, embedder: str) -> Prototype:
    """The routing prototype: spherical k-means centroids of the embedded training
    queries (one centroid: their normalized mean)."""
    k = max(1, min(max_centroids, len(vectors)))
    result = spherical_kmeans(vectors, k, seed)
    order = sorted(range(k), key=lambda c: -result.counts[c])  # Largest cluster first.
    return Prototype(
        embedder=embedder,
        query_text_version=QUERY_TEXT_VERSION,
        centroids=[[round(float(x), 6) for x in result.centroids[c]] for c in order],
        counts=[result.counts[c] for c in order],
    )


def save_adapter(
    model: Any,
    out_dir: Path,
    meta: AdapterMeta,
    save_dtype: str,
    base_name: str,
) -> Path:
    """Write the adapter folder beside its final place and rename it in: PEFT's files
    (weights cast to `save_dtype`) and crosstask_adapter.json."""
    import torch
    from safetensors.torch import load_file, save_file

    target = out_dir / meta.name
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{meta.name}.saving-", dir=out_dir))
    try:
        model.save_pretrained(str(work), safe_serialization=True)
        weights = work / ADAPTER_WEIGHTS_FILE
        tensors = load_file(str(weights))
        dtype = getattr(torch, save_dtype)
        save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(weights))
        config_path = work / ADAPTER_CONFIG_FILE
        config = json.loads(config_path.read_text(encoding="utf-8"))
        # PEFT records the local path of the base; the library travels, the path does not.
        config["base_model_name_or_path"] = base_name
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for extra in work.iterdir():
            if extra.name not in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
                _remove(extra)  # README.md and friends: not part of the library.
        write_meta(work, meta)
        replace_dir(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def adapter_is_done(out_dir: Path, spec: AdapterSpec, fingerprint: str) -> bool:
    """Whether `out_dir/<name>` already holds this very adapter (its recipe fingerprint)."""
    folder = out_dir / spec.name
    if not (folder / ADAPTER_WEIGHTS_FILE).is_file():
        return False
    try:
        meta = read_meta(folder)
    except ValueError:
        return False
    return meta.recipe.get("fingerprint") == fingerprint


# --------------------------------------------------------------------------- the library


class TaskSource(Protocol):
    def check_names(self, names: Iterable[str]) -> None: ...

    def tasks(self, names: Sequence[str]) -> Iterator[Task]: ...


@dataclass
class LibraryReport:
    out: Path
    trained: list[TrainResult]
    skipped: list[str]
    seconds: float
    prepare_seconds: float


@dataclass
class LibraryInputs:
    """What a library is trained from, besides the recipe."""

    model_dir: Path
    source: TaskSource
    demos: DemoSource | None
    embedder_name: str


def build_library(
    recipe: Recipe,
    out: Path,
    inputs: LibraryInputs,
    only: Sequence[str] = (),
    options: RunOptions | None = None,
) -> LibraryReport:
    """Train every adapter of `recipe` (or the `only` ones) into `out`, resuming where a
    previous run stopped: finished adapters are kept, a started one continues from its
    checkpoint. The resolved recipe (with the grouping) is written to `out/recipe.json`."""
    options = options or RunOptions()
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    recipe = _continue_recipe(out, recipe)
    inputs.source.check_names(recipe.tasks)
    work = out / WORK_DIR
    model, tokenizer = load_base(inputs.model_dir)
    per_task = _per_task_needed(recipe)
    data = _prepare_all(recipe, per_task, inputs, tokenizer, work)
    prepare_seconds = time.perf_counter() - started
    if recipe.specialists is not None and recipe.grouping is None:
        recipe = resolve_grouping(recipe, data)
    write_recipe(out / RECIPE_FILE, recipe)
    specs = recipe.adapters()
    unknown = sorted(set(only) - {s.name for s in specs})
    if unknown:
        raise TrainingError(
            f"--only: no adapter named {', '.join(unknown)} "
            f"(this recipe has {', '.join(s.name for s in specs)})"
        )
    signature = base_signature(inputs.model_dir)
    trained: list[TrainResult] = []
    skipped: list[str] = []
    for spec in specs:
        if only and spec.name not in only:
            continue
        fingerprint = spec.fingerprint(recipe)
        if adapter_is_done(out, spec, fingerprint):
            skipped.append(spec.name)
            log.info("%s: already trained, kept", spec.name)
            continue
        examples = data.for_tasks(spec.tasks, spec.settings.per_task)
        adapter_work = work / spec.name
        init_from = None
        if spec.init_from is not None:
            start = next(s for s in specs if s.name == spec.init_from)
            if not adapter_is_done(out, start, start.fingerprint(recipe)):
                raise TrainingError(
                    f"{spec.name} starts from {start.name}, which is not trained yet: "
                    f"train it first (drop --only, or add {start.name} to it)"
                )
            init_from = out / start.name
        peft_model, result = train_adapter(
            model,
            tokenizer,
            spec,
            examples,
            recipe.train,
            adapter_work,
            fingerprint,
            options,
            init_from,
        )
        meta = AdapterMeta(
            name=spec.name,
            kind=spec.kind,
            tasks=data.trained(spec.tasks),
            rank=spec.settings.rank,
            base_model=signature,
            prototype=prototype_of(
                data.query_vectors(spec.tasks, spec.settings.per_task),
                spec.settings.centroids,
                recipe.data.seed,
                inputs.embedder_name,
            ),
            recipe={
                "fingerprint": fingerprint,
                "init_from": spec.init_from,
                "settings": _plain(spec.settings),
                "data": _plain(recipe.data),
                "train": _plain(recipe.train),
                "examples": len(examples),
                "with_demonstrations": sum(bool(ex.demo_tasks) for ex in examples),
                "steps": result.steps,
                "tokens_per_s": round(result.tokens_per_s, 1),
                "first_loss": round(result.first_loss, 4),
                "last_loss": round(result.last_loss, 4),
            },
        )
        save_adapter(peft_model, out, meta, recipe.train.save_dtype, inputs.model_dir.name)
        model = peft_model.unload()  # The bare base again, for the next adapter.
        shutil.rmtree(adapter_work, ignore_errors=True)
        trained.append(result)
        log.info(
            "%s: %d steps, loss %.3f -> %.3f, %.0f tokens/s, %.0f s",
            spec.name,
            result.steps,
            result.first_loss,
            result.last_loss,
            result.tokens_per_s,
            result.seconds,
        )
    if not only and all(adapter_is_done(out, s, s.fingerprint(recipe)) for s in specs):
        shutil.rmtree(work, ignore_errors=True)
    return LibraryReport(
        out=out,
        trained=trained,
        skipped=skipped,
        seconds=time.perf_counter() - started,
        prepare_seconds=prepare_seconds,
    )


def _continue_recipe(out: Path, recipe: Recipe) -> Recipe:
    """The recipe to train into `out`: the one given, or, when `out` already holds the
    same recipe (resolved), that one, so a rerun keeps its grouping. A different recipe
    is refused: mixing two libraries in one folder would be no library at all."""
    path = out / RECIPE_FILE
    if not path.is_file():
        return recipe
    existing = read_recipe(path)
    if replace(existing, grouping=recipe.grouping) == recipe or existing == recipe:
        return existing if recipe.grouping is None else recipe
    raise TrainingError(
        f"{out} holds adapters of another recipe ({path}); choose another --out, or pass "
        f"--recipe {path} to continue that one"
    )


def _per_task_needed(recipe: Recipe) -> dict[str, int]:
    needed: dict[str, int] = {}
    settings = [s for s in (recipe.generalist, recipe.specialists) if s is not None]
    for task in recipe.tasks:
        needed[task] = max(s.per_task for s in settings)
    if recipe.grouping is not None:
        for group in recipe.grouping["groups"]:
            for task in group["tasks"]:
                if task not in needed:
                    raise TrainingError(f"grouping names {task!r}, not among the recipe's tasks")
    return needed


def _prepare_all(
    recipe: Recipe,
    per_task: dict[str, int],
    inputs: LibraryInputs,
    tokenizer: Any,
    work: Path,
) -> PreparedData:
    """Every task's training examples, cached in `work` (keyed by what they depend on)
    so that a resumed run does not embed and retrieve again."""
    key = hashlib.sha256(
        json.dumps(
            {"data": _plain(recipe.data), "per_task": per_task, "demos": inputs.demos is not None},
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    cache = work / f"examples-{key}.npz"
    if cache.is_file():
        with contextlib.suppress(Exception):
            return _load_prepared(cache)
    names = list(per_task)
    examples: dict[str, list[TrainExample]] = {}
    queries: dict[str, np.ndarray] = {}
    started = time.perf_counter()
    for done, task in enumerate(inputs.source.tasks(names), start=1):
        count = per_task[task.name]
        found, vectors = prepare_task(task, count, recipe.data, tokenizer, inputs.demos)
        if not found:
            # Every example is too long (a 3,000-character definition): the task is left
            # out, and not listed among the adapters' tasks, which say what was trained.
            log.warning("task %s: no example fits in max_seq_len; left out", task.name)
            continue
        examples[task.name], queries[task.name] = found, vectors
        if done % 20 == 0 or done == len(names):
            log.info(
                "prepared %d/%d tasks (%.0f s)", done, len(names), time.perf_counter() - started
            )
    data = PreparedData(examples={t: examples[t] for t in names}, queries=queries)
    _save_prepared(cache, data)
    return data


def _save_prepared(path: Path, data: PreparedData) -> None:
    records = [asdict(ex) for exs in data.examples.values() for ex in exs]
    arrays: dict[str, Any] = {f"q{i}": data.queries[t] for i, t in enumerate(data.examples)}
    arrays["examples"] = np.frombuffer(json.dumps(records).encode(), dtype=np.uint8)
    arrays["tasks"] = np.frombuffer(json.dumps(list(data.examples)).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(path, lambda fh: fh.write(buffer.getvalue()))


def _load_prepared(path: Path) -> PreparedData:
    with np.load(path) as npz:
        records = json.loads(npz["examples"].tobytes())
        tasks = json.loads(npz["tasks"].tobytes())
        queries = {t: npz[f"q{i}"] for i, t in enumerate(tasks)}
    examples: dict[str, list[TrainExample]] = {t: [] for t in tasks}
    for r in records:
        examples[r["task"]].append(
            TrainExample(
                task=r["task"],
                index=r["index"],
                prompt_ids=tuple(r["prompt_ids"]),
                target_ids=tuple(r["target_ids"]),
                demo_tasks=tuple(r["demo_tasks"]),
            )
        )
    return PreparedData(examples=examples, queries=queries)


def resolve_grouping(recipe: Recipe, data: PreparedData) -> Recipe:
    """Fill in the specialists' groups by clustering the tasks' mean training-query
    embeddings (routing.grouping), over every prepared example of each task (the more
    queries, the steadier a task's mean)."""
    assert recipe.specialists is not None
    settings = recipe.specialists
    tasks = data.trained(recipe.tasks)
    rows = [t for t in tasks for _ in range(len(data.queries[t]))]
    vectors = np.concatenate([data.queries[t] for t in tasks])
    grouping: Grouping = group_tasks(
        task_means(rows, vectors), settings.groups, settings.grouping_seed
    )
    log.info(
        "grouped %d tasks into %d groups: %s",
        len(tasks),
        len(grouping.groups),
        ", ".join(f"{g.name} ({len(g.tasks)})" for g in grouping.groups),
    )
    return replace(recipe, grouping=grouping.to_json())


# --------------------------------------------------------------------------- progress


def progress_printer(total_steps: int | None = None) -> Callable[[Progress], None]:
    """A tqdm bar with tokens/s on a terminal; plain log lines (every 30 s) elsewhere."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    state: dict[str, Any] = {"bar": None, "adapter": None, "logged": 0.0}

    def show(p: Progress) -> None:
        if p.adapter != state["adapter"]:
            if state["bar"] is not None:
                state["bar"].close()
            state["adapter"] = p.adapter
            state["logged"] = 0.0
            state["bar"] = tqdm(
                total=p.steps,
                initial=p.step - 1,
                desc=p.adapter,
                unit="step",
                disable=not tty,
                dynamic_ncols=True,
            )
        bar = state["bar"]
        bar.update(p.step - bar.n)
        bar.set_postfix(loss=f"{p.loss:.3f}", tok_s=f"{p.tokens_per_s:.0f}", refresh=False)
        if not tty and (p.seconds - state["logged"] >= 30 or p.step == p.steps):
            state["logged"] = p.seconds
            log.info(
                "%s: step %d/%d, loss %.3f, %.0f tokens/s",
                p.adapter,
                p.step,
                p.steps,
                p.loss,
                p.tokens_per_s,
            )
        if p.step == p.steps:
            bar.close()
            state["bar"] = None
            state["adapter"] = None

    return show
