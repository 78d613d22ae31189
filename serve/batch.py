"""`crosstask batch`: OpenAI batch JSONL through the server's own request path, in-process.

Each input line `{"custom_id", "method", "url", "body"}` is validated with the same
protocol models and served by the same `ChatServing` / `CompletionServing` objects as the
HTTP routes (retrieval, routing, prompt assembly, generation, annotation included); only
the HTTP hop is gone. Output lines follow `vllm run-batch` (and OpenAI's batch files):

    {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}

plus `"line"`, the 1-based input line number, which makes resuming, sharding and merging
exact. A failed line has `error` = {"code", "message"} and the OpenAI error body as its
response body.

Crash safety. Results are appended (one `write` of a whole line, then a flush) as they
complete, so the output is the log of finished work: a rerun with the same OUTPUT skips
every line already there, cuts off a torn last line, and never writes a line twice. Once
every line of the input (or of the shard) is done, the file is rewritten in input order
(written beside it, fsynced, renamed over it), so a finished output reads like vLLM's.

Memory. The input is streamed line by line; what stays in memory is one 8-byte digest per
custom_id seen (to refuse duplicates) and the number of every finished line, so a 10 GB
input costs a few hundred bytes per line at most, never the line itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from retrieval.durable import fsync_dir
from serve.api.chat_completion.protocol import ChatCompletionRequest
from serve.api.chat_completion.serving import ChatServing
from serve.api.completion.protocol import CompletionRequest
from serve.api.completion.serving import CompletionServing
from serve.errors import APIError, invalid_request
from serve.progress import ProgressBar

log = logging.getLogger(__name__)

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
URLS = (CHAT_URL, COMPLETIONS_URL)


class BatchError(ValueError):
    """A problem with the job itself (not with one of its lines): bad shard, bad files."""


@dataclass(frozen=True)
class Shard:
    """`--shard I/N`: this process serves the lines whose key hashes to I modulo N.

    The key is the line's custom_id (its line number when it has none), so duplicates of
    a custom_id land in the same shard and are caught there, and the split does not
    depend on line order."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        index_text, sep, count_text = text.partition("/")
        try:
            index, count = int(index_text), int(count_text)
        except ValueError:
            raise BatchError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
        if not sep or count < 1 or not 0 <= index < count:
            raise BatchError(f"--shard {text!r}: need 0 <= I < N")
        return cls(index, count)

    def owns(self, key: str) -> bool:
        return self.count == 1 or zlib.crc32(_utf8(key)) % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass
class LineError:
    code: str
    message: str
    status_code: int = 400
    param: str | None = None
    type: str = "invalid_request_error"

    @classmethod
    def of(cls, error: APIError) -> LineError:
        return cls(error.code or "error", error.message, error.status_code, error.param, error.type)


@dataclass
class BatchLine:
    """One input line, parsed as far as it goes."""

    number: int
    custom_id: str | None = None
    url: str | None = None
    body: dict[str, Any] | None = None
    error: LineError | None = None

    @property
    def key(self) -> str:
        return self.custom_id if self.custom_id is not None else f"line:{self.number}"


def _utf8(text: str) -> bytes:
    # A custom_id may hold lone surrogates (JSON carries them as \udXXX escapes), which
    # strict UTF-8 refuses; "surrogatepass" gives every string bytes, and a valid one
    # exactly its UTF-8, so digests and shard assignment are unchanged for the rest.
    return text.encode("utf-8", "surrogatepass")


