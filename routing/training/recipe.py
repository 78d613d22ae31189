"""The recipe of an adapter library: the settings dataclasses, the adapters they resolve
to, recipe.json (read, written, checked) and the fingerprints that decide whether a
training can resume or an adapter is already trained."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, cast

from retrieval.durable import write_atomic
from routing.adapter_meta import Kind

RECIPE_FORMAT = 1
RECIPE_FILE = "recipe.json"
GENERALIST = "generalist"
# The modules PEFT calls "all-linear" for Llama, spelled out so the adapter config names
# exactly what vLLM's LoRA support looks for.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TrainingError(RuntimeError):
    """The recipe cannot be trained as asked (bad settings, no usable examples, ...)."""


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
    # The defaults of `--tasks` runs: small and briefly trained, a library in minutes.
    # The shipped library's recipe (routing/library/recipe.json) sets its own, larger
    # sizes (docs/routing.md, "The default library").
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
        spec = jsonable(self)
        if self.init_from is None:
            del spec["init_from"]  # as before starting points existed: same adapters, same hash
        payload: dict[str, Any] = {
            "spec": spec,
            "data": jsonable(recipe.data),
            "train": jsonable(recipe.train),
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
        return cast(dict[str, Any], jsonable(self))


def jsonable(value: Any) -> Any:
    """Dataclasses (and tuples) as JSON-ready dicts and lists."""
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple | list):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
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
