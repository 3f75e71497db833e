"""tbmoon/basic_vqa's model, tokenizer and preprocessing, written here from their description
(issue #11; its models.py, utils/text_helper.py, data_loader.py, resize_images.py), as the
reference the imported model must reproduce. Nothing of vqa-serve is used in this file.

* ImgEncoder: a torchvision VGG whose classifier loses its last layer, ``fc`` to embed_size,
  divided by its L2 norm.
* QstEncoder: ``word2vec`` embedding, tanh, ``lstm`` fed sequence-first (not batch_first) with
  the whole fixed-length padded question, concat (hidden, cell), transpose, reshape, tanh, ``fc``.
* VqaModel: product, tanh, dropout, ``fc1`` (embed -> answers), tanh, dropout, ``fc2``.
* Tokenizer: ``re.split(r"(\\W+)")`` of the lower-cased text, pieces stripped, empty dropped;
  unknown words -> ``<unk>``; padded with ``<pad>`` to max_qst_length (30).
* Images: resized to 224x224 with LANCZOS, RGB, ToTensor, ImageNet Normalize.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch import nn
from torchvision.models.vgg import cfgs, make_layers


class ImgEncoder(nn.Module):
    def __init__(self, embed_size: int, vgg: nn.Module) -> None:
        super().__init__()
        in_features = vgg.classifier[-1].in_features
        vgg.classifier = nn.Sequential(*list(vgg.classifier.children())[:-1])
        self.model = vgg
        self.fc = nn.Linear(in_features, embed_size)

    def forward(self, image):
        with torch.no_grad():
            f = self.model(image)
        return self.project(f)

    def project(self, vgg_feature):
        f = self.fc(vgg_feature)
        return f.div(f.norm(p=2, dim=1, keepdim=True).detach())


class QstEncoder(nn.Module):
    def __init__(self, qst_vocab_size, word_embed_size, embed_size, num_layers, hidden_size):
        super().__init__()
        self.word2vec = nn.Embedding(qst_vocab_size, word_embed_size)
        self.tanh = nn.Tanh()
        self.lstm = nn.LSTM(word_embed_size, hidden_size, num_layers)
        self.fc = nn.Linear(2 * num_layers * hidden_size, embed_size)

    def forward(self, question):
        return self.fc(self.state(question))

    def state(self, question):
        x = self.tanh(self.word2vec(question)).transpose(0, 1)  # [T, B, word]
        _, (hidden, cell) = self.lstm(x)
        f = torch.cat((hidden, cell), 2).transpose(0, 1)
        f = f.reshape(f.size()[0], -1)
        return self.tanh(f)


class VqaModel(nn.Module):
    def __init__(self, embed_size, qst_vocab_size, ans_vocab_size, word_embed_size, num_layers,
                 hidden_size, vgg: nn.Module):
        super().__init__()
        self.img_encoder = ImgEncoder(embed_size, vgg)
        self.qst_encoder = QstEncoder(qst_vocab_size, word_embed_size, embed_size, num_layers, hidden_size)
        self.tanh = nn.Tanh()
        self.dropout = nn.Dropout(0.5)
        self.fc1 = nn.Linear(embed_size, ans_vocab_size)
        self.fc2 = nn.Linear(ans_vocab_size, ans_vocab_size)

    def forward(self, img, qst):
        return self.combine(self.img_encoder(img), self.qst_encoder(qst))

    def combine(self, img_feature, qst_feature):
        x = torch.mul(img_feature, qst_feature)
        x = self.fc1(self.dropout(self.tanh(x)))
        return self.fc2(self.dropout(self.tanh(x)))


class NarrowVGG(nn.Module):
    """torchvision's VGG module layout (features / avgpool / classifier of 7 layers) at a
    fraction of the width, for fast tests of the same state-dict names."""

    def __init__(self, cfg_name: str = "D", width: float = 1 / 16, pool: int = 1) -> None:
        super().__init__()
        cfg = [v if v == "M" else round(v * width) for v in cfgs[cfg_name]]
        self.features = make_layers(cfg)
        self.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
        hidden = round(4096 * width)
        self.classifier = nn.Sequential(
            nn.Linear(cfg[-2] * pool * pool, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(), nn.Linear(hidden, 1000))

        init_like_torchvision(self)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def full_vgg(depth: int) -> nn.Module:
    """torchvision's own vgg16/vgg19 with random weights (initialised on the meta device and
    filled once: torchvision's init is the same distribution but runs every layer's default
    init first)."""
    with torch.device("meta"):
        vgg = {16: torchvision.models.vgg16, 19: torchvision.models.vgg19}[depth](weights=None)
    vgg.to_empty(device="cpu")
    return init_like_torchvision(vgg)


def init_like_torchvision(vgg: nn.Module) -> nn.Module:
    for m in vgg.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return vgg


@torch.no_grad()
def make_answers_depend_on_inputs(model: VqaModel, vgg_features: torch.Tensor,
                                  questions: torch.Tensor) -> VqaModel:
    """Random weights give nearly the same answer to everything: VGG features share one
    direction, and so do question states. Biases that centre both projections on the test's
    own inputs (``vgg_features`` [N, 4096], ``questions`` [M, 30] ids), a forget-gate bias that
    keeps the question in the LSTM's cell over the trailing <pad> steps, and larger head
    weights make the answers vary with the image and the question, and peaked. The model
    stays basic_vqa's: only its weights are chosen."""
    h = model.qst_encoder.lstm.hidden_size
    for name, b in model.qst_encoder.lstm.named_parameters():
        if name.startswith("bias_ih"):
            b[h : 2 * h] = 4.0  # gates are (input, forget, cell, output)
    fc = model.img_encoder.fc
    fc.bias.copy_(-(vgg_features @ fc.weight.T).mean(0))
    qfc = model.qst_encoder.fc
    qfc.bias.copy_(-(model.qst_encoder.state(questions) @ qfc.weight.T).mean(0))
    qfc.weight.mul_(4)
    qfc.bias.mul_(4)
    model.fc1.weight.mul_(40)
    model.fc2.weight.mul_(3)
    return model


SPLIT = re.compile(r"(\W+)")


def tokenize(sentence: str) -> list[str]:
    return [t.strip() for t in SPLIT.split(sentence.lower()) if len(t.strip()) > 0]


class Vocab:
    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}
        self.unk = self.index["<unk>"]

    def encode(self, sentence: str, max_qst_length: int = 30) -> list[int]:
        ids = [self.index["<pad>"]] * max_qst_length
        toks = tokenize(sentence)
        ids[: len(toks)] = [self.index.get(w, self.unk) for w in toks]
        return ids


PREPROCESS = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


def preprocess(image_bytes: bytes, size: int = 224) -> torch.Tensor:
    img = Image.open(io.BytesIO(image_bytes))
    img = img.resize((size, size), Image.LANCZOS)  # resize_images.py (ANTIALIAS = LANCZOS)
    return PREPROCESS(img.convert("RGB"))  # data_loader.py


def save_like_train_py(model: VqaModel, path: Path, epoch: int = 7) -> None:
    torch.save({"epoch": epoch, "state_dict": model.state_dict()}, path)


def write_vocab(path: Path, words: list[str]) -> None:
    path.write_text("".join(w + "\n" for w in words))
