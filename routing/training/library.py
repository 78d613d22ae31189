"""Training a whole adapter library, adapter by adapter: the generalist on every task,
then the specialists on groups of related tasks (resolved once, by clustering the tasks'
training queries, and recorded in the recipe), each saved as `<out>/<name>/` with PEFT's
adapter_config.json, adapter_model.safetensors (float16) and crosstask_adapter.json
(tasks, rank, base signature, routing prototype: centroids of the embedded training
queries). A rerun keeps the adapters already trained and continues the one it was
interrupted in."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.durable import replace_dir
from retrieval.query import QUERY_TEXT_VERSION
from retrieval.sources import TaskSource
from routing.adapter_meta import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AdapterMeta,
    Prototype,
    base_signature,
    read_meta,
    write_meta,
)
from routing.grouping import Grouping, group_tasks, spherical_kmeans, task_means
from routing.training.data import (
    DemoSource,
    TrainExample,
    TrainingData,
    load_training_data,
    plan_batches,
    save_training_data,
    task_examples,
)
from routing.training.loop import (
    RunOptions,
    StepReport,
    TrainResult,
    load_base,
    train_adapter,
)
from routing.training.recipe import (
    RECIPE_FILE,
    AdapterSpec,
    Recipe,
    TrainingError,
    jsonable,
    read_recipe,
    write_recipe,
)

log = logging.getLogger(__name__)

# Checkpoints and the prepared examples of an unfinished build, inside its library folder.
WORK_DIR = ".work"


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


@dataclass
class LibraryReport:
    out: Path
    trained: list[TrainResult]
    skipped: list[str]
    seconds: float
    data_seconds: float


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
    data = _training_data(recipe, per_task, inputs, tokenizer, work)
    data_seconds = time.perf_counter() - started
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
    chosen = [s for s in specs if not only or s.name in only]
    pending = [s for s in chosen if not adapter_is_done(out, s, s.fingerprint(recipe))]
    # Every pending adapter's step count up front, so the progress has the whole run's ETA
    # from its first step (the loop plans its batches the same way).
    planned = [
        len(
            plan_batches(
                [ex.length for ex in data.for_tasks(s.tasks, s.settings.per_task)],
                s.settings.epochs,
                recipe.train.batch_tokens,
                recipe.train.seed,
            )
        )
        for s in pending
    ]
    for spec in chosen:
        fingerprint = spec.fingerprint(recipe)
        if spec not in pending:
            skipped.append(spec.name)
            log.info("%s: already trained, kept", spec.name)
            continue
        position = pending.index(spec)
        run_options = _placed(
            options, position + 1, len(pending), sum(planned[:position]), sum(planned)
        )
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
            run_options,
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
                "settings": jsonable(spec.settings),
                "data": jsonable(recipe.data),
                "train": jsonable(recipe.train),
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
        data_seconds=data_seconds,
    )


def _placed(options: RunOptions, index: int, count: int, before: int, total: int) -> RunOptions:
    """`options` whose progress reports also say where the step stands in the whole run."""
    report = options.progress
    if report is None:
        return options

    def placed(step: StepReport) -> None:
        report(
            replace(step, index=index, count=count, run_step=before + step.step, run_steps=total)
        )

    return replace(options, progress=placed)


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


def _training_data(
    recipe: Recipe,
    per_task: dict[str, int],
    inputs: LibraryInputs,
    tokenizer: Any,
    work: Path,
) -> TrainingData:
    """Every task's training examples, cached in `work` (keyed by what they depend on)
    so that a resumed run does not embed and retrieve again."""
    key = hashlib.sha256(
        json.dumps(
            {
                "data": jsonable(recipe.data),
                "per_task": per_task,
                "demos": inputs.demos is not None,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    cache = work / f"examples-{key}.npz"
    if cache.is_file():
        with contextlib.suppress(Exception):
            return load_training_data(cache)
    names = list(per_task)
    examples: dict[str, list[TrainExample]] = {}
    queries: dict[str, np.ndarray] = {}
    started = time.perf_counter()
    for done, task in enumerate(inputs.source.tasks(names), start=1):
        count = per_task[task.name]
        found, vectors = task_examples(task, count, recipe.data, tokenizer, inputs.demos)
        if not found:
            # Every example is too long (a 3,000-character definition): the task is left
            # out, and not listed among the adapters' tasks, which say what was trained.
            log.warning("task %s: no example fits in max_seq_len; left out", task.name)
            continue
        examples[task.name], queries[task.name] = found, vectors
        if done % 20 == 0 or done == len(names):
            log.info(
                "examples of %d/%d tasks ready (%.0f s)",
                done,
                len(names),
                time.perf_counter() - started,
            )
    data = TrainingData(examples={t: examples[t] for t in names}, queries=queries)
    save_training_data(cache, data)
    return data


def resolve_grouping(recipe: Recipe, data: TrainingData) -> Recipe:
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
