from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from retrieval import sources
from retrieval.sources import (
    BigBenchCheckout,
    BigBenchSource,
    BigBenchUnavailable,
    Example,
    SourceError,
    UnknownTaskError,
    default_dev_tasks,
    default_seen_tasks,
    ensure_bigbench_sdist,
    local_bigbench,
    open_bigbench,
    parse_task_list,
    read_jsonl_tasks,
    read_task_list,
    task_name_for_member,
)

LONG_NI = "natural_instructions/subtask008_mctaco_wrong_answer_generation_transient_stationary"


def test_member_names_map_to_bigbench_task_names() -> None:
    root = "bigbench-1.0.0/bigbench/benchmark_tasks"
    assert task_name_for_member(f"{root}/object_counting/task.json") == "object_counting"
    assert (
        task_name_for_member(f"{root}/arithmetic/1_digit_addition/task.json")
        == "arithmetic/1_digit_addition"
    )
    assert task_name_for_member(f"{root}/object_counting/README.md") is None
    assert task_name_for_member(f"{root}/task.json") is None
    assert task_name_for_member("bigbench-1.0.0/bigbench/task.json") is None


def test_names_include_subtasks_and_long_member_paths(fake_sdist: Path) -> None:
    src = BigBenchSource(fake_sdist)
    names = src.names()
    assert "arithmetic/1_digit_addition" in names
    assert "arithmetic" in names
    assert LONG_NI in names  # Over 100 characters: stored with a long-name header.
    assert "some_programmatic_task" not in names
    assert "object_counting" in src


def test_generative_targets(fake_sdist: Path) -> None:
    task = BigBenchSource(fake_sdist).task("object_counting")
    assert task.definition == "Questions that involve enumerating objects"
    # The example without input and the one with only an empty target are dropped.
    assert task.examples == [
        Example("I have a violin and a flute. How many instruments?", "two", ["two", "2"]),
        Example("I have a car. How many objects?", "one", ["one", "1"]),
    ]


def test_target_wins_over_distractor_scores(fake_sdist: Path) -> None:
    task = BigBenchSource(fake_sdist).task("arithmetic/1_digit_addition")
    assert task.examples[0] == Example("What is 0 plus 0?", "0", ["0"])


def test_multiple_choice_lists_options_and_picks_best(fake_sdist: Path) -> None:
    task = BigBenchSource(fake_sdist).task("date_understanding")
    assert task.definition == "Infer the date from context"  # Blank task_prefix ignored.
    first, second = task.examples
    assert first.input == (
        "Yesterday was April 30, 2021. What is the date today?"
        "\nOptions:\n- 04/29/2021\n- 05/01/2021\n- 05/02/2021"
    )
    assert first.output == "05/01/2021"
    assert second.output == "two"
    assert second.targets == ["two", "four"]


def test_multiple_choice_with_empty_input(fake_sdist: Path) -> None:
    task = BigBenchSource(fake_sdist).task("cause_and_effect/one_sentence")
    assert task.definition == "Which of the following sentences makes more sense?"
    (ex,) = task.examples
    assert ex.input.startswith("Options:\n- The child cried")
    assert ex.output == "The child cried because it hurt its knee."


def test_natural_instructions_definition_is_task_prefix(fake_sdist: Path) -> None:
    task = BigBenchSource(fake_sdist).task(
        "natural_instructions/subtask046_miscellaenous_question_typing"
    )
    assert task.definition.startswith("Definition: Generate the type")
    assert task.definition.endswith("Prompt: Generate the type.")
    assert task.examples[1].targets == ["Humans.", "Law."]


def test_tasks_reads_many_in_one_pass(fake_sdist: Path) -> None:
    src = BigBenchSource(fake_sdist)
    wanted = ["object_counting", LONG_NI, "arithmetic/1_digit_addition", "object_counting"]
    got = [t.name for t in src.tasks(wanted)]
    assert sorted(got) == sorted(set(wanted))


