"""The training examples of a recipe, as token ids, and their batches.

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
3. Batches of similar length (little padding) under a token budget.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np

from retrieval.build import usable_examples
from retrieval.durable import write_atomic
from retrieval.prompt import Demonstration, Turn, fit, request_prompt
from retrieval.query import QUERY_TEXT_VERSION, query_text
from retrieval.sources import Example, Task
from routing.training.recipe import DataConfig

if TYPE_CHECKING:
    import torch

# The label of a position the loss ignores (PyTorch's cross_entropy default).
IGNORE = -100


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
            from retrieval.store import DemonstrationStore
            from retrieval.store_types import StoreError

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
class TrainingData:
    """The training examples of every task of a recipe, and their query embeddings."""

    examples: dict[str, list[TrainExample]]  # per task, in seeded order
    queries: dict[str, np.ndarray]  # per task: (n, dim) embeddings, aligned with examples

    def trained(self, tasks: Iterable[str]) -> list[str]:
        """The tasks among `tasks` that have training examples (see library._training_data)."""
        return [t for t in tasks if self.examples.get(t)]

    def for_tasks(self, tasks: Iterable[str], per_task: int) -> list[TrainExample]:
        return [ex for t in self.trained(tasks) for ex in self.examples[t][:per_task]]

    def query_vectors(self, tasks: Iterable[str], per_task: int) -> np.ndarray:
        return np.concatenate([self.queries[t][:per_task] for t in self.trained(tasks)])


def wants_demos(seed: int, task: str, index: int, fraction: float) -> bool:
    """Whether this example is trained with demonstrations: a seeded coin per example, so
    it does not change with which other examples or adapters are trained."""
    return random.Random(f"{seed}:demos:{task}:{index}").random() < fraction


def task_examples(
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


# --------------------------------------------------------------------------- stored


def examples_to_records(examples: Iterable[TrainExample]) -> list[dict[str, Any]]:
    """Training examples as JSON-ready records (`examples_from_records` reads them back)."""
    return [asdict(ex) for ex in examples]


def examples_from_records(records: Iterable[dict[str, Any]]) -> list[TrainExample]:
    return [
        TrainExample(
            task=r["task"],
            index=r["index"],
            prompt_ids=tuple(r["prompt_ids"]),
            target_ids=tuple(r["target_ids"]),
            demo_tasks=tuple(r["demo_tasks"]),
        )
        for r in records
    ]


def save_training_data(path: Path, data: TrainingData) -> None:
    """The prepared examples and their query vectors in one .npz: a resumed build reads
    them back instead of embedding and retrieving again."""
    records = examples_to_records(ex for exs in data.examples.values() for ex in exs)
    arrays: dict[str, Any] = {f"q{i}": data.queries[t] for i, t in enumerate(data.examples)}
    arrays["examples"] = np.frombuffer(json.dumps(records).encode(), dtype=np.uint8)
    arrays["tasks"] = np.frombuffer(json.dumps(list(data.examples)).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(path, lambda fh: fh.write(buffer.getvalue()))


def load_training_data(path: Path) -> TrainingData:
    with np.load(path) as npz:
        records = json.loads(npz["examples"].tobytes())
        tasks = json.loads(npz["tasks"].tobytes())
        queries = {t: npz[f"q{i}"] for i, t in enumerate(tasks)}
    examples: dict[str, list[TrainExample]] = {t: [] for t in tasks}
    for ex in examples_from_records(records):
        examples[ex.task].append(ex)
    return TrainingData(examples=examples, queries=queries)
