"""``VQA_WORKERS=2`` as users run it: ``vqa-serve`` = a supervisor, two front-end processes on
one port and one model-owning process. What holds for one process holds here: answers, batches
formed across the front ends, the feature cache's hit rate, /metrics summed over processes,
health and readiness, overload (503 + Retry-After), deadlines (504), and the SIGTERM drain."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.process.supervisor import process_role
from bench.proc import process_tree, thread_cpu_seconds
from bench.server import REPO, ServerProcess
from tests.app.conftest import form
from tests.app.realserver import metric
from tests.conftest import png_bytes

GUARD_S = 120  # liveness guard of a scenario, not a performance threshold

# A device whose forward pass sleeps for as long as a file says (read on every pass, so a test
# can make the device slow and fast again), in every process of the server.
_SITECUSTOMIZE = '''\
import os

_path = os.environ.get("VQA_TEST_DELAY_FILE")
if _path:
    import time

    import models.predictor as _predictor

    _run = _predictor.Predictor.run

    def _slow_run(self, requests):
        try:
            with open(_path) as f:
                delay = float(f.read() or 0)
        except (OSError, ValueError):
            delay = 0.0
        if delay:
            time.sleep(delay)
        return _run(self, requests)

    _predictor.Predictor.run = _slow_run
'''


@contextlib.contextmanager
def workers_server(settings: dict[str, str], delay_s: float = 0.0):
    with tempfile.TemporaryDirectory(prefix="vqa-workers-") as tmp:
        Path(tmp, "sitecustomize.py").write_text(_SITECUSTOMIZE)
        delay = Path(tmp, "delay")
        delay.write_text(str(delay_s))
        path = [tmp, str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
        # One lane: the delayed device runs one batch at a time, as a GPU does.
        env = {"VQA_DEVICE": "cpu", "VQA_WORKERS": "2", "PYTHONPATH": os.pathsep.join(path),
               "VQA_TEST_DELAY_FILE": str(delay), "VQA_FORWARD_SHARDS": "1", **settings}
        srv = ServerProcess(env, log_path=Path(tmp, "server.log"))
        srv.delay_file = delay  # type: ignore[attr-defined]
        srv.start()
        try:
            yield srv
        except BaseException:
            # The server's own account of a failure is in its log, which goes with the
            # temporary directory: show it (pytest prints captured output of failing tests).
            srv.stop()
            print(f"--- server log ({srv.proc.returncode=}) ---")
            print(Path(tmp, "server.log").read_text(errors="replace")[-20000:])
            raise
        finally:
            srv.stop()


def roles(srv: ServerProcess) -> dict[int, str]:
    return {p: r for p in process_tree(srv.pid) if (r := process_role(p)) is not None}


def fresh_connections(n: int) -> httpx.Limits:
    # No keep-alive: every request opens a new connection, which the kernel hands to one of
    # the front ends' SO_REUSEPORT listening sockets.
    return httpx.Limits(max_connections=n, max_keepalive_connections=0)


@pytest.fixture(scope="module")
def w2():
    with workers_server({}) as srv:
        yield srv


def test_two_front_ends_one_model_process(w2):
    r = roles(w2)
    assert sorted(r.values()) == ["front", "front", "model"]
    with httpx.Client(base_url=w2.url, timeout=30) as c:
        assert c.get("/readyz").json()["status"] == "ready"
        assert c.get("/healthz").json()["status"] == "alive"
        info = c.get("/v1/model").json()
        assert info["device"] == "cpu" and info["precision"]["question_encoder"] == "float32"
        assert len(info["version"]) == 12  # the weights' hash, from the model process


def test_answers_are_right_and_batches_form_across_front_ends(w2, easy_vqa_samples):
    fronts = [p for p, r in roles(w2).items() if r == "front"]
    cpu0 = {p: thread_cpu_seconds(p).get(p, 0.0) for p in fronts}
    text0 = httpx.get(w2.url + "/metrics").text

    async def fire():
        async with httpx.AsyncClient(base_url=w2.url, timeout=60, limits=fresh_connections(64)) as ac:
            return await asyncio.gather(*[ac.post("/v1/answer", **form(img, q)) for img, q, _ in easy_vqa_samples])

    responses = asyncio.run(asyncio.wait_for(fire(), GUARD_S))
    for (_, q, expected), r in zip(easy_vqa_samples, responses):
        assert r.status_code == 200, r.text
        assert (r.json()["question"], r.json()["answer"]) == (q, expected)
    # Both front ends served (their event loops did work), one model process batched them.
    used = {p: thread_cpu_seconds(p).get(p, 0.0) - cpu0[p] for p in fronts}
    assert all(s > 0 for s in used.values()), used
    assert max(r.json()["timing"]["batch_size"] for r in responses) > 1
    text1 = httpx.get(w2.url + "/metrics").text
    # /metrics sums every process: the requests of both front ends, the model process's batches.
    n = len(easy_vqa_samples)
    assert metric(text1, "vqa_requests_total", route="/v1/answer", status="200") - \
        metric(text0, "vqa_requests_total", route="/v1/answer", status="200") == n
    batches = metric(text1, "vqa_batch_size_count") - metric(text0, "vqa_batch_size_count")
    images = metric(text1, "vqa_batch_size_sum") - metric(text0, "vqa_batch_size_sum")
    assert images == n and batches < n


def test_explain_is_refused_clearly_by_front_ends_and_plain_answers_still_work(w2, easy_vqa_samples):
    """explain=true is not carried to the model process yet (#12): a clear 501, never a 500."""
    img, q, expected = easy_vqa_samples[0]
    with httpx.Client(base_url=w2.url, timeout=30) as c:
        r = c.post("/v1/answer", **form(img, q, explain="true"))
        plain = c.post("/v1/answer", **form(img, q))
        text = c.get("/metrics").text
    assert r.status_code == 501 and r.json()["error"]["code"] == "explain_unavailable", r.text
    assert "VQA_WORKERS" in r.json()["error"]["message"]
    assert plain.status_code == 200 and plain.json()["answer"] == expected and "explanation" not in plain.json()
    assert metric(text, "vqa_explanations_total", outcome="unavailable") >= 1


def test_metrics_are_one_valid_exposition(w2):
    text = httpx.get(w2.url + "/metrics").text
    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names)), "a metric family appears twice"
    for gauge in ("vqa_queue_depth", "vqa_inflight_requests", "vqa_feature_cache_entries", "vqa_ready"):
        assert gauge in names
    assert metric(text, "vqa_ready") == 1


