"""All service configuration in one typed object, read from ``VQA_*`` environment variables.

Defaults serve the shipped easy-VQA weights with no variable set.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS = REPO_ROOT / "weights" / "easy-vqa.safetensors"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VQA_", env_file=None, extra="ignore")

    # model
    weights: Path = Field(DEFAULT_WEIGHTS, description="checkpoint file (safetensors) to serve")
    device: str = Field("auto", description="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    precision: str = Field("auto", description="autocast dtype of the image encoder and head: auto (bf16/fp16 "
                           "on CUDA, fp32 on CPU), fp32, fp16, bf16; the question encoder is float32 always")

    # batching
    max_batch_size: int = Field(32, ge=1, le=1024, description="images per forward pass, at most")
    max_wait_ms: float = Field(5.0, ge=0, le=10_000, description="how long a batch waits for companions after its first item")
    max_queue: int = Field(256, ge=1, le=100_000, description="admitted requests waiting for the model; beyond it: 503")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="per-request deadline (504 when exceeded)")
    body_timeout_s: float = Field(60.0, gt=0, le=3600, description="the whole request body must arrive within this (408)")
    warmup_batch_sizes: Annotated[list[int], NoDecode] = Field(
        default_factory=list, description="batch sizes run once at start-up, comma separated; on CUDA also "
        "the sizes image batches are padded to (max_batch_size always included; empty: 1, 2, 3, 4, 6, 8, 12, "
        "16, 24, 32, ... up to max_batch_size); on CPU no padding, empty: 1")

    # input bounds
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="largest accepted request body, bytes")
    max_inflight_mb: float = Field(256.0, gt=0, description="request-body megabytes held at once by admitted "
                                   "requests not yet decoded; beyond it: 503 (at least max_upload_bytes)")
    max_image_pixels: int = Field(40_000_000, ge=1, description="largest accepted image, width x height")
    max_question_chars: int = Field(300, ge=1, le=10_000, description="longest accepted question, characters")
    max_questions: int = Field(16, ge=1, le=256, description="questions per multi-question request, at most")
    max_top_k: int = Field(20, ge=1, description="largest accepted top_k (also capped by the answer count)")

    # explanations (explain=true): a backward pass each, so their own bound
    explain_concurrency: int = Field(2, ge=1, le=64, description="explain=true requests being answered at once, "
                                     "at most; beyond it they get 503 + Retry-After (plain requests are not affected)")

    # image-feature cache
    feature_cache: int = Field(4096, ge=0, description="cached image features, entries (0 disables the cache)")
    feature_cache_mb: float = Field(64.0, ge=0, description="cached image features, megabytes at most")

    # process
    decode_threads: int = Field(2, ge=1, le=64, description="threads decoding images off the event loop")
    inline_decode_pixels: int | None = Field(
        None, ge=0, le=40_000_000, description="images whose header declares at most this many pixels (uploads of "
        "at most 256 KB) are decoded on the event loop, larger ones by the decode threads; unset: 16384 (128x128) in the front "
        "ends of VQA_WORKERS > 1 (processes, not threads, share the cores there), 0 (never) in a single process")
    torch_threads: int = Field(0, ge=0, le=1024, description="intra-op threads of the forward pass; 0: the "
                               "container's CPU quota (cgroup cpu.max) if it has one, else the CPUs it may run on")
    forward_shards: int = Field(0, ge=0, le=64, description="on CPU, lanes: up to N batches run at once, "
                                "each on its own thread with VQA_TORCH_THREADS / N intra-op threads "
                                "(docs/performance.md); a lone single-image batch still runs on every intra-op "
                                "thread. 0: on CPU one lane per VQA_TORCH_THREADS, one intra-op thread each; on "
                                "CUDA one lane; 1: one batch at a time")
    host: str = Field("127.0.0.1", description="vqa-serve bind address (0.0.0.0 in the container)")
    port: int = Field(8000, ge=0, le=65535, description="vqa-serve port")
    log_level: str = Field("info", description="log level: debug, info, warning, error")
    access_log: bool = Field(False, description="one uvicorn access-log line per request (at log level info "
                             "or below); off by default: it costs event-loop CPU on every request "
                             "(docs/performance.md), and request counts, statuses and latencies are in /metrics")
    workers: int = Field(0, ge=0, le=64, description="HTTP front-end processes on the one port, sharing one "
                         "model-owning process (docs/scaling.md); 0: 1 when the model runs on the CPU, else "
                         "one per 4 CPUs this container may use (1 to 8); 1: a single process, no IPC")
    shutdown_timeout_s: float = Field(30.0, ge=0, description="graceful drain on SIGTERM, seconds at most")
    drain_grace_s: float = Field(2.0, ge=0, le=600, description="after SIGTERM, how long open keep-alive "
                                 "connections are still read and answered (new requests: 503 + Connection: "
                                 "close; admitted ones: served) before idle ones are closed")
    linger_s: float = Field(10.0, ge=0, le=600, description="a connection closed by the server while the "
                            "client may still be sending (a refusal before the body was read, the drain) is "
                            "closed lingering: its response sent, what the client sends read and discarded "
                            "for at most this long (2 s at most without a byte; at most the upload limit in "
                            "bytes), so the client receives the response instead of a reset; 0: close at once")
    linger_max_connections: int = Field(512, ge=0, le=65536, description="connections lingering at once, at "
                                        "most; beyond it a close is immediate")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="allowed CORS origins, comma separated (empty: CORS closed)")

    @field_validator("warmup_batch_sizes", mode="before")
    @classmethod
    def _parse_int_list(cls, v):
        if isinstance(v, str):
            return [int(x) for x in v.replace(" ", "").split(",") if x]
        return v

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _parse_str_list(cls, v):
        if isinstance(v, str):
            return [x.strip() for x in v.split(",") if x.strip()]
        return v

    @model_validator(mode="after")
    def _inflight_fits_one_upload(self) -> "Settings":
        # One budget for the whole server: VQA_WORKERS front ends share it (in shared memory).
        if self.max_inflight_mb * 1024 * 1024 < self.max_upload_bytes:
            raise ValueError("max_inflight_mb must hold at least one upload of max_upload_bytes")
        return self

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        v = v.strip().lower()
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return v

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, v: str) -> str:
        v = v.strip().lower()
        if v not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ValueError("log_level must be one of critical, error, warning, info, debug, trace")
        return v


@lru_cache
def get_settings() -> Settings:
    return Settings()
