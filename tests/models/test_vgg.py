"""The image encoder at both sizes; the full-size one must be torchvision's vgg16 exactly."""

import os
from pathlib import Path

import pytest
import torch
import torchvision

from models import ImageEncoder, ImageEncoderConfig

FULL = ImageEncoderConfig(image_size=224, width=1.0, batch_norm=False, pool_size=7, embed_size=1024)


@pytest.fixture(scope="module")
def torchvision_vgg16():
    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None).eval()


@pytest.fixture(scope="module")
def full_encoder():
    return ImageEncoder(FULL).eval()


def test_full_size_backbone_is_torchvision_vgg16(torchvision_vgg16, full_encoder):
    tv_sd = torchvision_vgg16.state_dict()
    ours = full_encoder.backbone.state_dict()
    # Same names and shapes for everything but the dropped 4096->1000 layer.
    assert set(tv_sd) - set(ours) == {"classifier.6.weight", "classifier.6.bias"}
    assert set(ours) <= set(tv_sd)
    full_encoder.load_torchvision_state_dict(tv_sd)  # strict inside
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = torchvision_vgg16.classifier[:-1](torch.flatten(
            torchvision_vgg16.avgpool(torchvision_vgg16.features(x)), 1))
        got = full_encoder.backbone(x)
        assert got.shape == (2, 4096)
        torch.testing.assert_close(got, expected)
        emb = full_encoder(x)
    assert emb.shape == (2, 1024)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))


def test_torchvision_weights_file_loads_without_pickle(tmp_path: Path, torchvision_vgg16, full_encoder):
    path = tmp_path / "vgg16-custom.pth"
    torch.save(torchvision_vgg16.state_dict(), path)
    full_encoder.load_torchvision_weights_file(path)
    w = full_encoder.backbone.features[0].weight
    torch.testing.assert_close(w, torchvision_vgg16.features[0].weight)


def test_weights_file_with_code_is_refused(tmp_path: Path, full_encoder):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        full_encoder.load_torchvision_weights_file(path)


def test_mismatched_state_dict_is_refused(full_encoder):
    sd = torchvision.models.vgg11(weights=None).state_dict()
    with pytest.raises(RuntimeError):
        full_encoder.load_torchvision_state_dict(sd)


@pytest.mark.skipif(not os.environ.get("VQA_VGG16_IMAGENET_WEIGHTS"),
                    reason="set VQA_VGG16_IMAGENET_WEIGHTS to a local vgg16-397923af.pth (never downloaded)")
def test_real_imagenet_weights_initialise_the_encoder(full_encoder):
    """The real file (torchvision names it by the first 8 hex digits of its SHA-256) loads into
    the backbone tensor for tensor; a random initialisation or a loader that skipped a tensor
    fails here (the check used to be "the first layer is not all zeros", true of any init)."""
    import hashlib

    path = Path(os.environ["VQA_VGG16_IMAGENET_WEIGHTS"])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest.startswith("397923af"), f"{path} is not torchvision's vgg16-397923af.pth ({digest[:8]})"
    full_encoder.load_torchvision_weights_file(path)
    file = torch.load(path, map_location="cpu", weights_only=True)
    ours = full_encoder.backbone.state_dict()
    assert set(ours) == {k for k in file if not k.startswith("classifier.6.")}
    for name, tensor in ours.items():
        assert torch.equal(tensor, file[name]), name


@pytest.mark.parametrize("size,width,pool,bn", [(64, 0.25, 2, True), (32, 1 / 16, 1, False), (96, 0.5, 3, True)])
def test_compact_encoder_shapes(size, width, pool, bn):
    cfg = ImageEncoderConfig(image_size=size, width=width, batch_norm=bn, pool_size=pool, embed_size=32)
    enc = ImageEncoder(cfg).eval()
    assert enc.backbone.features[0].out_channels == round(64 * width)
    with torch.no_grad():
        out = enc(torch.randn(3, 3, size, size))
    assert out.shape == (3, 32)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_config_round_trip_and_validation():
    cfg = ImageEncoderConfig(image_size=64, width=0.25, batch_norm=True, pool_size=2, embed_size=8)
    assert ImageEncoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        ImageEncoderConfig(image_size=16)
    with pytest.raises(ValueError):
        ImageEncoderConfig(width=0)