def test_unknown_names_fail_with_close_matches(fake_sdist: Path) -> None:
    src = BigBenchSource(fake_sdist)
    with pytest.raises(UnknownTaskError) as info:
        list(src.tasks(["object_count", "arithmetic/1_digit_adition", "zzz_nothing_like_it"]))
    message = str(info.value)
    assert "did you mean: object_counting" in message
    assert "arithmetic/1_digit_addition" in message
    assert "'zzz_nothing_like_it'" in message


def test_parent_task_without_examples_names_its_subtasks(fake_sdist: Path) -> None:
    with pytest.raises(UnknownTaskError, match="arithmetic/1_digit_addition"):
        BigBenchSource(fake_sdist).task("arithmetic")


def test_index_is_cached_beside_the_sdist(
    fake_sdist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    BigBenchSource(fake_sdist).names()
    assert fake_sdist.with_name(fake_sdist.name + ".index.json").is_file()

    def no_scan(*args: object, **kwargs: object) -> None:
        raise AssertionError("the archive was scanned again")

    monkeypatch.setattr(tarfile, "open", no_scan)
    src = BigBenchSource(fake_sdist)
    assert src.task("object_counting").examples


def test_index_cache_is_ignored_when_the_sdist_changes(
    tmp_path: Path, make_sdist: Callable[..., Path]
) -> None:
    path = make_sdist(tmp_path / "bb.tar.gz")
    BigBenchSource(path).names()
    make_sdist(
        path, {"only_task": {"description": "d", "examples": [{"input": "i", "target": "o"}]}}
    )
    os.utime(path, ns=(1, 1))
    assert BigBenchSource(path).names() == ["only_task"]


def test_damaged_index_cache_is_rebuilt(fake_sdist: Path) -> None:
    BigBenchSource(fake_sdist).names()
    fake_sdist.with_name(fake_sdist.name + ".index.json").write_text("{not json")
    assert "object_counting" in BigBenchSource(fake_sdist).names()


def test_not_a_tarball(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(SourceError):
        BigBenchSource(bad).names()
    with pytest.raises(SourceError):
        BigBenchSource(tmp_path / "missing.tar.gz")


def test_task_lists() -> None:
    text = (
        "# comment\nobject_counting\n\n  arithmetic/1_digit_addition  # inline\nobject_counting\n"
    )
    assert parse_task_list(text) == ["object_counting", "arithmetic/1_digit_addition"]
    seen, dev = default_seen_tasks(), default_dev_tasks()
    assert len(seen) == 100 and len(dev) == 9
    assert not set(seen) & set(dev)
    assert "natural_instructions/subtask001_quoref_question_generation" in seen


def test_read_task_list(tmp_path: Path) -> None:
    path = tmp_path / "tasks.txt"
    path.write_text("a\n# b\nc/d\n")
    assert read_task_list(path) == ["a", "c/d"]


def test_ensure_sdist_reuses_cached_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = tmp_path / sources.BIGBENCH_SDIST_NAME
    cached.write_bytes(b"x")
    monkeypatch.setattr(sources, "_run_pip", lambda argv: pytest.fail("pip was run"))
    assert ensure_bigbench_sdist(tmp_path) == cached


FAKE_WHEEL = b"pretend pip wheel"


@pytest.fixture
def legacy_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """This pip is too new to download the sdist (whatever the venv holds), and the pip
    wheel the fake index serves is the pinned one."""
    import hashlib
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "26.0")
    digest = hashlib.sha256(FAKE_WHEEL).hexdigest()
    monkeypatch.setattr(sources, "_LEGACY_PIP_WHEEL_SHA256", digest, raising=False)


def _requirement(argv: list[str]) -> tuple[str, set[str]]:
    """What a `pip download` asks for, and the sha256 pins it gives (from its -r file)."""
    import re

    if "-r" in argv:
        text = Path(argv[argv.index("-r") + 1]).read_text(encoding="utf-8")
        return text.split()[0], set(re.findall(r"--hash=sha256:([0-9a-f]+)", text))
    return next(a for a in argv if "==" in a), set()


def _runs_wheel(argv: list[str]) -> bool:
    return len(argv) > 1 and argv[1].endswith(".whl/pip")


@dataclass
class PipCall:
    argv: list[str]
    requirement: str
    pins: set[str]


def _fake_pip(
    payload: bytes,
    calls: list[PipCall],
    prepared: list[str] | None = None,
    wheel: bytes = FAKE_WHEEL,
    check_hashes: bool = True,
) -> Callable[[list[str]], None]:
    """`pip download` from an index serving `payload` as the sdist and `wheel` as pip.
    Like pip: in hash-checking mode a file matching no pin is refused before anything else;
    an sdist that gets past that has its metadata prepared, which runs its setup.py
    (recorded in `prepared`). `check_hashes=False`: a pip that lets a bad file through."""
    import hashlib

    def run(argv: list[str]) -> None:
        requirement, pins = _requirement(argv)
        calls.append(PipCall(argv, requirement, pins))
        content = payload if requirement.startswith("bigbench==") else wheel
        pinned = hashlib.sha256(content).hexdigest() in pins
        if check_hashes and "--require-hashes" in argv and not pinned:
            raise SourceError(f"{requirement}: sha256 does not match the pinned hash")
        if requirement.startswith("bigbench=="):
            if prepared is not None:
                prepared.append(requirement)
            name = sources.BIGBENCH_SDIST_NAME
        else:  # The legacy pip wheel, fetched when this pip is too new.
            name = "pip-25.2-py3-none-any.whl"
        dest = Path(argv[argv.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(content)

    return run


def test_ensure_sdist_downloads_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, legacy_pip: None
) -> None:
    import hashlib

    payload = b"pretend sdist"
    calls: list[PipCall] = []
    monkeypatch.setattr(sources, "BIGBENCH_SDIST_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(sources, "_run_pip", _fake_pip(payload, calls))
    cache = tmp_path / "cache"
    path = ensure_bigbench_sdist(cache)
    assert path.read_bytes() == payload
    assert sorted(p.name for p in cache.iterdir()) == [sources.BIGBENCH_SDIST_NAME]
    download = next(c for c in calls if c.requirement == "bigbench==1.0.0")
    assert {"--no-deps", "--no-binary", ":all:"} <= set(download.argv)


def test_ensure_sdist_pins_the_sdist_and_the_pip_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, legacy_pip: None
) -> None:
    import hashlib

    payload = b"pretend sdist"
    calls: list[PipCall] = []
    monkeypatch.setattr(sources, "BIGBENCH_SDIST_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(sources, "_run_pip", _fake_pip(payload, calls))
    ensure_bigbench_sdist(tmp_path)
    fetch_pip, fetch_sdist = calls
    # Both downloads in hash-checking mode, each pinned to the module's hash.
    assert "--require-hashes" in fetch_pip.argv
    assert (fetch_pip.requirement, fetch_pip.pins) == (
        "pip==25.2",
        {sources._LEGACY_PIP_WHEEL_SHA256},
    )
    assert _runs_wheel(fetch_sdist.argv) and "--require-hashes" in fetch_sdist.argv
    assert (fetch_sdist.requirement, fetch_sdist.pins) == (
        "bigbench==1.0.0",
        {sources.BIGBENCH_SDIST_SHA256},
    )
    # Build dependencies fetched for an isolated build would be covered by no hash.
    assert "--no-build-isolation" in fetch_sdist.argv


def test_ensure_sdist_rejects_a_bad_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, legacy_pip: None
) -> None:
    monkeypatch.setattr(sources, "_run_pip", _fake_pip(b"tampered", []))
    with pytest.raises(SourceError, match="sha256"):
        ensure_bigbench_sdist(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_tampered_sdist_is_refused_before_its_setup_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, legacy_pip: None
) -> None:
    prepared: list[str] = []
    monkeypatch.setattr(sources, "_run_pip", _fake_pip(b"tampered", [], prepared))
    with pytest.raises(SourceError, match="sha256"):
        ensure_bigbench_sdist(tmp_path)
    assert prepared == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("check_hashes", [True, False])
def test_a_tampered_pip_wheel_never_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, legacy_pip: None, check_hashes: bool
) -> None:
    import hashlib

    payload = b"pretend sdist"
    calls: list[PipCall] = []
    monkeypatch.setattr(sources, "BIGBENCH_SDIST_SHA256", hashlib.sha256(payload).hexdigest())
    fake = _fake_pip(payload, calls, wheel=b"tampered wheel", check_hashes=check_hashes)
    monkeypatch.setattr(sources, "_run_pip", fake)
    # Refused by pip's hash check, or (should a file get past pip) by the module's own.
    with pytest.raises(SourceError, match="sha256"):
        ensure_bigbench_sdist(tmp_path)
    assert not any(_runs_wheel(c.argv) for c in calls)
    assert list(tmp_path.iterdir()) == []


def test_an_index_without_the_sdist_says_how_to_supply_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, legacy_pip: None
) -> None:
    def no_such_version(argv: list[str]) -> None:
        raise sources._PipFailed("No matching distribution found for bigbench==1.0.0")

    monkeypatch.setattr(sources, "_run_pip", no_such_version)
    with pytest.raises(BigBenchUnavailable) as caught:
        open_bigbench(None, tmp_path)
    message = str(caught.value)
    assert "No matching distribution" in message
    assert "CROSSTASK_BIGBENCH" in message and sources.BIGBENCH_SDIST_SHA256 in message
    assert list(tmp_path.iterdir()) == []
    assert local_bigbench(None, tmp_path) is None


