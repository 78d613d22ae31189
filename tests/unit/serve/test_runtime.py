"""Which adapter library a server or batch job serves: the shipped one by default, another
folder by --adapters, none with --no-adapters (LoRA then off in the engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from routing.service import default_library
from serve.cli.common import SERVE_FIELDS, settings_from_args
from serve.cli.main import build_parser
from serve.runtime import StartupError, adapters_dir


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
