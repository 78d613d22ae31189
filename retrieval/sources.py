"""Where tasks come from: BIG-bench, or a JSONL file of the user's own.

BIG-bench is read straight out of the `bigbench==1.0.0` sdist, which holds every
`task.json` (1041 of them, the 61 Natural Instructions v1 tasks among them). We never
install it (it pulls TensorFlow) and never extract it: a task is read by seeking forward
through the gzip stream to the member's data. PyPI has stopped serving that release, so
the sdist is downloaded only where an index still has it (a mirror that kept it); a copy
of the file, or a checkout of the BIG-bench repository, can be named instead
(`open_bigbench`). Without any of these `BigBenchUnavailable` says how to supply one.
"""

from __future__ import annotations

import contextlib
import difflib
import gzip
import hashlib
import importlib.metadata
import importlib.resources
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from retrieval.durable import fsync_dir

BIGBENCH_VERSION = "1.0.0"
BIGBENCH_SDIST_NAME = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
# Pinned so a truncated or tampered download is never renamed into the cache. pip checks it
# too (hash-checking mode), before it unpacks the sdist: `pip download` prepares an sdist's
# metadata, which runs its setup.py, so only the known file may get that far.
BIGBENCH_SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
# pip >= 26 refuses to download this sdist at all: preparing its metadata reveals a
# direct-URL dependency (bleurt @ file://...), which pip now rejects for anything served
# from PyPI even with --no-deps. pip 25.2 prepares the metadata too but lets that pass, so
# with a newer pip we fetch that pip wheel and run it as a zipapp (a documented way to run
# pip).
_LEGACY_PIP = "pip==25.2"
# The sha256 of pip-25.2-py3-none-any.whl on PyPI: the wheel is run, so it is pinned like
# the sdist, checked by pip as it downloads and again here before it runs.
_LEGACY_PIP_WHEEL_SHA256 = "6d67a2b4e7f14d8b31b8b52648866fa717f45a1eb70e83002f4331d07e953717"
_INDEX_FORMAT = 1

_TASKS_DIR = ("bigbench", "benchmark_tasks")
_TASK_FILE = "task.json"
_OPTIONS_HEADER = "\nOptions:"


class SourceError(RuntimeError):
    """The sdist could not be obtained or read, or a task.json is malformed."""


class BigBenchUnavailable(SourceError):
    """No BIG-bench copy was named or cached here, and pip could not download one."""


class _PipFailed(SourceError):
    """pip exited non-zero (nothing to download, no index, no network)."""


class UnknownTaskError(KeyError):
    """A task name that the sdist does not hold (or that has no examples of its own)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all.
        return self.message


@dataclass(slots=True)
class Example:
    """One demonstration: `output` is what a model should answer; `targets` all accepted."""

    input: str
    output: str
    targets: list[str]


@dataclass(slots=True)
class Task:
    name: str
    definition: str
    examples: list[Example]


class TaskSource(Protocol):
    """Where tasks come from: `BigBenchSource`, `BigBenchCheckout`, `TaskList`."""

    def check_names(self, names: Iterable[str]) -> None:
        """Raise UnknownTaskError for any name the source does not hold."""
        ...

    def tasks(self, names: Sequence[str]) -> Iterator[Task]: ...


@dataclass(frozen=True, slots=True)
class _Member:
    """Where a task.json's bytes start in the decompressed tar stream, and how many."""

    offset: int
    size: int


# --------------------------------------------------------------------------- download


