"""The process environment `crosstask` sets before anything imports vLLM or torch."""

from __future__ import annotations

import os

import pytest

from serve.cli import main as cli


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A copy of the environment for the test to change; the real one is left alone."""
    copy = dict(os.environ)
    monkeypatch.setattr(os, "environ", copy)
    return copy


@pytest.mark.parametrize("name", ["ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"])
def test_primitive_caches_are_bounded_unless_the_environment_says_otherwise(
    environ: dict[str, str], name: str
) -> None:
    environ.pop(name, None)
    cli.process_environment()
    assert environ[name] == str(cli.PRIMITIVE_CACHE_CAPACITY)
    assert cli.PRIMITIVE_CACHE_CAPACITY < 1024  # oneDNN's and torch's own default

    environ[name] = "7"
    cli.process_environment()
    assert environ[name] == "7"


def test_nothing_comes_from_a_model_hub(environ: dict[str, str]) -> None:
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_NO_USAGE_STATS"):
        environ.pop(name, None)
    cli.process_environment()
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_NO_USAGE_STATS"):
        assert environ[name] == "1"


def test_a_bad_heap_trim_interval_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Checked before any command runs: vLLM's processes would each die with a traceback.
    monkeypatch.setenv("CROSSTASK_HEAP_TRIM_SECONDS", "often")
    assert cli.main(["store", "search", "--store", "/nonexistent", "a query"]) == 2
    err = capsys.readouterr().err
    assert "CROSSTASK_HEAP_TRIM_SECONDS" in err
    assert "Traceback" not in err
