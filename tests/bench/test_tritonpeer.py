"""``vqa-bench triton`` (bench/tritonpeer.py): the parts that run without Triton (its model
configuration, the response decoder that compares answers, the command line), and, where the
``triton`` extra is installed (an environment of its own: its wheel needs numpy<2), a tiny run
against a real Triton server."""

from __future__ import annotations

import importlib.util
import json

import pytest

from app.edge.v2codec import Tensor, encode_response
from bench import tritonpeer


def test_model_config_has_a_batch_dimension_and_our_batching_limits():
    cfg = tritonpeer.model_config(max_batch=32, max_wait_ms=5, instances=2)
    assert 'backend: "python"' in cfg and "max_batch_size: 32" in cfg
    for name, dtype in (("image", "TYPE_STRING"), ("question", "TYPE_STRING"), ("answer", "TYPE_STRING"),
                        ("confidence", "TYPE_FP32")):
        assert f'name: "{name}" data_type: {dtype} dims: [ 1 ]' in cfg
    assert "preferred_batch_size: [ 32 ]" in cfg and "max_queue_delay_microseconds: 5000" in cfg
    assert "count: 2 kind: KIND_CPU" in cfg


@pytest.mark.parametrize("binary", [set(), {"answer"}, {"answer", "confidence"}])
def test_answers_are_read_back_from_binary_and_json_outputs(binary):
    body, _ = encode_response("m", "1", None, [Tensor("answer", "BYTES", [1, 1], [b"rectangle"]),
                                               Tensor("confidence", "FP32", [1, 1], [0.75])], binary)
    assert tritonpeer.decode_v2(body) == ("rectangle", 0.75)


def test_a_response_that_is_not_an_answer_reads_as_none():
    assert tritonpeer.decode_v2(json.dumps({"error": "bad"}).encode()) is None
    assert tritonpeer.decode_v2(b"") is None
    body, _ = encode_response("m", "1", None, [Tensor("answer", "BYTES", [1, 1], [b"yes"])], {"answer"})
    assert tritonpeer.decode_v2(body[:-2]) is None  # cut short


@pytest.mark.parametrize("workload", ["miss", "easy-vqa"])
def test_the_warm_up_sends_no_pair_a_cell_will_send(workload):
    """Otherwise the first round would find those images in both servers' caches."""
    cells = tritonpeer.cell_pairs(workload).take(9673 - tritonpeer.WARMUP if workload == "easy-vqa" else 600)
    sent = {(s.image, s.question) for s in cells}
    assert not sent & {(s.image, s.question) for s in tritonpeer.warmup_pairs(workload)}


def test_the_easy_vqa_workload_must_fit_the_split():
    ok = tritonpeer.parse_args(["--requests", "2000", "--rounds", "3"])
    assert ok.concurrency == 32 and ok.output.name == "triton-cpu.json"
    sim = tritonpeer.parse_args(["--regime", "sim"])
    assert sim.concurrency == 128 and sim.output.name == "triton-sim.json"
    with pytest.raises(SystemExit):
        tritonpeer.parse_args(["--requests", "3000", "--rounds", "4"])


@pytest.mark.skipif(importlib.util.find_spec("pytriton") is not None, reason="the triton extra is installed")
def test_without_the_triton_extra_it_says_how_to_install_it():
    with pytest.raises(SystemExit, match=r"pip install -e '\.\[triton\]'"):
        tritonpeer.triton_dist()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("pytriton") is None, reason="needs the triton extra (numpy<2 env)")
def test_a_tiny_run_against_real_triton_gives_the_same_answers(tmp_path):
    out = tmp_path / "triton.json"
    assert tritonpeer.main(["--requests", "40", "--rounds", "1", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["answers_compared"] == 40 and results["answers_mismatched"] == 0
    for name in ("ours", "triton"):
        assert results["summary"][name]["ok"] == 40 and results["summary"][name]["batch_size_mean"] >= 1


def test_the_rendered_section_names_every_differing_answer():
    from bench.sections import load

    results = load("bench/results/triton-cpu.json")
    assert "ours ÷ Triton" in tritonpeer.render(results) and "- differing:" not in tritonpeer.render(results)
    results = {**results, "answers_mismatched": 1,
               "mismatches": [{"round": 0, "request": 7, "question": "what shape?", "ours": ["circle", 0.5],
                               "triton": ["triangle", 0.5]}]}
    text = tritonpeer.render(results)
    assert "answers differing: 1 of" in text and "request 7 ('what shape?'): ours ['circle', 0.5]" in text