def ensure_bigbench_sdist(cache_dir: Path) -> Path:
    """Return the path of the cached sdist, downloading it with pip the first time.

    The file appears in `cache_dir` only complete and hash-checked (downloaded into a
    temporary folder beside it, then renamed), so an existing file is always good.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / BIGBENCH_SDIST_NAME
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bigbench-download-", dir=cache_dir) as tmp:
        work = Path(tmp)
        dest = work / "sdist"
        try:
            _run_pip(
                [
                    *_pip_command(work),
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    # Build with this environment's setuptools: an isolated build would
                    # first install build dependencies from the index, which no hash covers.
                    "--no-build-isolation",
                    *_hash_pinned(work, f"bigbench=={BIGBENCH_VERSION}", BIGBENCH_SDIST_SHA256),
                    "-d",
                    str(dest),
                ]
            )
        except _PipFailed as exc:  # A hash mismatch is no reason to go on without it.
            raise BigBenchUnavailable(f"{exc}\n{how_to_supply_bigbench(target)}") from exc
        downloaded = dest / BIGBENCH_SDIST_NAME
        if not downloaded.is_file():
            raise SourceError(f"pip reported success but {downloaded.name} is missing")
        digest = _sha256(downloaded)
        if digest != BIGBENCH_SDIST_SHA256:
            raise SourceError(
                f"{downloaded.name}: sha256 {digest} != expected {BIGBENCH_SDIST_SHA256}"
            )
        with open(downloaded, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(downloaded, target)
        fsync_dir(cache_dir)
    return target


def how_to_supply_bigbench(cache_file: Path) -> str:
    return (
        f"BIG-bench {BIGBENCH_VERSION} could not be downloaded (PyPI no longer serves it; "
        "pip finds it only on an index that kept it). Name a copy instead: "
        "CROSSTASK_BIGBENCH=PATH (or --bigbench PATH), PATH being "
        f"{BIGBENCH_SDIST_NAME} or a checkout of the BIG-bench repository; or put the "
        f"sdist (sha256 {BIGBENCH_SDIST_SHA256}) at {cache_file}."
    )


def open_bigbench(path: Path | None, cache_dir: Path) -> BigBenchSource | BigBenchCheckout:
    """BIG-bench from `path` (the sdist, or a folder holding
    `bigbench/benchmark_tasks`), else from the sdist cached in `cache_dir`, downloaded
    there the first time. Raises BigBenchUnavailable when there is none to be had."""
    if path is not None:
        path = Path(path).expanduser()
        return BigBenchCheckout(path) if path.is_dir() else BigBenchSource(path)
    return BigBenchSource(ensure_bigbench_sdist(cache_dir))


def local_bigbench(path: Path | None, cache_dir: Path) -> Path | None:
    """The BIG-bench copy `open_bigbench` would read without downloading, if any."""
    if path is not None:
        return Path(path).expanduser()
    cached = Path(cache_dir) / BIGBENCH_SDIST_NAME
    return cached if cached.is_file() else None


def _pip_command(work: Path) -> list[str]:
    """The argv prefix of a pip that can download the sdist (see _LEGACY_PIP)."""
    try:
        major = int(importlib.metadata.version("pip").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        major = 0
    if major and major < 26:
        return [sys.executable, "-m", "pip"]
    wheel_dir = work / "pip"
    _run_pip(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            *_hash_pinned(work, _LEGACY_PIP, _LEGACY_PIP_WHEEL_SHA256),
            "-d",
            str(wheel_dir),
        ]
    )
    wheels = sorted(wheel_dir.glob("pip-*.whl"))
    if len(wheels) != 1:
        raise SourceError(f"could not obtain {_LEGACY_PIP} to download the BIG-bench sdist")
    # pip checked the hash as it downloaded; check the file that will run, whoever wrote it.
    digest = _sha256(wheels[0])
    if digest != _LEGACY_PIP_WHEEL_SHA256:
        raise SourceError(
            f"{wheels[0].name}: sha256 {digest} != expected {_LEGACY_PIP_WHEEL_SHA256}"
        )
    return [sys.executable, str(wheels[0] / "pip")]


def _hash_pinned(work: Path, requirement: str, sha256: str) -> list[str]:
    """pip arguments that download `requirement` in hash-checking mode: pip refuses any
    file whose sha256 differs before it unpacks or builds it. A pin can only be given in a
    requirements file, so one is written into `work`."""
    name = requirement.partition("==")[0]
    path = work / f"{name}-requirements.txt"
    path.write_text(f"{requirement} --hash=sha256:{sha256}\n", encoding="utf-8")
    return ["--require-hashes", "-r", str(path)]


def _run_pip(argv: list[str]) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise _PipFailed(f"command failed ({proc.returncode}): {' '.join(argv)}\n{tail}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- task lists


def read_task_list(path: Path | str) -> list[str]:
    """Task names from a file: one a line; blank lines and `#` comments are ignored."""
    return parse_task_list(Path(path).read_text(encoding="utf-8"))


def parse_task_list(text: str) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        name = line.split("#", 1)[0].strip()
        if name and name not in seen:
            seen.add(name)
            names.append(name)
    return names


def default_seen_tasks() -> list[str]:
    """The tasks the default demonstration store is built from (the default adapter
    library is trained on these and on `seen_tasks_extra.txt`)."""
    return _packaged_task_list("seen_tasks.txt")


def default_dev_tasks() -> list[str]:
    """Unseen tasks for development evaluation."""
    return _packaged_task_list("dev_tasks.txt")


def _packaged_task_list(filename: str) -> list[str]:
    # importlib.resources so this works from a wheel or zip, not only a source checkout.
    resource = importlib.resources.files("retrieval").joinpath("data", filename)
    return parse_task_list(resource.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- reading


class _TaskJsonFiles(ABC):
    """What the two BIG-bench layouts share: names, their checks, and task.json parsing."""

    path: Path

    @abstractmethod
    def _names(self) -> Iterable[str]: ...

    @abstractmethod
    def _read(self, names: Sequence[str]) -> Iterator[tuple[str, bytes]]: ...

    # -- names

    def names(self) -> list[str]:
        """Every task name here, sorted (parents of subtasks included)."""
        return sorted(self._names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in set(self._names())

    def check_names(self, names: Iterable[str]) -> None:
        """Raise UnknownTaskError naming every unknown task, with close matches."""
        known = set(self._names())
        problems = []
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
                hint = f" (did you mean: {', '.join(close)}?)" if close else ""
                problems.append(f"{name!r}{hint}")
        if problems:
            raise UnknownTaskError(
                f"unknown BIG-bench task(s) in {self.path.name}: " + "; ".join(problems)
            )

    # -- tasks

    def task(self, name: str) -> Task:
        return next(self.tasks([name]))

    def tasks(self, names: Sequence[str]) -> Iterator[Task]:
        self.check_names(names)
        for name, raw in self._read(names):
            yield self._parse(name, raw)

    def _parse(self, name: str, raw: bytes) -> Task:
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceError(f"task {name!r}: task.json is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise SourceError(f"task {name!r}: task.json is not an object")
        raw_examples = data.get("examples")
        if not raw_examples:
            subtasks = [n for n in self._names() if n.startswith(name + "/")]
            hint = f"; its subtasks: {', '.join(sorted(subtasks))}" if subtasks else ""
            raise UnknownTaskError(f"task {name!r} has no examples of its own{hint}")
        examples = [ex for ex in map(convert_example, raw_examples) if ex is not None]
        return Task(name=name, definition=task_definition(data), examples=examples)


class BigBenchSource(_TaskJsonFiles):
    """Tasks from a BIG-bench sdist tarball, indexed once and read member by member.

    Building the index needs one pass over the whole archive (about 10 s for the real
    one); it is kept beside the sdist in `<sdist>.index.json` so later instances start
    at once. Reading tasks seeks forward through the gzip stream, so `tasks()` reads in
    archive order: one pass however many tasks are asked for.
    """

    def __init__(self, sdist_path: Path | str) -> None:
        self.path = Path(sdist_path)
        if not self.path.is_file():
            raise SourceError(f"BIG-bench sdist not found: {self.path}")
        self._index: dict[str, _Member] | None = None

    def _names(self) -> Iterable[str]:
        return self._members().keys()

    def _read(self, names: Sequence[str]) -> Iterator[tuple[str, bytes]]:
        """The named tasks' bytes in archive order (one forward pass over the stream)."""
        index = self._members()
        wanted = sorted(set(names), key=lambda n: index[n].offset)
        with gzip.open(self.path, "rb") as stream:
            for name in wanted:
                member = index[name]
                stream.seek(member.offset)
                raw = stream.read(member.size)
                if len(raw) != member.size:
                    raise SourceError(f"{self.path.name}: truncated member for {name!r}")
                yield name, raw

    # -- index

    def _members(self) -> dict[str, _Member]:
        if self._index is None:
            self._index = self._load_index() or self._build_index()
        return self._index

    def _index_path(self) -> Path:
        return self.path.with_name(self.path.name + ".index.json")

    def _fingerprint(self) -> dict[str, int]:
        st = self.path.stat()
        return {"format": _INDEX_FORMAT, "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def _load_index(self) -> dict[str, _Member] | None:
        try:
            data = json.loads(self._index_path().read_text(encoding="utf-8"))
            if data.get("fingerprint") != self._fingerprint():
                return None
            return {name: _Member(int(o), int(s)) for name, (o, s) in data["members"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            return None  # Missing or damaged: rebuild it.

    def _build_index(self) -> dict[str, _Member]:
        index: dict[str, _Member] = {}
        try:
            with tarfile.open(self.path, "r:gz") as tar:
                for info in tar:  # Streams member headers; nothing is extracted.
                    name = task_name_for_member(info.name)
                    if name is not None and info.isfile():
                        index[name] = _Member(info.offset_data, info.size)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise SourceError(f"cannot read {self.path}: {exc}") from exc
        if not index:
            raise SourceError(f"{self.path} holds no bigbench/benchmark_tasks/*/task.json")
        self._save_index(index)
        return index

    def _save_index(self, index: dict[str, _Member]) -> None:
        payload = {
            "fingerprint": self._fingerprint(),
            "members": {n: [m.offset, m.size] for n, m in sorted(index.items())},
        }
        target = self._index_path()
        # Best effort: the sdist may live somewhere read-only; the index is only a speedup.
        with contextlib.suppress(OSError):
            fd, tmp = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=target.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(payload, fh)
                os.replace(tmp, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)


def task_name_for_member(member_name: str) -> str | None:
    """`<root>/bigbench/benchmark_tasks/arithmetic/1_digit_addition/task.json` ->
    `arithmetic/1_digit_addition`; None for anything that is not a task.json."""
    parts = member_name.strip("/").split("/")
    if len(parts) < 4 or parts[-1] != _TASK_FILE:
        return None
    for i in range(len(parts) - 2):
        if (parts[i], parts[i + 1]) == _TASKS_DIR:
            rest = parts[i + 2 : -1]
            return "/".join(rest) if rest else None
    return None


class BigBenchCheckout(_TaskJsonFiles):
    """Tasks from a folder: a checkout of the BIG-bench repository, the sdist unpacked,
    or their `bigbench/benchmark_tasks` folder itself. Read in name order."""

    def __init__(self, root: Path | str) -> None:
        self.path = Path(root)
        self._tasks_dir = _benchmark_tasks_dir(self.path)
        self._files: dict[str, Path] | None = None

    def _names(self) -> Iterable[str]:
        if self._files is None:
            found = {
                file.parent.relative_to(self._tasks_dir).as_posix(): file
                for file in self._tasks_dir.rglob(_TASK_FILE)
                if file.is_file() and file.parent != self._tasks_dir
            }
            if not found:
                raise SourceError(f"{self._tasks_dir} holds no */{_TASK_FILE}")
            self._files = found
        return self._files.keys()

    def _read(self, names: Sequence[str]) -> Iterator[tuple[str, bytes]]:
        self._names()
        assert self._files is not None
        for name in sorted(set(names)):
            try:
                yield name, self._files[name].read_bytes()
            except OSError as exc:
                raise SourceError(f"cannot read task {name!r}: {exc}") from exc


def _benchmark_tasks_dir(root: Path) -> Path:
    candidates = [root / _TASKS_DIR[0] / _TASKS_DIR[1], root / _TASKS_DIR[1], root]
    for folder in candidates:
        names = (folder.parent.name, folder.name)
        if names == _TASKS_DIR and folder.is_dir():
            return folder
    if not root.exists():
        raise SourceError(f"BIG-bench folder not found: {root}")
    raise SourceError(f"{root} holds no {'/'.join(_TASKS_DIR)} folder")


class TaskList:
    """Tasks held in memory: a user's own JSONL file of them (`read_jsonl_tasks`)."""

    def __init__(self, tasks: Iterable[Task], origin: str = "task list") -> None:
        self.origin = origin
        self._tasks = {t.name: t for t in tasks}

    def names(self) -> list[str]:
        """Every task name, in the order first given."""
        return list(self._tasks)

    def check_names(self, names: Iterable[str]) -> None:
        unknown = [n for n in names if n not in self._tasks]
        if unknown:
            raise UnknownTaskError(
                f"unknown task(s) in {self.origin}: " + ", ".join(map(repr, unknown))
            )

    def tasks(self, names: Sequence[str]) -> Iterator[Task]:
        self.check_names(names)
        for name in dict.fromkeys(names):
            yield self._tasks[name]


def read_jsonl_tasks(path: Path | str) -> TaskList:
    """Tasks from a JSONL file, one object a line shaped like the body of
    `POST /v1/demonstrations`: `{"task", "definition", "examples": [{"input", "output"}]}`.
    Lines naming the same task add to its examples (their definitions must agree); blank
    lines are skipped. Raises SourceError naming the line of anything malformed."""
    path = Path(path)
    tasks: dict[str, Task] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SourceError(f"{where}: not JSON: {exc}") from exc
        name, definition, examples = _jsonl_fields(data, where)
        task = tasks.setdefault(name, Task(name=name, definition=definition, examples=[]))
        if task.definition != definition:
            raise SourceError(f"{where}: task {name!r} was given another definition before")
        task.examples.extend(examples)
    return TaskList(tasks.values(), origin=path.name)


def _jsonl_fields(data: object, where: str) -> tuple[str, str, list[Example]]:
    if not isinstance(data, dict):
        raise SourceError(f"{where}: expected an object")
    name, definition, raw = data.get("task"), data.get("definition"), data.get("examples")
    if not isinstance(name, str) or not name.strip():
        raise SourceError(f"{where}: 'task' must be a non-empty string")
    if not isinstance(definition, str):
        raise SourceError(f"{where}: 'definition' must be a string")
    if not isinstance(raw, list) or not raw:
        raise SourceError(f"{where}: 'examples' must be a non-empty list")
    examples = []
    for i, ex in enumerate(raw):
        text = ex.get("input") if isinstance(ex, dict) else None
        output = ex.get("output") if isinstance(ex, dict) else None
        if not isinstance(text, str) or not isinstance(output, str):
            raise SourceError(f"{where}: examples[{i}] needs string 'input' and 'output'")
        examples.append(Example(input=text, output=output, targets=[output]))
    return name.strip(), definition, examples


def task_definition(data: dict[str, Any]) -> str:
    """The task's instruction: `task_prefix` when non-empty (for Natural Instructions it
    is the full crowdsourcing definition, with Things to Avoid and Prompt; `description`
    holds a shortened copy), else the one-line `description`."""
    prefix = data.get("task_prefix")
    if isinstance(prefix, str) and prefix.strip():
        return prefix.strip()
    description = data.get("description")
    return description.strip() if isinstance(description, str) else ""


def convert_example(raw: object) -> Example | None:
    """A BIG-bench example as an Example, or None when it has no usable input or output.

    A generative `target` (string or list) wins when present, since some tasks (such as
    arithmetic) also carry `target_scores` only as multiple-choice distractors. Otherwise
    the `target_scores` options are listed after the input and the best one is the output.
    """
    if not isinstance(raw, dict):
        return None
    text = raw.get("input", "")
    if not isinstance(text, str):
        return None
    target = raw.get("target")
    if isinstance(target, str):
        targets = [target]
    elif isinstance(target, list):
        targets = [t for t in target if isinstance(t, str)]
    else:
        targets = []
    targets = [t for t in targets if t.strip()]
    if targets and text.strip():
        return Example(input=text, output=targets[0], targets=targets)
    scores = raw.get("target_scores")
    if isinstance(scores, dict) and scores:
        options = [str(k) for k in scores]
        values = [_as_float(v) for v in scores.values()]
        best = max(values)
        winners = [o for o, v in zip(options, values, strict=True) if v == best and o.strip()]
        if winners:
            # Some tasks (cause_and_effect) have an empty input: the options are the question.
            listed = "\n".join(f"- {o}" for o in options)
            head = text + _OPTIONS_HEADER if text.strip() else _OPTIONS_HEADER.lstrip("\n")
            return Example(input=f"{head}\n{listed}", output=winners[0], targets=winners)
    return None


def _as_float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("-inf")
