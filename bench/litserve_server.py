"""The peer: the same checkpoint served by LitServe, through this project's own code.

``python -m bench.litserve_server`` (what ``vqa-bench litserve`` starts). LitServe's pipeline
stages are filled with this project's pieces, so the comparison is of the servers, not of the
models: ``decode_request`` reads the multipart form LitServe hands it and runs
:func:`app.pipeline.preprocessing.decode_pixels` and the predictor's question encoder; ``predict`` is one
:meth:`models.Predictor.run` over the batch LitServe gathered; ``encode_response`` takes the
predictor's top-k. Batching as ours by default: at most ``VQA_MAX_BATCH_SIZE`` (32) requests,
``VQA_MAX_WAIT_MS`` (5 ms) batch timeout; the forward pass uses the same thread count as ours
(``VQA_TORCH_THREADS``, by default the CPU quota). Settings come from the same ``VQA_*``
variables (weights, device, port). Needs the ``bench`` extra (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import litserve as ls
import torch

from app.cpu import forward_threads
from app.pipeline.preprocessing import decode_pixels
from app.settings import Settings
from models import ImageQuestions, Predictor


class VQALitAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        s = self.settings = Settings()
        torch.set_num_threads(forward_threads(s.torch_threads))
        self.predictor = Predictor.from_file(s.weights, s.device if s.device != "auto" else device, s.precision)
        self.predictor.warmup([1])

    def decode_request(self, request):  # LitServe finds the argument by this name
        form = request
        s, p = self.settings, self.predictor
        data = form["image"].file.read()
        pixels = decode_pixels(data, image_size=p.image_size, max_pixels=s.max_image_pixels,
                               max_bytes=s.max_upload_bytes)
        question = p.encode_question(str(form["question"]))
        return ImageQuestions(questions=[question], pixels=pixels), int(form.get("top_k", 3)), question

    def predict(self, batch):
        answers = self.predictor.run([item for item, _, _ in batch])
        return [(a, k, q) for a, (_, k, q) in zip(answers, batch)]

    def encode_response(self, output):
        answers, k, question = output
        best = self.predictor.top_k(answers.probs[0], k)
        return {"question": question.text, "answer": best[0][0], "confidence": best[0][1],
                "top_k": [{"answer": a, "confidence": c} for a, c in best],
                "unknown_words": list(question.unknown_words)}


def main() -> None:
    s = Settings()
    api = VQALitAPI(max_batch_size=s.max_batch_size, batch_timeout=s.max_wait_ms / 1000,
                    api_path="/v1/answer")
    cuda = s.device.startswith("cuda") or (s.device == "auto" and torch.cuda.is_available())
    server = ls.LitServer(api, accelerator="cuda" if cuda else "cpu", devices=1, workers_per_device=1,
                          timeout=s.request_timeout_s)
    server.run(host=s.host, port=s.port, num_api_servers=1, generate_client_file=False,
               log_level=s.log_level)


if __name__ == "__main__":
    main()