def read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, content) of every non-blank line, streamed."""
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            line = raw.strip()
            if line:
                yield number, line


def parse_line(number: int, raw: bytes) -> BatchLine:
    line = BatchLine(number)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        line.error = LineError("invalid_json", f"Line {number} is not valid JSON: {exc}")
        return line
    except RecursionError:
        line.error = LineError("invalid_json", f"Line {number} is nested too deeply.")
        return line
    if not isinstance(data, dict):
        line.error = LineError("invalid_json", f"Line {number} is not a JSON object.")
        return line
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        line.error = LineError(
            "missing_custom_id", "Every line needs a non-empty string custom_id.", param="custom_id"
        )
        return line
    line.custom_id = custom_id
    method = data.get("method", "POST")
    url = data.get("url")
    body = data.get("body")
    if method != "POST":
        line.error = LineError("invalid_method", "method must be POST.", param="method")
    elif url not in URLS:
        line.error = LineError(
            "invalid_url",
            f"url {url!r} is not supported; use {CHAT_URL} or {COMPLETIONS_URL}.",
            status_code=404,
            param="url",
        )
    elif not isinstance(body, dict):
        line.error = LineError("invalid_body", "body must be a JSON object.", param="body")
    else:
        line.url, line.body = url, body
    return line


def output_record(
    line: BatchLine, body: dict[str, Any] | None, error: LineError | None
) -> dict[str, Any]:
    if error is not None:
        status = error.status_code
        body = {
            "error": {
                "message": error.message,
                "type": error.type,
                "param": error.param,
                "code": error.code,
            }
        }
    else:
        status = 200
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": line.custom_id,
        "line": line.number,
        "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
        "error": None if error is None else {"code": error.code, "message": error.message},
    }


# -- the output file: an append-only log of finished lines -----------------------------------


def _digest(custom_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(_utf8(custom_id), digest_size=8).digest(), "little")


@dataclass
class OutputLog:
    path: Path
    done_lines: set[int] = field(default_factory=set)
    done_ids: set[int] = field(default_factory=set)
    repaired_bytes: int = 0
    _fh: Any = None

    @classmethod
    def open(cls, path: Path) -> OutputLog:
        """Open for appending, after reading what a previous run finished."""
        log_ = cls(path)
        if path.exists():
            log_._recover()
        path.parent.mkdir(parents=True, exist_ok=True)
        log_._fh = path.open("ab")
        return log_

    def _recover(self) -> None:
        good_end = 0
        with self.path.open("rb") as fh:
            for raw in fh:
                if not raw.endswith(b"\n"):
                    break  # Torn write: the process died inside this line.
                try:
                    record = json.loads(raw)
                    number = int(record["line"])
                except (ValueError, KeyError, TypeError):
                    break
                self.done_lines.add(number)
                if isinstance(record.get("custom_id"), str) and not _is_duplicate(record):
                    self.done_ids.add(_digest(record["custom_id"]))
                good_end += len(raw)
        size = self.path.stat().st_size
        if good_end < size:
            self.repaired_bytes = size - good_end
            log.warning(
                "%s: dropping %d bytes of an unfinished last line", self.path, self.repaired_bytes
            )
            with self.path.open("r+b") as fh:
                fh.truncate(good_end)
                os.fsync(fh.fileno())

    def write(self, record: dict[str, Any]) -> None:
        try:
            data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        except UnicodeEncodeError:
            # Lone surrogates (a custom_id from \udXXX escapes): keep them as escapes.
            data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        # One write of the whole line: a crash leaves at most one torn line, at the end.
        self._fh.write(data)
        self._fh.flush()
        self.done_lines.add(record["line"])

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None


def _is_duplicate(record: dict[str, Any]) -> bool:
    error = record.get("error")
    return isinstance(error, dict) and error.get("code") == "duplicate_custom_id"


def write_in_input_order(sources: Sequence[Path], out: Path) -> int:
    """Write the records of `sources` to `out` ordered by input line, each line once.

    Only (line, source, offset) triples are held in memory, not the records. `out` may be
    one of the sources: the result is written beside it and renamed into place."""
    index: dict[int, tuple[int, int]] = {}
    for s, source in enumerate(sources):
        offset = 0
        with source.open("rb") as fh:
            for raw in fh:
                if raw.endswith(b"\n"):
                    try:
                        number = int(json.loads(raw)["line"])
                    except (ValueError, KeyError, TypeError):
                        number = -1
                    if number >= 0:
                        index.setdefault(number, (s, offset))
                offset += len(raw)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    handles = [source.open("rb") for source in sources]
    try:
        with tmp.open("wb") as dst:
            for number in sorted(index):
                s, offset = index[number]
                handles[s].seek(offset)
                dst.write(handles[s].readline())
            dst.flush()
            os.fsync(dst.fileno())
    finally:
        for handle in handles:
            handle.close()
    os.replace(tmp, out)
    fsync_dir(out.parent)
    return len(index)


# -- running the job ---------------------------------------------------------------------------


@dataclass
class BatchSummary:
    shard: str
    lines: int = 0
    skipped_done: int = 0
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    errors_by_code: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "lines": self.lines,
            "skipped_already_done": self.skipped_done,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "errors_by_code": self.errors_by_code,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "seconds": round(self.seconds, 3),
            "completion_tokens_per_second": round(self.completion_tokens / self.seconds, 2)
            if self.seconds > 0
            else 0.0,
        }


def count_lines(path: Path, chunk: int = 1 << 20) -> int:
    """Newlines in `path` (plus a last line without one), read in chunks: the total the
    progress bar's ETA needs, without holding the file in memory."""
    count, last = 0, b"\n"
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


