"""scripts/random_model.py: a folder shaped like a model (config, tokenizer) carries to a
machine without the model file, and there becomes a loadable checkpoint of that shape."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests import engine_fixtures as F

pytest.importorskip("torch")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "random_model.py"


def load_script():
    spec = importlib.util.spec_from_file_location("random_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_shape_then_weights(tmp_path):
    from checkpoints import open_checkpoint

    script = load_script()
    like, shape, full = F.tiny_model_dir(), tmp_path / "shape", tmp_path / "random"
    script.write_shape(str(like), shape)
    assert not list(shape.glob("*.safetensors"))  # only the small files travel
    assert json.loads((shape / "config.json").read_text()) == json.loads(
        (like / "config.json").read_text()
    )
    script.write_shape(str(shape), full)
    script.write_weights(full, seed=1)
    ours, theirs = open_checkpoint(full), open_checkpoint(like)
    assert ours.shapes == theirs.shapes
    name = "model.layers.0.mlp.up_proj.weight"
    assert ours.tensor(name).std() > 0
    assert not (ours.tensor(name) == theirs.tensor(name)).all()  # new random weights
    assert (full / "tokenizer.json").read_bytes() == (like / "tokenizer.json").read_bytes()
