"""The VQA network (VGG16 image encoder, LSTM question encoder, fusion head), its vocabularies,
checkpoint format and predictor. Knows nothing of HTTP or batching."""

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .predictor import ImageAnswers, ImageQuestions, Predictor, resolve_device
from .question import QuestionEncoder, QuestionEncoderConfig
from .vgg import ImageEncoder, ImageEncoderConfig
from .vocab import AnswerVocabulary, EncodedQuestion, Vocabulary, tokenize
from .vqa import VQAConfig, VQAModel

__all__ = [
    "AnswerVocabulary", "Checkpoint", "CheckpointError", "EncodedQuestion", "ImageAnswers",
    "ImageEncoder", "ImageEncoderConfig", "ImageQuestions", "Predictor", "QuestionEncoder",
    "QuestionEncoderConfig", "VQAConfig", "VQAModel", "Vocabulary", "load_checkpoint",
    "resolve_device", "save_checkpoint", "tokenize",
]