class BatchProgress:
    """Lines done of the batch (the total arrives later, from a thread counting the input's
    lines while the job runs: until then there is no ETA) and output tokens per second."""

    def __init__(self, enabled: bool) -> None:
        self.bar = ProgressBar("batch", "lines", enabled=enabled)
        self.tokens = 0

    def set_total(self, total: int) -> None:
        self.bar.set_total(total)

    def update(self, tokens: int) -> None:
        self.tokens += tokens
        elapsed = max(time.monotonic() - self.bar.started, 1e-9)
        self.bar.advance(postfix={"output tok/s": f"{self.tokens / elapsed:.1f}"})

    def close(self) -> None:
        self.bar.close()


class BatchRunner:
    """Serves batch lines through the same serving objects as the HTTP routes."""

    def __init__(
        self, chat: ChatServing, completion: CompletionServing, max_in_flight: int = 256
    ) -> None:
        if max_in_flight < 1:
            raise BatchError("--max-in-flight must be at least 1")
        self.chat = chat
        self.completion = completion
        self.max_in_flight = max_in_flight

    async def serve_line(self, line: BatchLine) -> tuple[dict[str, Any] | None, LineError | None]:
        """The response body (or the error) for one well-formed line."""
        assert line.body is not None
        model: type[ChatCompletionRequest] | type[CompletionRequest] = (
            ChatCompletionRequest if line.url == CHAT_URL else CompletionRequest
        )
        try:
            request = model.model_validate(line.body)
        except ValidationError as exc:
            return None, LineError.of(invalid_request(exc.errors()))
        if request.stream:
            return None, LineError(
                "unsupported_value", "stream is not supported in batch jobs.", param="stream"
            )
        try:
            result: BaseModel
            if isinstance(request, ChatCompletionRequest):
                prepared = await self.chat.prepare(request)
                result = await self.chat.complete(request, prepared, f"chatcmpl-{uuid.uuid4().hex}")
            else:
                prepared_list = await self.completion.prepare(request)
                result = await self.completion.complete(
                    request, prepared_list, f"cmpl-{uuid.uuid4().hex}"
                )
        except APIError as exc:
            if exc.status_code >= 500:
                # The engine is gone or shutting down: stop the job with this line
                # unwritten, so that a rerun serves it, rather than record a failure.
                raise
            return None, LineError.of(exc)
        return result.model_dump(mode="json"), None

    async def run(
        self,
        input_path: Path,
        output_path: Path,
        shard: Shard = Shard(),
        progress: bool = True,
    ) -> BatchSummary:
        if input_path.resolve() == output_path.resolve():
            raise BatchError("INPUT and OUTPUT must be different files")
        started = time.monotonic()
        summary = BatchSummary(shard=str(shard))
        out = OutputLog.open(output_path)
        if out.done_lines:
            log.info("Resuming: %d lines of %s were already done", len(out.done_lines), output_path)
        bar = BatchProgress(progress)
        # Counted beside the job (a 10 GB input takes seconds); a shard owns about 1/N of
        # the lines (custom_ids hash uniformly), less those a previous run finished.
        done_before = len(out.done_lines)
        counting = asyncio.get_running_loop().run_in_executor(None, count_lines, input_path)
        counting.add_done_callback(
            lambda f: (
                None
                if f.cancelled() or f.exception() is not None
                else bar.set_total(max(f.result() // shard.count - done_before, 0))
            )
        )
        seen: set[int] = set()
        slots = asyncio.Semaphore(self.max_in_flight)
        tasks: set[asyncio.Task[None]] = set()
        interrupted = False

        def finish(line: BatchLine, body: dict[str, Any] | None, error: LineError | None) -> None:
            out.write(output_record(line, body, error))
            if error is None:
                summary.succeeded += 1
                usage = (body or {}).get("usage") or {}
                summary.prompt_tokens += int(usage.get("prompt_tokens", 0))
                summary.completion_tokens += int(usage.get("completion_tokens", 0))
                bar.update(int(usage.get("completion_tokens", 0)))
            else:
                summary.failed += 1
                summary.errors_by_code[error.code] = summary.errors_by_code.get(error.code, 0) + 1
                bar.update(0)

        fatal: list[BaseException] = []

        async def serve(line: BatchLine) -> None:
            try:
                body, error = await self.serve_line(line)
                finish(line, body, error)
            except Exception as exc:
                fatal.append(exc)
                raise
            finally:
                slots.release()

        try:
            for number, raw in read_lines(input_path):
                line = parse_line(number, raw)
                if not shard.owns(line.key):
                    continue
                summary.lines += 1
                if line.custom_id is not None:
                    digest = _digest(line.custom_id)
                    if digest in seen:
                        line.error = LineError(
                            "duplicate_custom_id",
                            f"custom_id {line.custom_id!r} was already used by an earlier line.",
                            param="custom_id",
                        )
                    seen.add(digest)
                if number in out.done_lines:
                    summary.skipped_done += 1
                    continue
                if (
                    line.error is None
                    and line.custom_id is not None
                    and _digest(line.custom_id) in out.done_ids
                ):
                    # Written by an earlier run from another line number: the input
                    # changed; the output keeps its one line for this custom_id.
                    summary.skipped_done += 1
                    continue
                if line.error is not None:
                    finish(line, None, line.error)
                    continue
                await slots.acquire()
                if fatal:
                    slots.release()
                    break
                task = asyncio.create_task(serve(line))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
            if fatal:
                raise fatal[0]
        except BaseException:
            interrupted = True
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            bar.close()
            out.close()
            summary.seconds = time.monotonic() - started
            if not interrupted:
                write_in_input_order([output_path], output_path)
        return summary


def merge_outputs(
    out: Path, shards: Sequence[Path], input_path: Path | None = None
) -> dict[str, Any]:
    """Join shard outputs into one file in input order; with the input, check that every
    input line has exactly one output line."""
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise BatchError(f"missing shard output(s): {', '.join(missing)}")
    if out.resolve() in {p.resolve() for p in shards}:
        raise BatchError("--out must not be one of the shard files")
    written = write_in_input_order(shards, out)
    report: dict[str, Any] = {"out": str(out), "lines": written}
    if input_path is not None:
        expected = {number for number, _ in read_lines(input_path)}
        got: set[int] = set()
        with out.open("rb") as fh:
            for raw in fh:
                got.add(int(json.loads(raw)["line"]))
        absent = sorted(expected - got)
        if absent:
            shown = ", ".join(map(str, absent[:10]))
            raise BatchError(
                f"{len(absent)} input line(s) have no output (lines {shown}"
                f"{', ...' if len(absent) > 10 else ''}); rerun the shards that wrote them"
            )
        report["input_lines"] = len(expected)
    return report
