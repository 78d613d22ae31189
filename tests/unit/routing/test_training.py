"""Adapter training on the real base model, kept to seconds: tiny adapters (rank 2) on a
handful of short examples. The base model is the one `make test` prepares under
CROSSTASK_HOME; without it these tests fail (they never skip)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from retrieval.prompt import Demonstration
from retrieval.sources import Example, Task
from routing.adapter_meta import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AdapterMeta,
    Prototype,
    base_signature,
    read_meta,
)
from routing.training.data import (
    IGNORE,
    TrainExample,
    collate,
    plan_batches,
    render_ids,
    request_turns,
    split_task,
    target_ids,
    task_examples,
)
from routing.training.library import LibraryInputs, build_library, save_adapter
from routing.training.loop import (
    RunOptions,
    StepReport,
    _load_checkpoint,
    answer_loss,
    init_lora_from,
    learning_rate,
    load_base,
    lora_model,
    train_adapter,
    trainable_state,
)
from routing.training.recipe import (
    ALL_LINEAR,
    AdapterSettings,
    AdapterSpec,
    DataConfig,
    Recipe,
    SpecialistSettings,
    TrainConfig,
    TrainingError,
    read_recipe,
    recipe_from_json,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

QA = [
    ("What is 2 plus 2?", "4"),
    ("What is the capital of France?", "Paris"),
    ("What colour is the sky on a clear day?", "blue"),
    ("What is 3 plus 5?", "8"),
    ("How many legs does a spider have?", "eight"),
    ("What is the opposite of hot?", "cold"),
]
TINY = AdapterSettings(rank=2, alpha=4.0, per_task=6, epochs=4, learning_rate=5e-3)
FAST = TrainConfig(batch_tokens=512, warmup_fraction=0.0)
# One thread: on a shared machine two OpenMP threads, each losing its core now and then,
# ran these steps 20x slower than one (every parallel region waits for the later one).
THREADS = 1


def _home() -> Path:
    return Path(os.environ.get("CROSSTASK_HOME", "~/.cache/crosstask")).expanduser()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The base model folder `make test` prepares (crosstask prepare). Missing, the
    suite fails here, loudly, rather than skipping the training tests."""
    folder = _home() / "models" / "smollm2-135m-instruct"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        pytest.fail(
            f"base model missing at {folder}: run `make test` (it prepares the model with "
            "`crosstask prepare`), or set CROSSTASK_HOME to where it was prepared",
            pytrace=False,
        )
    return folder


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Any:
    return load_base(model_dir)[1]


@pytest.fixture
def base(model_dir: Path) -> Iterator[Any]:
    """A fresh base model: training wraps it in place, so no test shares one."""
    torch.set_num_threads(THREADS)
    yield load_base(model_dir)[0]


def _examples(tokenizer: Any, qa: Sequence[tuple[str, str]] = QA) -> list[TrainExample]:
    return [
        TrainExample(
            task="qa",
            index=i,
            prompt_ids=tuple(render_ids(tokenizer, request_turns("Answer in one word.", q))),
            target_ids=tuple(target_ids(tokenizer, a)),
        )
        for i, (q, a) in enumerate(qa)
    ]


def _spec(settings: AdapterSettings = TINY) -> AdapterSpec:
    return AdapterSpec("tiny", "specialist", ("qa",), settings)


# --------------------------------------------------------------------------- data


def test_labels_cover_only_the_answer_and_end_of_turn(tokenizer: Any) -> None:
    examples = _examples(tokenizer)[:3]
    ids, mask, labels = collate(examples, pad_id=tokenizer.pad_token_id)
    for row, ex in enumerate(examples):
        start, end = len(ex.prompt_ids), ex.length
        assert (labels[row, :start] == IGNORE).all()  # no loss on the prompt
        assert labels[row, start:end].tolist() == list(ex.target_ids)
        assert (labels[row, end:] == IGNORE).all()  # nor on padding
        assert mask[row, :end].all() and not mask[row, end:].any()
        assert ids[row, :end].tolist() == [*ex.prompt_ids, *ex.target_ids]
    answer = tokenizer.decode(examples[0].target_ids)
    assert answer == "4<|im_end|>"
    prompt = tokenizer.decode(examples[0].prompt_ids)
    assert prompt.endswith("<|im_start|>assistant\n")  # the generation prompt, as served


