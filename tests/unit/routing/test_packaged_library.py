"""The default adapter library shipped in routing/library: small enough to commit, every
adapter valid for the embedded base model, and exactly what its recipe describes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from routing.adapter_meta import read_meta
from routing.registry import BaseShapes, inspect_adapter
from routing.service import default_library
from routing.training.recipe import GENERALIST, RECIPE_FILE, read_recipe

MAX_LIBRARY_BYTES = 80 * 1024 * 1024
EMBEDDER = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def library() -> Path:
    folder = default_library()
    assert folder is not None, "routing/library is missing or empty"
    return folder


def test_library_fits_the_size_budget(library: Path) -> None:
    size = sum(p.stat().st_size for p in library.rglob("*") if p.is_file())
    assert size <= MAX_LIBRARY_BYTES, f"{size / 2**20:.1f} MB"


def test_library_is_what_its_recipe_trains(library: Path) -> None:
    recipe = read_recipe(library / RECIPE_FILE)
    specs = {s.name: s for s in recipe.adapters()}
    folders = {p.name for p in library.iterdir() if p.is_dir()}
    assert folders == set(specs)
    assert GENERALIST in specs and 6 <= len(specs) - 1 <= 12
    # Built from the seen tasks alone (both lists), never the dev tasks it is tuned on nor
    # the confirm tasks it is reported on.
    data = Path(__file__).parents[3] / "retrieval" / "data"

    def listed(name: str) -> set[str]:
        return {line.strip() for line in (data / name).read_text().splitlines() if line.strip()}

    assert set(recipe.tasks) == listed("seen_tasks.txt") | listed("seen_tasks_extra.txt")
    assert not set(recipe.tasks) & (listed("dev_tasks.txt") | listed("confirm_tasks.txt"))
    for name, spec in specs.items():
        meta = read_meta(library / name)
        assert meta.kind == spec.kind and meta.rank == spec.settings.rank
        assert set(meta.tasks) <= set(spec.tasks)
        assert meta.recipe["fingerprint"] == spec.fingerprint(recipe)


def test_every_adapter_is_valid_for_the_embedded_model(library: Path) -> None:
    home = Path(os.environ.get("CROSSTASK_HOME", "~/.cache/crosstask")).expanduser()
    model_dir = home / "models" / "smollm2-135m-instruct"
    if not (model_dir / "config.json").is_file():
        pytest.fail(f"base model missing at {model_dir}: run `make test`", pytrace=False)
    base = BaseShapes.of(model_dir)
    for folder in sorted(p for p in library.iterdir() if p.is_dir()):
        adapter = inspect_adapter(folder.name, folder, library, base, 32, None)
        assert adapter.meta is not None and adapter.meta.prototype.embedder == EMBEDDER
