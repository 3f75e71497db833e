"""Checkpoint round trip and every way loading can fail (each error names the file)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models import CheckpointError, load_checkpoint, save_checkpoint
from tests.conftest import make_tiny_checkpoint


def test_round_trip_is_exact(tmp_path: Path, tiny_checkpoint):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_checkpoint)
    loaded = load_checkpoint(path)
    assert loaded.name == "tiny-test"
    assert loaded.vocab.words == tiny_checkpoint.vocab.words
    assert loaded.answers.answers == tiny_checkpoint.answers.answers
    assert loaded.info == {"note": "random weights for tests"}
    assert loaded.model.cfg == tiny_checkpoint.model.cfg
    for k, v in tiny_checkpoint.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    assert not loaded.model.training


def test_file_is_not_a_pickle(tmp_path: Path, tiny_checkpoint):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_checkpoint)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert header["__metadata__"]["vqa_serve_format"] == "2"


def test_missing_file(tmp_path: Path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_garbage_file(tmp_path: Path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"this is not a safetensors file at all" * 10)
    with pytest.raises(CheckpointError, match="garbage.safetensors: not a readable safetensors file"):
        load_checkpoint(path)


def test_truncated_file(tmp_path: Path, tiny_checkpoint):
    path = tmp_path / "cut.safetensors"
    save_checkpoint(path, tiny_checkpoint)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_checkpoint(path)


def test_foreign_safetensors_file(tmp_path: Path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="foreign.safetensors: not a vqa-serve checkpoint"):
        load_checkpoint(path)


def _rewrite(path: Path, tensors=None, **meta_changes):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(meta_changes)
    save_file(tensors if tensors is not None else load_file(str(path)), str(path), metadata=meta)


def test_mismatched_tensors(tmp_path: Path, tiny_checkpoint):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_checkpoint)
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    tensors["head.5.weight"] = torch.zeros(3, 3)
    _rewrite(path, tensors)
    with pytest.raises(CheckpointError, match=r"m.safetensors: tensor 'head.5.weight' has shape \(3, 3\)"):
        load_checkpoint(path)
    del tensors["head.5.weight"]
    _rewrite(path, tensors)
    with pytest.raises(CheckpointError, match="missing: \\['head.5.weight'\\]"):
        load_checkpoint(path)


def test_vocab_size_mismatch(tmp_path: Path, tiny_checkpoint):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_checkpoint)
    _rewrite(path, answers=json.dumps(["yes", "no"]))
    with pytest.raises(CheckpointError, match="answer vocabulary has 2 answers, config says 7"):
        load_checkpoint(path)


def test_invalid_metadata(tmp_path: Path, tiny_checkpoint):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_checkpoint)
    _rewrite(path, config="{not json")
    with pytest.raises(CheckpointError, match="m.safetensors: invalid metadata"):
        load_checkpoint(path)


def test_nan_weights_refused(tmp_path: Path):
    ckpt = make_tiny_checkpoint()
    with torch.no_grad():
        ckpt.model.head[2].weight[0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_checkpoint(path, ckpt)
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(path)
