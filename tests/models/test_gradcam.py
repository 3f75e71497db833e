"""Grad-CAM (models/gradcam.py): the layer it explains at each input size, agreement with a
textbook hook-based implementation on the unfolded model, and no side effects on the model."""

from __future__ import annotations

import pytest
import torch

from models import ImageEncoderConfig, ImageQuestions, Predictor, QuestionEncoderConfig, VQAConfig, VQAModel
from models.gradcam import METHODS, block_grid_sides, cam_layer, grad_cam
from models.question import pad_questions
from models.transforms import normalize
from tests.conftest import QUESTIONS, tiny_config


def _model(image_size: int, width: float, batch_norm: bool, pool: int, depth: int = 16,
           learned_image_scale: bool = True) -> VQAModel:
    cfg = VQAConfig(
        image=ImageEncoderConfig(image_size=image_size, width=width, batch_norm=batch_norm, pool_size=pool,
                                 embed_size=16, dropout=0.0, depth=depth),
        question=QuestionEncoderConfig(vocab_size=12, word_dim=8, hidden_size=8, num_layers=1, embed_size=16),
        num_answers=5, head_hidden=16, dropout=0.0, learned_image_scale=learned_image_scale)
    return VQAModel(cfg).eval()


def test_block_grid_sides():
    assert block_grid_sides(64) == [64, 32, 16, 8, 4]
    assert block_grid_sides(224) == [224, 112, 56, 28, 14]


@pytest.mark.parametrize("size,batch_norm,block,grid", [
    (64, True, 4, 8),  # the shipped model: block 5 would be 4x4
    (224, False, 5, 14),  # full-size VGG16: the last convolutional block
    (32, True, 3, 8),
])
def test_layer_is_the_deepest_block_with_an_8x8_grid(size, batch_norm, block, grid):
    model = _model(size, 1 / 16, batch_norm, 1)
    layer = cam_layer(model)
    assert (layer.block, layer.grid) == (block, grid)
    # The cut is the max-pool ending that block, whatever layers (BatchNorm or not) precede it.
    assert isinstance(model.image_encoder.backbone.features[layer.cut], torch.nn.MaxPool2d)
    with torch.no_grad():
        maps = model.image_encoder.backbone.features[: layer.cut](torch.zeros(1, 3, size, size))
    assert maps.shape[-2:] == (grid, grid)


def _reference_cam(model: VQAModel, x, ids, lengths, block: int, method: str) -> tuple[torch.Tensor, int]:
    """Grad-CAM the textbook way: a forward hook keeps the block's last ReLU output, the whole
    model runs forward, the top answer's log-probability is back-propagated with ``.backward()``."""
    feats = model.image_encoder.backbone.features
    pools = [i for i, m in enumerate(feats) if isinstance(m, torch.nn.MaxPool2d)]
    kept = {}

    def hook(_m, _inp, out):
        out.retain_grad()
        kept["a"] = out

    handle = feats[pools[block - 1] - 1].register_forward_hook(hook)
    try:
        logits = model(x, ids, lengths)
        target = int(logits[0].argmax())
        torch.log_softmax(logits[0].double(), dim=0)[target].backward()
    finally:
        handle.remove()
    a, g = kept["a"], kept["a"].grad
    w = g.mean(dim=(2, 3), keepdim=True) if method == "grad-cam" else g
    cam = torch.relu((w * a).sum(1))[0].detach()
    return cam / cam.max() if cam.max() > 0 else cam, target


@pytest.mark.parametrize("method", METHODS)
def test_predictor_explain_matches_the_textbook_computation_on_the_unfolded_model(tiny_checkpoint, method):
    # ReLUs in place (torchvision's VGG) would break the hook's retain_grad on the original:
    # rebuild the reference with out-of-place ReLUs, same weights.
    ref = tiny_checkpoint.model
    for m in ref.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    p = Predictor(tiny_checkpoint, device="cpu")  # BatchNorm folded, channels_last
    torch.manual_seed(3)
    checked = 0
    for question in QUESTIONS:
        pixels = (torch.rand(3, p.image_size, p.image_size) * 255).to(torch.uint8)
        q = p.encode_question(question)
        got = p.explain(pixels, q, method=method)
        xn = normalize(pixels[None], ref.cfg.image.mean, ref.cfg.image.std)
        ids, lengths = pad_questions([q])
        want, target = _reference_cam(ref, xn, ids, lengths, got.layer.block, method)
        assert got.answer_index == target
        assert got.heatmap.shape == want.shape == (got.layer.grid, got.layer.grid)
        torch.testing.assert_close(got.heatmap, want, atol=2e-4, rtol=1e-3)
        checked += bool(want.max() > 0)
    assert checked  # at least one non-trivial heatmap was compared


