"""Response bodies (request bodies are multipart forms declared on the routes)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field


class AnswerScore(BaseModel):
    answer: str
    confidence: float = Field(ge=0, le=1, description="softmax probability")


class Timing(BaseModel):
    queue_ms: float = Field(description="waiting for a forward pass (batch gathering + device busy)")
    inference_ms: float = Field(description="the forward pass this request rode in")
    total_ms: float = Field(description="request handling, from form parsed to answer")
    batch_size: int = Field(description="images in that forward pass")


class QuestionAnswer(BaseModel):
    question: str
    answer: str = Field(description="the most likely answer")
    confidence: float = Field(ge=0, le=1)
    top_k: list[AnswerScore] = Field(description="best answers, most likely first")
    unknown_words: list[str] = Field(description="words of the question the model never saw in training")


Unit = Annotated[float, Field(ge=0, le=1)]


class Explanation(BaseModel):
    """Where the model looked: a Grad-CAM heatmap of the top answer over the image."""

    method: str = Field(description="how the heatmap was computed: `grad-cam` (Selvaraju et al. 2017: channel "
                        "weights = the answer logit's gradient averaged over the grid) or `hirescam` (Draelos "
                        "& Carin 2020: gradient times activation cell by cell, then summed over channels)")
    answer: str = Field(description="the answer explained (the gradient is that of its log-probability: "
                        "why this answer rather than the others): the top answer of the explanation's own "
                        "float32 pass, equal to `answer` except, on reduced-precision GPUs, at near ties")
    layer: str = Field(description="the feature maps explained: the last convolution (after ReLU) of the "
                       "deepest VGG16 block whose grid is at least 8x8 at the model's input size: block 4 "
                       "(8x8) for the shipped 64x64 model, block 5, the last, (14x14) for full-size VGG16 "
                       "at 224x224")
    shape: list[int] = Field(min_length=2, max_length=2, description="[rows, cols] of `grid`")
    grid: list[list[Unit]] = Field(description="`rows` lists of `cols` values in [0, 1], top row first, left to "
                                   "right; 1 marks the cell that supported the answer most, 0 none. Cell (r, c) "
                                   "covers the same fraction of the image as uploaded (it is resized whole to the "
                                   "model's input, aspect not kept): rows r/rows..(r+1)/rows, columns likewise")
    explain_ms: float = Field(description="time to compute it (image decode, forward and backward pass)")


class AnswerResponse(QuestionAnswer):
    model: str
    image_cached: bool = Field(description="image features came from the cache (no image decode/encode)")
    timing: Timing
    explanation: Explanation | None = Field(None, description="only with `explain=true`: where the model looked")


class MultiAnswerResponse(BaseModel):
    model: str
    image_cached: bool
    answers: list[QuestionAnswer]
    timing: Timing


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable error code")
    message: str = Field(description="what went wrong, for a person")
    request_id: str
    details: list[dict] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class BatchingInfo(BaseModel):
    max_batch_size: int
    max_wait_ms: float
    max_queue: int
    request_timeout_s: float


class ModelInfo(BaseModel):
    name: str
    version: str = Field(description="content hash of the weights file")
    weights: str = Field(description="weights file name")
    device: str
    dtype: str = Field(description="autocast dtype of the image encoder and head (float32: none)")
    precision: dict[str, str] = Field(description="what each part computes in: image_encoder, "
                                      "question_encoder (float32 always), head")
    torch_threads: int = Field(description="intra-op threads of the forward pass (VQA_TORCH_THREADS or the CPU quota)")
    image_size: int
    answers: list[str]
    question_vocab_size: int
    max_question_chars: int
    max_questions: int
    feature_cache_entries: int
    batching: BatchingInfo
    training: dict = Field(description="facts recorded in the checkpoint at training time")


class Health(BaseModel):
    status: str
    detail: str | None = None