def _write_checkout(root: Path, tasks: dict[str, dict[str, Any]]) -> Path:
    for name, data in tasks.items():
        folder = root / "bigbench" / "benchmark_tasks" / name
        folder.mkdir(parents=True)
        (folder / "task.json").write_text(json.dumps(data))
    (root / "bigbench" / "benchmark_tasks" / "README.md").write_text("not a task")
    return root


def test_a_checkout_reads_as_the_sdist_does(fake_sdist: Path, tmp_path: Path) -> None:
    from tests.unit.retrieval.conftest import FAKE_TASKS

    checkout = _write_checkout(tmp_path / "BIG-bench", FAKE_TASKS)
    packed = BigBenchSource(fake_sdist)
    for root in (checkout, checkout / "bigbench", checkout / "bigbench" / "benchmark_tasks"):
        unpacked = BigBenchCheckout(root)
        assert unpacked.names() == packed.names()
        names = ["object_counting", "arithmetic/1_digit_addition", "date_understanding"]
        assert list(unpacked.tasks(names)) == sorted(packed.tasks(names), key=lambda t: t.name)
    with pytest.raises(UnknownTaskError, match="arithmetic/1_digit_addition"):
        BigBenchCheckout(checkout).task("arithmetic")
    with pytest.raises(UnknownTaskError, match="object_countin"):
        BigBenchCheckout(checkout).check_names(["object_countin"])