def test_batches_are_deterministic_within_budget_and_cover_every_epoch() -> None:
    lengths = [5, 50, 7, 300, 120, 64, 64, 9, 200, 33] * 5
    plan = plan_batches(lengths, epochs=2, batch_tokens=400, seed=3)
    assert plan == plan_batches(lengths, epochs=2, batch_tokens=400, seed=3)
    assert plan != plan_batches(lengths, epochs=2, batch_tokens=400, seed=4)
    for batch in plan:
        assert len(batch) == 1 or max(lengths[i] for i in batch) * len(batch) <= 400
    seen = sorted(i for batch in plan for i in batch)
    assert seen == sorted(list(range(len(lengths))) * 2)
    half = plan_batches(lengths, epochs=1.5, batch_tokens=400, seed=3)
    first_epoch = len(plan_batches(lengths, epochs=1, batch_tokens=400, seed=3))
    assert first_epoch < len(half) < len(plan)


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    train = TrainConfig(warmup_fraction=0.1, min_lr_fraction=0.1)
    rates = [learning_rate(s, 100, 1.0, train) for s in range(100)]
    assert rates[0] == pytest.approx(0.1)
    assert max(rates) == pytest.approx(1.0)
    assert rates[-1] == pytest.approx(0.1, abs=0.01)
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(rates[10:]))


def test_split_holds_out_disjoint_examples_deterministically() -> None:
    task = Task(
        "t",
        "Define t.",
        [Example(f"in {i}", f"out {i}", [f"out {i}"]) for i in range(40)],
    )
    split = split_task(task, seed=0, holdout_per_task=20)
    assert len(split.held_out) == 10  # at most a quarter of the task
    assert not set(split.held_out) & set(split.train_candidates)
    assert split == split_task(task, seed=0, holdout_per_task=20)
    assert split != split_task(task, seed=1, holdout_per_task=20)