def test_cache_hit_rate_is_that_of_one_process(w2):
    """The same image on 20 new connections (spread over both front ends): one miss at most,
    then hits from the one feature cache in the model process."""
    img = png_bytes((17, 171, 71))
    before = httpx.get(w2.url + "/metrics").text
    cached = []
    with httpx.Client(base_url=w2.url, timeout=30, limits=fresh_connections(1)) as c:
        for _ in range(20):
            r = c.post("/v1/answer", **form(img, "what color is the shape?"))
            assert r.status_code == 200, r.text
            cached.append(r.json()["image_cached"])
    assert cached == [False] + [True] * 19
    after = httpx.get(w2.url + "/metrics").text
    hits = metric(after, "vqa_feature_cache_hits_total") - metric(before, "vqa_feature_cache_hits_total")
    assert hits == 19


def test_overload_503_and_deadline_504_then_recovery():
    settings = {"VQA_MAX_BATCH_SIZE": "1", "VQA_MAX_QUEUE": "1", "VQA_REQUEST_TIMEOUT_S": "1",
                "VQA_FEATURE_CACHE": "0"}
    with workers_server(settings) as srv:
        srv.delay_file.write_text("3")  # the device now takes 3 s a pass: past every deadline

        async def burst():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=fresh_connections(20)) as ac:
                tasks = [asyncio.ensure_future(ac.post("/v1/answer", **form(png_bytes((i, 9, 9)), "what shape")))
                         for i in range(20)]
                stalled = None
                async with httpx.AsyncClient(base_url=srv.url, timeout=10) as probe:
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:  # the forward pass runs past the timeout
                        r = await probe.get("/readyz")
                        if r.status_code == 503:
                            stalled = r.json()["detail"]
                            break
                        await asyncio.sleep(0.05)
                return await asyncio.gather(*tasks), stalled

        responses, stalled = asyncio.run(asyncio.wait_for(burst(), GUARD_S))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {503, 504}, statuses
        refused = [r for r in responses if r.status_code == 503]
        timed_out = [r for r in responses if r.status_code == 504]
        assert refused and timed_out, statuses
        for r in refused:  # at capacity; or, once the pass has run past the timeout, not ready
            assert r.json()["error"]["code"] in ("overloaded", "unavailable") and int(r.headers["retry-after"]) >= 1
        assert any(r.json()["error"]["code"] == "overloaded" for r in refused)
        for r in timed_out:
            assert r.json()["error"]["code"] == "timeout"
        assert stalled is not None and "stalled" in stalled
        text = httpx.get(srv.url + "/metrics").text
        assert sum(metric(text, "vqa_rejected_total", reason=why)
                   for why in ("overloaded", "queue_full", "unavailable")) == len(refused)
        assert metric(text, "vqa_inference_failures_total", kind="timeout") == len(timed_out)

        srv.delay_file.write_text("0")  # the device recovers: so does the server
        deadline = time.monotonic() + GUARD_S
        while httpx.get(srv.url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline, "not ready again"
            time.sleep(0.1)
        r = httpx.post(srv.url + "/v1/answer", timeout=30, **form(png_bytes(), "what shape"))
        assert r.status_code == 200, r.text

        # The model process dies: no request hangs, and the server exits non-zero (to be restarted).
        model = next(p for p, role in roles(srv).items() if role == "model")
        os.kill(model, signal.SIGKILL)
        try:
            r = httpx.post(srv.url + "/v1/answer", timeout=30, **form(png_bytes((5, 5, 5)), "what shape"))
            assert r.status_code == 503, r.text
        except httpx.TransportError:
            pass  # the front ends may already be gone
        assert srv.proc.wait(GUARD_S) == 1


def test_sigterm_drain_answers_every_admitted_request_then_exits_0():
    admitted_n, late_n = 30, 20
    settings = {"VQA_MAX_BATCH_SIZE": "1", "VQA_MAX_QUEUE": "64", "VQA_FEATURE_CACHE": "0",
                "VQA_SHUTDOWN_TIMEOUT_S": "60", "VQA_LOG_LEVEL": "info"}
    with workers_server(settings, delay_s=0.0) as srv:
        srv.delay_file.write_text("0.05")  # ~1.5 s of admitted work queued when the signal lands

        async def late_request(client: httpx.AsyncClient, i: int):
            await asyncio.sleep(0.025 * i)
            try:
                return await client.post("/v1/answer", **form(png_bytes((i, 1, 1)), "what shape"))
            except httpx.TransportError as e:
                return e

        async def scenario():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=fresh_connections(admitted_n)) as load, \
                    httpx.AsyncClient(base_url=srv.url, timeout=10) as probe, \
                    httpx.AsyncClient(base_url=srv.url, timeout=10, limits=fresh_connections(1)) as spread, \
                    httpx.AsyncClient(base_url=srv.url, timeout=30, limits=fresh_connections(late_n)) as late:
                tasks = [asyncio.create_task(load.post("/v1/answer", **form(png_bytes((i, 50, 50)), "what shape")))
                         for i in range(admitted_n)]
                deadline = time.monotonic() + 60
                # The shared in-flight gauge counts the requests of both front ends.
                while metric((await probe.get("/metrics")).text, "vqa_inflight_requests") < admitted_n:
                    assert time.monotonic() < deadline, "requests were not admitted"
                    await asyncio.sleep(0.01)
                srv.proc.send_signal(signal.SIGTERM)
                # "Late" means after the front ends have taken the signal (the supervisor passes
                # it on; a request that reaches a front end before it does is admitted, as in one
                # process before its signal handler runs). Each probe opens a new connection, so
                # the kernel hands it to either front end: ten refusals in a row leave a front end
                # not yet draining a 1-in-1024 chance per front end of going unseen.
                refused_in_a_row = 0
                while refused_in_a_row < 10:
                    assert time.monotonic() < deadline + 60, "the front ends did not start draining"
                    try:
                        ready = (await spread.get("/readyz")).status_code == 200
                    except httpx.TransportError:
                        ready = False  # past the grace period: no new connections at all
                    refused_in_a_row = 0 if ready else refused_in_a_row + 1
                late_results = await asyncio.gather(*[late_request(late, i) for i in range(late_n)])
                answered = await asyncio.gather(*tasks, return_exceptions=True)
                code = await asyncio.to_thread(srv.proc.wait, 90)
                return answered, late_results, code

        answered, late_results, code = asyncio.run(asyncio.wait_for(scenario(), GUARD_S))
        statuses = [getattr(r, "status_code", type(r).__name__) for r in answered]
        assert statuses == [200] * admitted_n
        for r in late_results:
            if isinstance(r, httpx.Response):
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "unavailable" and r.headers["retry-after"]
            else:
                assert isinstance(r, (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)), repr(r)
        assert code == 0
