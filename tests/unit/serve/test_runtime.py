"""Which adapter library a server or batch job serves: the shipped one by default, another
folder by --adapters, none with --no-adapters (LoRA then off in the engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from routing.service import default_library
from serve.cli.common import SERVE_FIELDS, settings_from_args
from serve.cli.main import build_parser
from serve.errors import StartupError
from serve.runtime import adapters_dir


def _parsed(monkeypatch: pytest.MonkeyPatch, *argv: str):  # type: ignore[no-untyped-def]
    for name in ("CROSSTASK_ADAPTERS", "CROSSTASK_ADAPTERS_ENABLED"):
        monkeypatch.delenv(name, raising=False)
    return settings_from_args(build_parser().parse_args(["serve", *argv]), SERVE_FIELDS)


def test_the_shipped_library_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert adapters_dir(_parsed(monkeypatch)) == default_library()


def test_another_folder_or_none(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert adapters_dir(_parsed(monkeypatch, "--adapters", str(tmp_path))) == tmp_path.resolve()
    assert adapters_dir(_parsed(monkeypatch, "--no-adapters")) is None
    monkeypatch.setenv("CROSSTASK_ADAPTERS_ENABLED", "false")
    settings = settings_from_args(build_parser().parse_args(["serve"]), SERVE_FIELDS)
    assert adapters_dir(settings) is None
    with pytest.raises(StartupError, match="no such folder"):
        adapters_dir(_parsed(monkeypatch, "--adapters", str(tmp_path / "missing")))


def test_merges_go_where_the_user_can_write(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from serve import runtime

    settings = _parsed(monkeypatch, "--home", str(tmp_path / "home"))
    assert runtime.merge_dir(settings) == tmp_path / "home" / "merges"
    # An image's CROSSTASK_HOME under a read-only root: the temporary folder instead.
    monkeypatch.setattr(runtime.os, "access", lambda path, mode: False)
    fallback = runtime.merge_dir(settings)
    assert fallback.parent == Path(runtime.tempfile.gettempdir())


def test_a_store_the_user_cannot_write_is_served_read_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from serve import runtime

    folder = tmp_path / "store"
    folder.mkdir()
    opened: dict[str, object] = {}

    class Opened:
        publisher = follower = None
        store = type("S", (), {"path": folder, "count": lambda self: 0, "index_kind": "flat"})()

    def open_replica(folder: Path, embedder: object, **kwargs: object) -> Opened:
        opened.update(kwargs)
        return Opened()

    monkeypatch.setattr(runtime, "open_replica", open_replica)
    settings = _parsed(monkeypatch, "--store", str(folder))
    runtime.retriever_opener(settings)()
    assert opened["read_only"] is False
    monkeypatch.setattr(runtime.os, "access", lambda path, mode: False)
    runtime.retriever_opener(settings)()
    assert opened["read_only"] is True