def test_explain_leaves_the_model_as_it_was(tiny_checkpoint):
    p = Predictor(tiny_checkpoint, device="cpu")
    pixels = (torch.rand(3, p.image_size, p.image_size) * 255).to(torch.uint8)
    q = p.encode_question(QUESTIONS[0])
    before = p.run([ImageQuestions([q], pixels=pixels)])[0].probs
    with torch.inference_mode():  # as if called from inside an inference context
        cam = p.explain(pixels, q)
    assert all(param.grad is None for param in p.model.parameters())
    assert not p.model.training
    assert 0 <= float(cam.heatmap.min()) and float(cam.heatmap.max()) <= 1
    torch.testing.assert_close(cam.probs, before[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(p.run([ImageQuestions([q], pixels=pixels)])[0].probs, before)


def test_contrastive_score_has_the_log_probability_gradient_direction():
    from models.gradcam import _contrastive_score

    z = torch.tensor([2.0, -1.0, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    (g_ours,) = torch.autograd.grad(_contrastive_score(z, 3), z)
    (g_ref,) = torch.autograd.grad(torch.log_softmax(z, 0)[3], z)
    torch.testing.assert_close(g_ours * g_ref[3] / g_ours[3], g_ref)  # same up to a positive factor
    sure = torch.tensor([0.0, 0.0, 40.0], requires_grad=True)  # p_t = 1 in float32
    (g,) = torch.autograd.grad(_contrastive_score(sure, 2), sure)
    assert g[2] == 1 and g[:2].sum() == -1


def test_grad_cam_refuses_batches_and_training_mode():
    model = VQAModel(tiny_config(10))
    x = torch.zeros(2, 3, 32, 32)
    ids, lengths = torch.ones(1, 2, dtype=torch.long), torch.tensor([2])
    with pytest.raises(ValueError):
        grad_cam(model.eval(), x, ids, lengths)
    with pytest.raises(ValueError):
        grad_cam(model.train(), x[:1], ids, lengths)
    with pytest.raises(ValueError):
        grad_cam(model.eval(), x[:1], ids, lengths, method="nope")


@pytest.mark.parametrize("depth,learned_image_scale", [(16, False), (11, True), (19, False)])
def test_other_vgg_depths_and_no_image_scale_match_the_textbook_computation(depth, learned_image_scale):
    """The layouts vqa-train --vgg-depth and vqa-import build (#11): the heatmap's own forward pass
    is the model's (same answer, same probabilities) and agrees with the hook-based reference."""
    torch.manual_seed(depth)
    model = _model(64, 1 / 8, True, 2, depth=depth, learned_image_scale=learned_image_scale)
    for m in model.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    x = torch.randn(1, 3, 64, 64)
    ids, lengths = torch.tensor([[2, 3, 4]]), torch.tensor([3])
    for method in METHODS:
        got = grad_cam(model, x, ids, lengths, method=method)
        with torch.no_grad():
            torch.testing.assert_close(got.probs, torch.softmax(model(x, ids, lengths)[0], 0), atol=1e-5, rtol=0)
        want, target = _reference_cam(model, x, ids, lengths, got.layer.block, method)
        model.zero_grad(set_to_none=True)
        assert (got.layer.block, got.answer_index) == (4, target)
        assert got.layer.name.startswith(f"VGG{depth} block 4: conv4_{ {11: 2, 16: 3, 19: 4}[depth]} ")
        torch.testing.assert_close(got.heatmap, want, atol=2e-4, rtol=1e-3)


@pytest.mark.slow
def test_full_size_vgg16_explains_on_its_last_block_at_14x14():
    """torchvision's full VGG16 layout (width 1, no BatchNorm, 7x7 pool) at 224x224, random weights."""
    torch.manual_seed(0)
    model = _model(224, 1.0, False, 7)
    x = torch.randn(1, 3, 224, 224)
    ids, lengths = torch.tensor([[2, 3, 4]]), torch.tensor([3])
    cam = grad_cam(model, x, ids, lengths)
    assert cam.layer.block == 5 and cam.heatmap.shape == (14, 14)
    assert 0 <= float(cam.heatmap.min()) and float(cam.heatmap.max()) <= 1
    assert all(p.grad is None for p in model.parameters())
