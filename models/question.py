"""LSTM question encoder: embedding -> tanh -> LSTM -> concat final (h, c) -> tanh -> linear.

How a batch of questions reaches the LSTM is part of the model: ``padding="packed"`` (this
project's) packs the sequences so the LSTM never reads padding; ``padding="fixed"`` pads every
question with ``<pad>`` to ``max_tokens`` and runs the LSTM over all of it, unpacked, for
models trained that way (the final state then depends on the padding, as it did in training).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from .vocab import PAD_ID, EncodedQuestion, TokenizerConfig

PADDINGS = ("packed", "fixed")


@dataclass(frozen=True)
class QuestionEncoderConfig:
    vocab_size: int
    word_dim: int = 300
    hidden_size: int = 512
    num_layers: int = 2
    embed_size: int = 1024
    max_tokens: int = 32  # longer questions are cut; the service rejects them earlier
    padding: str = "packed"  # or "fixed": pad to max_tokens, LSTM unpacked (see module doc)
    tokenizer: TokenizerConfig = TokenizerConfig()

    def __post_init__(self) -> None:
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be positive")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuestionEncoderConfig":
        d = dict(d)
        if "tokenizer" in d:
            d["tokenizer"] = TokenizerConfig.from_dict(d["tokenizer"])
        return cls(**d)


def pad_questions(questions: Sequence[EncodedQuestion], pin_memory: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded questions -> ([B, T] right-padded ids, [B] lengths), the encoder's input.
    ``pin_memory``: build the ids in pinned host memory (for a non-blocking copy to a GPU)."""
    if any(len(q) == 0 for q in questions):
        raise ValueError("every question needs at least one token")
    lengths = torch.tensor([len(q) for q in questions], dtype=torch.long)
    ids = torch.full((len(questions), int(lengths.max())), PAD_ID, dtype=torch.long, pin_memory=pin_memory)
    for i, q in enumerate(questions):
        ids[i, : len(q)] = torch.tensor(q.ids, dtype=torch.long)
    return ids, lengths


class QuestionEncoder(nn.Module):
    def __init__(self, cfg: QuestionEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.word_dim, padding_idx=0)
        self.lstm = nn.LSTM(cfg.word_dim, cfg.hidden_size, cfg.num_layers, batch_first=True)
        self.fc = nn.Linear(2 * cfg.num_layers * cfg.hidden_size, cfg.embed_size)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``ids``: [B, T] right-padded token ids; ``lengths``: [B] true lengths (>= 1).

        Packed (the default): the LSTM never reads padding, so a question encodes the same
        whether it is alone or padded inside a batch of longer ones. Fixed: ``ids`` is padded
        to ``max_tokens`` and the LSTM reads all of it, so a question also encodes the same
        alone or in any batch (every question has the same padding), as its model was trained.

        Always float32, also inside an autocast region (the output is float32): under CUDA
        autocast cuDNN's LSTM runs in fp16 whatever the autocast dtype (PyTorch's autocast RNN
        wrapper casts to half and re-flattens the weights into a new fp16 buffer on every call),
        and CPU autocast runs it in bf16. The encoder is a few percent of the model's work; its
        precision is chosen here, not by the dtype the image encoder runs in.
        """
        with torch.autocast(device_type=ids.device.type, enabled=False):
            if self.cfg.padding == "fixed":
                if ids.shape[1] < self.cfg.max_tokens:
                    ids = F.pad(ids, (0, self.cfg.max_tokens - ids.shape[1]), value=PAD_ID)
                _, (h, c) = self.lstm(torch.tanh(self.embedding(ids)))
            else:
                x = torch.tanh(self.embedding(ids))
                lengths = lengths.cpu()
                # Already longest-first (the predictor sorts on the host): packing then needs no
                # permutation, which pack_padded_sequence would copy to the device on every call.
                in_order = bool((lengths[:-1] >= lengths[1:]).all())
                packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=in_order)
                _, (h, c) = self.lstm(packed)  # each [num_layers, B, hidden]
            state = torch.cat([h, c], dim=2).transpose(0, 1).reshape(ids.shape[0], -1)
            return self.fc(torch.tanh(state))
