"""The batch handler (app/backends/runner.py) alone, on the real tiny predictor: OOM split, failures
that stay with their own images, non-finite outputs that stay with their own questions."""

from __future__ import annotations

import weakref

import pytest
import torch

from app.backends.runner import AnswerJob, BatchRunner, InferenceError
from models import ImageAnswers, Predictor
from tests.conftest import QUESTIONS


def _pixels(p: Predictor, value: int) -> torch.Tensor:
    return torch.full((3, p.image_size, p.image_size), value, dtype=torch.uint8)


def _jobs(p: Predictor, values: list[int]) -> list[AnswerJob]:
    return [AnswerJob(questions=[p.encode_question(QUESTIONS[i % len(QUESTIONS)])], pixels=_pixels(p, v),
                      cache_key=bytes([v]), request_id=f"r{v}")
            for i, v in enumerate(values)]


def _oom() -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_failed_attempts_tensors_are_freed_before_the_halves_run(tiny_checkpoint):
    """The failed attempt's activations (the encoder's output and the head's input, held by the
    frames of the exception's traceback) must be gone when the retry starts, or the halves run
    beside them and empty_cache() frees nothing."""
    p = Predictor(tiny_checkpoint, device="cpu")
    answer_logits = p.model.answer_logits
    held: list[weakref.ref] = []  # every encoder output, and the head's input when it fails
    failed: list[weakref.ref] = []  # those of the failed attempt
    alive_at_retry: list[bool] = []
    sizes: list[int] = []

    def keep_encoder_output(module, args, output):
        held.append(weakref.ref(output))

    def oom_when_batched(image_features, ids, lengths):
        if len(sizes) == 1:  # the first retry: are the failed attempt's tensors gone?
            alive_at_retry.extend(ref() is not None for ref in failed)
        sizes.append(image_features.shape[0])
        if image_features.shape[0] > 1:
            failed.extend(held + [weakref.ref(image_features)])
            raise _oom()
        return answer_logits(image_features, ids, lengths)

    p.model.image_encoder.register_forward_hook(keep_encoder_output)
    p.model.answer_logits = oom_when_batched  # type: ignore[method-assign]
    splits: list[int] = []
    runner = BatchRunner(p, on_oom_split=splits.append)
    out = runner(_jobs(p, [10, 20]))
    assert sizes == [2, 1, 1] and splits == [2]
    assert len(alive_at_retry) == 2 and not any(alive_at_retry), alive_at_retry
    assert all(isinstance(a, ImageAnswers) for a in out)


def test_an_image_that_runs_out_of_memory_alone_fails_only_its_own_requests(tiny_checkpoint):
    p = Predictor(tiny_checkpoint, device="cpu")
    poison = 99

    def oom_with_poison(reqs):
        if any(r.pixels is not None and int(r.pixels[0, 0, 0]) == poison for r in reqs):
            raise _oom()

    runner = BatchRunner(p)
    runner.fault_injector = oom_with_poison
    jobs = _jobs(p, [1, 2, poison, 3])
    out = runner(jobs)
    reference = BatchRunner(p)([j for j in jobs if j.request_id != f"r{poison}"])
    assert isinstance(out[2], InferenceError) and out[2].kind == "out_of_memory"
    kept = [out[0], out[1], out[3]]
    assert all(isinstance(a, ImageAnswers) for a in kept)
    for a, ref in zip(kept, reference):
        torch.testing.assert_close(a.probs, ref.probs)


def test_a_non_oom_failure_after_a_split_fails_only_that_part(tiny_checkpoint):
    p = Predictor(tiny_checkpoint, device="cpu")
    calls = {"n": 0}

    def oom_then_bug(reqs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise _oom()
        if calls["n"] == 2:  # the first half
            raise ValueError("a bug in the first half")

    runner = BatchRunner(p)
    runner.fault_injector = oom_then_bug
    out = runner(_jobs(p, [1, 2, 3, 4]))
    assert [type(a) for a in out] == [InferenceError, InferenceError, ImageAnswers, ImageAnswers]
    assert out[0].kind == "ValueError"


def test_a_non_oom_failure_of_a_whole_batch_propagates(tiny_checkpoint):
    p = Predictor(tiny_checkpoint, device="cpu")
    runner = BatchRunner(p)

    def bug(reqs):
        raise ValueError("boom")

    runner.fault_injector = bug
    with pytest.raises(ValueError):
        runner(_jobs(p, [1, 2]))


def test_a_non_finite_answer_fails_only_the_question_that_produced_it(tiny_checkpoint):
    """Two requests about one image share its forward pass; a NaN in one question's answer
    fails that request only, and the image's (finite) feature is still cached."""
    from app.backends.cache import FeatureCache

    p = Predictor(tiny_checkpoint, device="cpu")
    poisoned = p.encode_question(QUESTIONS[3])  # the only question with "not" in it
    not_id = p.encode_question("not").ids[0]
    answer_logits = p.model.answer_logits

    def nan_for_not(image_features, ids, lengths):
        logits = answer_logits(image_features, ids, lengths)
        return torch.where((ids == not_id).any(dim=1, keepdim=True), float("nan"), logits)

    p.model.answer_logits = nan_for_not  # type: ignore[method-assign]
    cache = FeatureCache(16, 1 << 20)
    image = _pixels(p, 7)
    jobs = [AnswerJob(questions=[p.encode_question(QUESTIONS[0])], pixels=image, cache_key=b"same"),
            AnswerJob(questions=[poisoned], pixels=image, cache_key=b"same")]
    ok, bad = BatchRunner(p, cache)(jobs)
    assert isinstance(ok, ImageAnswers) and torch.isfinite(ok.probs).all()
    assert isinstance(bad, InferenceError) and bad.kind == "non_finite_output"
    assert cache.get(b"same") is not None