def test_a_folder_that_is_no_checkout_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="bigbench/benchmark_tasks"):
        BigBenchCheckout(tmp_path)
    with pytest.raises(SourceError, match="not found"):
        BigBenchCheckout(tmp_path / "missing")
    (tmp_path / "bigbench" / "benchmark_tasks").mkdir(parents=True)
    with pytest.raises(SourceError, match="holds no"):
        BigBenchCheckout(tmp_path).names()


def test_open_bigbench_reads_what_it_is_given(fake_sdist: Path, tmp_path: Path) -> None:
    from tests.unit.retrieval.conftest import FAKE_TASKS

    checkout = _write_checkout(tmp_path / "BIG-bench", FAKE_TASKS)
    assert isinstance(open_bigbench(checkout, tmp_path / "cache"), BigBenchCheckout)
    assert isinstance(open_bigbench(fake_sdist, tmp_path / "cache"), BigBenchSource)
    assert local_bigbench(checkout, tmp_path / "cache") == checkout
    cache = tmp_path / "cache"
    cache.mkdir()
    cached = cache / sources.BIGBENCH_SDIST_NAME
    cached.write_bytes(fake_sdist.read_bytes())
    assert local_bigbench(None, cache) == cached
    assert open_bigbench(None, cache).path == cached  # No download: it is cached.
    with pytest.raises(SourceError, match="not found"):
        open_bigbench(tmp_path / "nowhere.tar.gz", cache)