class _FakeDemos:
    """Retrieval stand-in: every query gets the same two demonstrations of task `other`."""

    def __init__(self) -> None:
        self.excluded: list[str] = []

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        # A direction per task (the third word of its definition names it).
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.split()[2].encode()).digest()[:4], "big")
            rows.append(np.random.default_rng(seed).standard_normal(8))
        v = np.asarray(rows, dtype=np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def search(self, vector: np.ndarray, k: int, exclude_task: str) -> list[Demonstration]:
        self.excluded.append(exclude_task)
        return [
            Demonstration("other", "Reverse the word.", f"word{i}", f"drow{i}") for i in range(k)
        ][:2]


def test_prepared_examples_mix_demonstrations_and_exclude_their_own_task(
    tokenizer: Any,
) -> None:
    task = Task("t", "Repeat the input.", [Example(f"x{i}", f"x{i}", [f"x{i}"]) for i in range(40)])
    demos = _FakeDemos()
    data = DataConfig(demo_fraction=0.5, k=2, max_seq_len=256, holdout_per_task=4)
    examples, vectors = task_examples(task, 12, data, tokenizer, demos)
    assert len(examples) == 12 and vectors.shape == (12, 8)
    with_demos = [ex for ex in examples if ex.demo_tasks]
    assert 0 < len(with_demos) < 12
    assert set(demos.excluded) == {"t"}
    assert all(ex.demo_tasks == ("other", "other") for ex in with_demos)
    text = tokenizer.decode(with_demos[0].prompt_ids)
    assert "Reverse the word." in text and "drow0" in text
    # The same again: the coin per example is seeded.
    again, _ = task_examples(task, 12, data, tokenizer, _FakeDemos())
    assert again == examples
    # Demonstrations are dropped to fit demo_seq_len; the example itself stays.
    tight = DataConfig(demo_fraction=1.0, k=2, max_seq_len=256, demo_seq_len=40)
    short, _ = task_examples(task, 3, tight, tokenizer, _FakeDemos())
    assert len(short) == 3 and all(ex.length <= 40 for ex in short)
    assert all(ex.demo_tasks == () for ex in short)
    # An example longer than max_seq_len is passed over.
    assert task_examples(task, 3, DataConfig(max_seq_len=20), tokenizer, None)[0] == []


# --------------------------------------------------------------------------- training


def test_padded_batch_loss_is_the_mean_over_answer_tokens(base: Any, tokenizer: Any) -> None:
    """answer_loss passes no attention mask: right padding must still change nothing."""
    model = lora_model(base, TINY, 0)
    examples = _examples(tokenizer)[:3]
    assert len({ex.length for ex in examples}) > 1  # padding is really there
    with torch.no_grad():
        ids, _, labels = collate(examples, tokenizer.pad_token_id)
        batched = answer_loss(model, ids, labels)
        total = 0.0
        for ex in examples:
            one_ids, _, one_labels = collate([ex], tokenizer.pad_token_id)
            total += float(answer_loss(model, one_ids, one_labels)) * len(ex.target_ids)
    mean = total / sum(len(ex.target_ids) for ex in examples)
    assert float(batched) == pytest.approx(mean, rel=1e-4)


def test_tiny_adapter_lowers_the_loss_and_loads_back_with_peft(
    base: Any, tokenizer: Any, tmp_path: Path, model_dir: Path
) -> None:
    from peft import PeftModel

    examples = _examples(tokenizer)
    losses: list[float] = []
    model, result = train_adapter(
        base,
        tokenizer,
        _spec(),
        examples,
        FAST,
        tmp_path / "work",
        "fp",
        RunOptions(threads=THREADS, progress=lambda p: losses.append(p.loss)),
    )
    assert result.steps == len(losses) >= 4
    assert losses[-1] < 0.5 * losses[0]
    meta = AdapterMeta(
        name="tiny",
        kind="specialist",
        tasks=["qa"],
        rank=2,
        base_model=base_signature(model_dir),
        prototype=Prototype("test-embedder", 1, [[1.0, 0.0]], [6]),
    )
    folder = save_adapter(model, tmp_path / "lib", meta, "float16", "smollm2-135m-instruct")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, "crosstask_adapter.json"]
    )
    config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
    assert config["r"] == 2 and config["base_model_name_or_path"] == "smollm2-135m-instruct"
    assert read_meta(folder).rank == 2

    ids, mask, _ = collate(examples[:2], tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids, attention_mask=mask).logits
    reloaded = PeftModel.from_pretrained(load_base(model_dir)[0], str(folder))
    with torch.no_grad():
        loaded = reloaded(input_ids=ids, attention_mask=mask).logits
    # float16 storage of the LoRA factors: close, not bit-equal.
    assert torch.allclose(trained, loaded, atol=0.05, rtol=0.0)
    bare = model.unload()
    with torch.no_grad():
        untouched = bare(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(untouched, loaded, atol=0.05, rtol=0.0)

    # A LoRA started from it (same rank, another alpha) computes what it computes; a
    # lower rank starts from its best approximation (specialists start so from the
    # generalist).
    same_settings = AdapterSettings(rank=2, alpha=8.0)
    same = lora_model(bare, same_settings, 1)
    assert init_lora_from(same, folder, same_settings) == 30 * len(ALL_LINEAR)
    with torch.no_grad():
        started = same(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(started, loaded, atol=1e-3, rtol=0.0)
    bare = same.unload()
    lower_settings = AdapterSettings(rank=1, alpha=1.0)
    lower = lora_model(bare, lower_settings, 1)
    init_lora_from(lower, folder, lower_settings)
    with torch.no_grad():
        approximated = lower(input_ids=ids, attention_mask=mask).logits
    gap = (approximated - loaded).abs().mean()
    assert gap < 0.5 * (untouched - loaded).abs().mean()


class _Interrupt(Exception):
    pass


def test_resumed_training_ends_with_the_same_weights(
    model_dir: Path, tokenizer: Any, tmp_path: Path
) -> None:
    examples = _examples(tokenizer, QA[:3])
    spec = _spec(AdapterSettings(rank=2, alpha=4.0, per_task=3, epochs=2, learning_rate=5e-3))
    train = TrainConfig(batch_tokens=50, warmup_fraction=0.2)  # one example a step
    options = RunOptions(threads=THREADS, checkpoint_every_s=1e9)
    whole, whole_result = train_adapter(
        load_base(model_dir)[0], tokenizer, spec, examples, train, tmp_path / "a", "fp", options
    )
    assert whole_result.steps == 6

    def stop_at_3(p: StepReport) -> None:
        if p.step == 3:
            raise _Interrupt

    interrupted = RunOptions(threads=THREADS, checkpoint_every_s=1e9, progress=stop_at_3)
    with pytest.raises(_Interrupt):
        train_adapter(
            load_base(model_dir)[0], tokenizer, spec, examples, train, tmp_path / "b", "fp",
            interrupted,
        )  # fmt: skip
    assert (tmp_path / "b" / "checkpoint.pt").is_file()
    resumed, resumed_result = train_adapter(
        load_base(model_dir)[0], tokenizer, spec, examples, train, tmp_path / "b", "fp", options
    )
    assert resumed_result.resumed_from == 3
    a, b = trainable_state(whole), trainable_state(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # A checkpoint of another training (another fingerprint) is not trusted.
    fresh = lora_model(load_base(model_dir)[0], spec.settings, 0)
    optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad])
    assert _load_checkpoint(tmp_path / "b" / "checkpoint.pt", "other", fresh, optimizer) == 0
    assert _load_checkpoint(tmp_path / "b" / "checkpoint.pt", "fp", fresh, optimizer) == 3


# --------------------------------------------------------------------------- recipes


def test_recipe_round_trip_and_refusals(tmp_path: Path) -> None:
    recipe = Recipe(
        tasks=("a", "b"),
        data=DataConfig(demo_fraction=0.25),
        generalist=AdapterSettings(rank=4, target_modules=("q_proj", "v_proj")),
        specialists=SpecialistSettings(rank=2, groups=2, target_modules=("q_proj",)),
    )
    assert recipe_from_json(json.loads(json.dumps(recipe.to_json()))) == recipe
    # Specialists start from the generalist: they cannot target modules it lacks.
    raw = recipe.to_json()
    raw["specialists"]["target_modules"] = ["q_proj", "o_proj"]
    with pytest.raises(TrainingError, match="o_proj"):
        recipe_from_json(raw)
    raw = recipe.to_json()
    raw["data"]["demo_fracton"] = 0.5
    with pytest.raises(TrainingError, match="demo_fracton"):
        recipe_from_json(raw)
    raw = recipe.to_json()
    raw["generalist"]["target_modules"] = ["lm_head"]
    with pytest.raises(TrainingError, match="target_modules"):
        recipe_from_json(raw)
    with pytest.raises(TrainingError, match="grouping"):
        recipe.adapters()


class _FakeSource:
    def __init__(self, tasks: dict[str, Task]) -> None:
        self._tasks = tasks

    def check_names(self, names: Iterable[str]) -> None:
        missing = [n for n in names if n not in self._tasks]
        if missing:
            raise KeyError(missing)

    def tasks(self, names: Sequence[str]) -> Iterator[Task]:
        return iter([self._tasks[n] for n in names])


def test_library_build_resumes_and_refuses_another_recipe(model_dir: Path, tmp_path: Path) -> None:
    tasks = {
        name: Task(
            name,
            f"Answer the {name} question.",
            # Distinct inputs per copy, or usable_examples() would deduplicate them.
            [Example(f"{name} {q} #{i}", a, [a]) for i in range(2) for q, a in QA],
        )
        for name in ("alpha", "beta", "gamma")
    }
    recipe = Recipe(
        tasks=tuple(tasks),
        data=DataConfig(holdout_per_task=2, demo_fraction=0.5, k=2, max_seq_len=128),
        train=FAST,
        generalist=AdapterSettings(rank=2, alpha=4.0, per_task=2, epochs=1, centroids=2),
        specialists=SpecialistSettings(rank=2, alpha=4.0, per_task=2, epochs=1, groups=2),
    )
    inputs = LibraryInputs(model_dir, _FakeSource(tasks), _FakeDemos(), "test-embedder")
    out = tmp_path / "lib"
    options = RunOptions(threads=THREADS)
    report = build_library(recipe, out, inputs, only=["generalist"], options=options)
    assert [r.name for r in report.trained] == ["generalist"]
    saved = read_recipe(out / "recipe.json")
    assert saved.grouping is not None and len(saved.grouping["groups"]) == 2
    meta = read_meta(out / "generalist")
    assert meta.kind == "generalist" and meta.tasks == list(tasks) and meta.rank == 2
    assert meta.prototype.embedder == "test-embedder" and len(meta.prototype.centroids) == 2
    assert meta.base_model == base_signature(model_dir)
    # Run again without --only: the generalist is kept, the specialists are trained
    # with the grouping recorded the first time.
    reports: list[StepReport] = []
    watched = RunOptions(threads=THREADS, progress=reports.append)
    report = build_library(recipe, out, inputs, options=watched)
    assert report.skipped == ["generalist"]
    names = sorted(g["name"] for g in saved.grouping["groups"])
    assert sorted(r.name for r in report.trained) == names
    # Each step says where it stands in this run: the run's steps are the two
    # specialists' (the kept generalist is not counted), numbered across them.
    total = sum(r.steps for r in report.trained)
    assert [r.run_step for r in reports] == list(range(1, total + 1))
    assert {(r.run_steps, r.count) for r in reports} == {(total, 2)}
    assert sorted({(r.adapter, r.index) for r in reports}) == sorted(
        (r.name, i) for i, r in enumerate(report.trained, start=1)
    )
    assert not (out / ".work").exists()
    other = Recipe(tasks=tuple(tasks), train=FAST, generalist=AdapterSettings(rank=4))
    with pytest.raises(TrainingError, match="another recipe"):
        build_library(other, out, inputs)
