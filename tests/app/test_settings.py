"""Settings from the environment, and the start-up choices derived from them."""

from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from app.backends.local import warmup_sizes
from app.settings import DEFAULT_WEIGHTS, Settings
from tests.app.conftest import make_settings
from tests.conftest import REPO


def test_defaults_serve_the_shipped_weights(monkeypatch):
    for k in list(__import__("os").environ):
        if k.startswith("VQA_"):
            monkeypatch.delenv(k)
    s = Settings()
    assert s.weights == DEFAULT_WEIGHTS == REPO / "weights" / "easy-vqa.safetensors"
    assert s.device == "auto" and s.host == "127.0.0.1" and s.cors_origins == []


def test_environment_variables(monkeypatch):
    monkeypatch.setenv("VQA_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("VQA_DEVICE", "CUDA:1")
    monkeypatch.setenv("VQA_WARMUP_BATCH_SIZES", "1, 4,8")
    monkeypatch.setenv("VQA_CORS_ORIGINS", "https://a.example, https://b.example")
    s = Settings()
    assert s.max_batch_size == 7 and s.device == "cuda:1"
    assert s.warmup_batch_sizes == [1, 4, 8]
    assert s.cors_origins == ["https://a.example", "https://b.example"]


@pytest.mark.parametrize("var,value", [("VQA_DEVICE", "tpu"), ("VQA_MAX_BATCH_SIZE", "0"),
                                       ("VQA_MAX_QUEUE", "-1"), ("VQA_LOG_LEVEL", "loud"),
                                       ("VQA_REQUEST_TIMEOUT_S", "0")])
def test_invalid_values_are_refused_at_start(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError):
        Settings()


def test_every_setting_is_documented_in_the_readme():
    readme = (REPO / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"VQA_{name.upper()}" in readme, name


def test_warmup_sizes():
    """On CUDA the warmed sizes are the sizes image batches are padded to: max_batch_size is
    always one of them, so no live batch meets an un-warmed shape."""
    cuda = SimpleNamespace(device=torch.device("cuda"))
    cpu = SimpleNamespace(device=torch.device("cpu"))
    assert warmup_sizes(make_settings(max_batch_size=24, warmup_batch_sizes=[]), cuda.device) \
        == [1, 2, 3, 4, 6, 8, 12, 16, 24]
    assert warmup_sizes(make_settings(warmup_batch_sizes=[]), cuda.device) \
        == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    assert warmup_sizes(make_settings(warmup_batch_sizes=[]), cpu.device) == [1]
    assert warmup_sizes(make_settings(warmup_batch_sizes=[3]), cuda.device) == [3, 32]
    assert warmup_sizes(make_settings(warmup_batch_sizes=[3, 64]), cpu.device) == [3, 32]
