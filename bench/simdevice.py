"""A simulated device, for benchmarks only: the forward pass sleeps ``a + b × batch`` seconds
(releasing the GIL, as a GPU kernel launch-and-wait does) and returns fixed probabilities, so
the HTTP path, not this CPU, is what a benchmark measures -- as it will be on a GPU host.

The server under test is the real ``vqa-serve`` (any ``VQA_WORKERS``): the child interpreters
import a generated ``sitecustomize`` (Python imports one at start-up when it is on
``PYTHONPATH``) that replaces ``Predictor.run`` when ``VQA_BENCH_SIM_DEVICE`` is set. Nothing in
``app/`` knows about it. Everything around the forward pass is real: decoding, the batcher,
the cache, the IPC of a multi-process server.

The constants. No published VGG16 inference timing on an H100 or A100 was found (searched:
NVIDIA's performance pages and DeepLearningExamples list ResNet-50 and others, not VGG16). The
closest published figures are VGG16 (ImageNet, 224×224) float16 inference on one V100 with
cuDNN 7.1 (PaddlePaddle's float16 benchmark,
https://github.com/kexinzhao/Paddle_benchmark/blob/master/float16_benchmark.md): 3.32, 4.11,
5.88, 9.41, 16.54, 30.47 and 60.23 ms per batch of 1, 2, 4, 8, 16, 32 and 64. A least-squares
line through them is ``2.20 ms + 0.902 ms × batch`` (within 0.3 ms of every point from 4 up).
The default divides both by 4, **an assumption, not a measurement**, for a current GPU
(H100 class) against the V100: ``0.55 ms + 0.225 ms × batch``, 7.8 ms for a batch of 32, about
4,100 images/s at that size. ``--sim-a-ms`` / ``--sim-b-ms`` of ``vqa-bench scaling`` change it;
with the V100 line itself the device, not the HTTP path, would bound a two-front-end server.
"""

from __future__ import annotations

import os
from pathlib import Path

V100_FP16_A_MS, V100_FP16_B_MS = 2.20, 0.902  # the fit of the published V100 figures
ASSUMED_SPEEDUP = 4.0  # H100 class vs V100: an assumption (see the module docstring)
DEFAULT_A_MS = V100_FP16_A_MS / ASSUMED_SPEEDUP
DEFAULT_B_MS = V100_FP16_B_MS / ASSUMED_SPEEDUP
ENV = "VQA_BENCH_SIM_DEVICE"  # "a_ms,b_ms"

SITECUSTOMIZE = '''\
import os

_spec = os.environ.get("VQA_BENCH_SIM_DEVICE")
if _spec:
    import time

    import torch

    import models.predictor as _predictor

    import threading

    _a, _b = (float(x) / 1000 for x in _spec.split(","))
    _rows = {}
    _lock = threading.Lock()
    _busy = [0, 0]  # forward passes running now, the most at once
    _trace = os.environ.get("VQA_BENCH_SIM_TRACE")  # a file: the most at once, rewritten after each

    def _simulated_run(self, requests):
        """a + b x batch seconds of sleep (the GIL released), then fixed probabilities."""
        if not requests:
            return []
        with _lock:
            _busy[0] += 1
            _busy[1] = max(_busy[1], _busy[0])
        try:
            time.sleep(_a + _b * len(requests))
        finally:
            with _lock:
                _busy[0] -= 1
                if _trace:
                    with open(_trace, "w") as f:
                        f.write(str(_busy[1]))
        n = len(self.answers)
        row = _rows.get(n)
        if row is None:
            row = _rows[n] = torch.softmax(torch.linspace(0, 4, n), 0)
        feature = torch.zeros(16)  # what the cache keeps for an image; never computed on
        return [_predictor.ImageAnswers(probs=row.expand(len(r.questions), n), features=feature,
                                        encoded=r.features is None) for r in requests]

    _predictor.Predictor.run = _simulated_run
'''


def simulated_env(directory: Path, a_ms: float = DEFAULT_A_MS, b_ms: float = DEFAULT_B_MS) -> dict[str, str]:
    """Write the sitecustomize into ``directory``; the environment variables that give a
    server started from there the simulated device. It runs one batch at a time, as the
    server runs a GPU: the server itself runs on ``VQA_DEVICE=cpu``, where it would otherwise
    run a batch per lane at once (VQA_FORWARD_SHARDS), a device several times the modelled one.
    With ``VQA_BENCH_SIM_TRACE`` (a file) set too, the server writes there the most forward
    passes it ran at once."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE)
    from .server import REPO

    path = [str(directory), str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return {"PYTHONPATH": os.pathsep.join(path), ENV: f"{a_ms},{b_ms}", "VQA_FORWARD_SHARDS": "1"}


def forward_ms(batch: int, a_ms: float = DEFAULT_A_MS, b_ms: float = DEFAULT_B_MS) -> float:
    return a_ms + b_ms * batch