def test_jsonl_tasks(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    lines = [
        {"task": "a", "definition": "Do A.", "examples": [{"input": "1", "output": "x"}]},
        {"task": "b", "definition": "Do B.", "examples": [{"input": "2", "output": "y"}]},
        {"task": "a", "definition": "Do A.", "examples": [{"input": "3", "output": "z"}]},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    tasks = read_jsonl_tasks(path)
    assert tasks.names() == ["a", "b"]
    a = next(tasks.tasks(["a"]))
    assert a.definition == "Do A."
    assert [(e.input, e.output, e.targets) for e in a.examples] == [
        ("1", "x", ["x"]),
        ("3", "z", ["z"]),
    ]
    with pytest.raises(UnknownTaskError, match="'c'"):
        tasks.check_names(["a", "c"])


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("not json", "not JSON"),
        ("[1]", "expected an object"),
        ('{"definition": "d", "examples": [{"input": "i", "output": "o"}]}', "'task'"),
        ('{"task": " ", "definition": "d", "examples": [{"input": "i", "output": "o"}]}', "'task'"),
        ('{"task": "t", "examples": [{"input": "i", "output": "o"}]}', "'definition'"),
        ('{"task": "t", "definition": "d", "examples": []}', "'examples'"),
        ('{"task": "t", "definition": "d", "examples": [{"input": "i"}]}', r"examples\[0\]"),
        ('{"task": "a", "definition": "Other.", "examples": [{"input": "i", "output": "o"}]}',
         "another definition"),
    ],
)  # fmt: skip
def test_jsonl_tasks_name_the_bad_line(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "mine.jsonl"
    first = {"task": "a", "definition": "Do A.", "examples": [{"input": "1", "output": "x"}]}
    path.write_text(json.dumps(first) + "\n" + line + "\n")
    with pytest.raises(SourceError, match=problem) as caught:
        read_jsonl_tasks(path)
    assert "mine.jsonl:2" in str(caught.value)


def _real_sdist() -> str | None:
    """The BIG-bench named by CROSSTASK_BIGBENCH (the sdist or a checkout), else the sdist
    `crosstask prepare` (run by `make test` before the suite) caches under CROSSTASK_HOME
    where it could download it."""
    named = os.environ.get("CROSSTASK_BIGBENCH")
    if named:
        return named
    home = Path(os.environ.get("CROSSTASK_HOME", "~/.cache/crosstask")).expanduser()
    cached = home / "bigbench" / "bigbench-1.0.0.tar.gz"
    return str(cached) if cached.is_file() else None


REAL_SDIST = _real_sdist()


@pytest.mark.skipif(
    not REAL_SDIST, reason="no BIG-bench here: PyPI no longer serves it; set CROSSTASK_BIGBENCH"
)
def test_real_sdist_has_every_default_task() -> None:
    assert REAL_SDIST is not None
    src = open_bigbench(Path(REAL_SDIST), Path("/nonexistent"))
    assert len(src.names()) >= 1041
    wanted = default_seen_tasks() + default_dev_tasks()
    tasks = {t.name: t for t in src.tasks(wanted)}
    assert set(tasks) == set(wanted)
    for task in tasks.values():
        assert task.definition, task.name
        assert task.examples, task.name
    counting = src.task("object_counting")
    assert counting.examples[0].targets == ["three", "3"]
    ni = tasks["natural_instructions/subtask019_mctaco_temporal_reasoning_category"]
    assert ni.definition.startswith("Definition:")
