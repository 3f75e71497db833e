"""The peer: the same checkpoint served by NVIDIA Triton's Python backend, through this project's
own code (``vqa-bench triton`` copies this file into a model repository as ``<model>/1/model.py``).

Each Triton model instance is a process of its own (the backend's stub) that loads the
predictor once and, for every batch Triton's dynamic batcher hands it, runs what our service
runs: :func:`app.backends.protocol.image_key` and the instance's own
:class:`app.backends.cache.FeatureCache` (a hit skips decoding and the image encoder),
:func:`app.pipeline.preprocessing.decode_pixels` with the checkpoint's transform and our
limits, the predictor's question encoder, one :class:`app.backends.runner.BatchRunner` call over
the batch (the forward pass; several questions about one image share its encoding) and the
top-k. A request that fails to decode gets its own error response, the rest of the batch is
answered. Settings come from the same ``VQA_*`` variables (weights, device, limits, cache);
``VQA_TORCH_THREADS`` is each instance's intra-op thread count (``vqa-bench triton`` gives each
instance 1). With ``VQA_BENCH_SIM_DEVICE`` set the simulated device of ``bench/simdevice.py``
replaces the forward pass, as it does in our server.

Inputs (batch dimension first, as Triton's dynamic batcher needs): ``image`` BYTES ``[-1, 1]``,
``question`` BYTES ``[-1, 1]``. Outputs: ``answer`` BYTES ``[-1, 1]``, ``confidence`` FP32
``[-1, 1]`` (the best answer): what ``/v2/models/<ours>/infer`` answers with ``top_k`` 1, less
its ``unknown_words`` output.
"""

from __future__ import annotations

import os
import sys

# The stub's embedded Python does not read PYTHONPATH: vqa-bench triton passes the repository
# (and, for the simulated device, its sitecustomize's directory) here instead.
sys.path[:0] = [p for p in os.environ.get("VQA_BENCH_PYTHONPATH", "").split(os.pathsep) if p]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402  (provided by the Python backend stub)

from app.backends.cache import FeatureCache  # noqa: E402
from app.backends.protocol import image_key  # noqa: E402
from app.backends.runner import AnswerJob, BatchRunner, InferenceError  # noqa: E402
from app.cpu import forward_threads  # noqa: E402
from app.pipeline.preprocessing import ImageError, decode_pixels  # noqa: E402
from app.settings import Settings  # noqa: E402
from models import Predictor  # noqa: E402


def _one_at_a_time(run, path: str):
    import fcntl

    def locked(requests):
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                return run(requests)
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    return locked


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        if os.environ.get("VQA_BENCH_SIM_DEVICE"):
            import sitecustomize  # noqa: F401  (bench/simdevice.py's, on PYTHONPATH: the simulated forward pass)
        s = self.settings = Settings()
        threads = forward_threads(s.torch_threads)
        torch.set_num_threads(threads)
        device = "cpu" if s.device == "auto" and not torch.cuda.is_available() else s.device
        self.predictor = Predictor.from_file(s.weights, device, s.precision)
        self.predictor.warmup([1])
        self.transform = self.predictor.model.cfg.image.transform
        self.cache = FeatureCache(s.feature_cache, int(s.feature_cache_mb * 1024 * 1024))
        self.runner = BatchRunner(self.predictor, self.cache, whole_threads=threads)
        lock = os.environ.get("VQA_BENCH_SIM_LOCK")
        if lock:  # the simulated device is one device: the instances' forward passes take turns
            self.predictor.run = _one_at_a_time(self.predictor.run, lock)

    def execute(self, requests: list) -> list:
        s, p = self.settings, self.predictor
        jobs: list[AnswerJob] = []
        slots: list[int | str] = []  # per request: its job's index, or an error message
        for request in requests:
            image = pb_utils.get_input_tensor_by_name(request, "image").as_numpy().reshape(-1)
            question = pb_utils.get_input_tensor_by_name(request, "question").as_numpy().reshape(-1)
            try:
                if len(image) != 1 or len(question) != 1:
                    raise ValueError("one image and one question per request")
                data = bytes(image[0])
                text = question[0].decode("utf-8") if isinstance(question[0], bytes) else str(question[0])
                if len(text) > s.max_question_chars or not text.strip():
                    raise ValueError("question empty or too long")
                key = image_key(data)
                features = self.cache.get(key)
                pixels = None if features is not None else decode_pixels(
                    data, transform=self.transform, max_pixels=s.max_image_pixels, max_bytes=s.max_upload_bytes)
                jobs.append(AnswerJob([p.encode_question(text)], pixels, features, key))
                slots.append(len(jobs) - 1)
            except (ImageError, ValueError, UnicodeDecodeError) as e:
                slots.append(str(e) or type(e).__name__)
        results = self.runner(jobs) if jobs else []
        responses = []
        for slot in slots:
            result = results[slot] if isinstance(slot, int) else None
            if result is None or isinstance(result, InferenceError):
                message = slot if isinstance(slot, str) else str(result)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)))
                continue
            answer, confidence = p.top_k(result.probs[0], 1)[0]
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("answer", np.array([[answer.encode()]], dtype=np.object_)),
                pb_utils.Tensor("confidence", np.array([[confidence]], dtype=np.float32))]))
        return responses
