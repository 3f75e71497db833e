"""The demo page (GET /), driven by a real headless Chromium against a real ``vqa-serve``:
upload and ask, samples, a readable error for a non-image, the heatmap toggle, unknown words
marked, phone width without sideways scrolling, keyboard use and labels.

Needs Debian's Chromium (``/usr/bin/chromium``, installed by .ci/run) and Playwright for Python
(the [test] extra); no browser is ever downloaded. Without Chromium it skips, saying so.
``VQA_DEMO_SCREENSHOT=docs/demo.png`` also writes the answering page's screenshot there (the
one in the README).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from bench.server import REPO, ServerProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (apt-get install chromium)")
SAMPLES = REPO / "app" / "static" / "samples"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server():
    with ServerProcess({"VQA_DEVICE": "cpu"}, ready_timeout_s=300) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # a fresh profile directory, nothing remembered between runs
        ctx = p.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("chromium-profile")),
                                                   executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield ctx
        finally:
            ctx.close()


@pytest.fixture
def page(browser, server):
    pg = browser.new_page()
    pg.set_default_timeout(60_000)
    pg.set_viewport_size({"width": 1100, "height": 820})
    pg.goto(server.url + "/")
    yield pg
    pg.close()


def _bars(page) -> list[tuple[str, float]]:
    out = []
    for li in page.query_selector_all("ul.bars li"):
        name = li.query_selector(".label").inner_text().strip()
        pct = float(li.query_selector(".pct").inner_text().strip().rstrip("%"))
        width = li.query_selector(".fill").evaluate("e => e.getBoundingClientRect().width / "
                                                    "e.parentElement.getBoundingClientRect().width")
        out.append((name, pct, width))
    return out


def _ask(page, question: str) -> str:
    page.fill("#question", question)
    page.press("#question", "Enter")  # Enter asks
    _wait_answered(page)
    return page.inner_text("#answer").split()[0]


def _wait_answered(page) -> None:
    page.wait_for_function("document.querySelector('#result').getAttribute('aria-busy') === 'false'")
    page.wait_for_selector("#answer")


def test_upload_ask_and_read_the_answer_and_bars(page, easy_vqa_samples, tmp_path):
    img, question, expected = easy_vqa_samples[0]
    f = tmp_path / "shape.png"
    f.write_bytes(img)
    page.set_input_files("#image", str(f))
    assert page.is_visible("#preview")
    assert _ask(page, question) == expected
    bars = _bars(page)
    assert len(bars) == 5 and bars[0][0] == expected
    pcts = [b[1] for b in bars]
    assert pcts == sorted(pcts, reverse=True) and pcts[0] > 50 and sum(pcts) <= 100.5
    assert abs(bars[0][2] - pcts[0] / 100) < 0.02  # the bar is as long as its percentage
    meta = page.inner_text("#meta")
    assert "batch of" in meta and "ms" in meta and "image features computed" in meta
    page.wait_for_function("document.querySelector('#heat').style.display === 'block'")
    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("VQA_DEMO_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["VQA_DEMO_SCREENSHOT"])
    # the same image again: its features come from the cache, and the page says so
    _ask(page, "what color is the shape?")
    page.wait_for_function("document.querySelector('#meta').innerText.includes('from the cache')")


def test_click_a_sample_then_ask(page):
    index = json.loads((SAMPLES / "index.json").read_text())
    assert len(index) == 12
    buttons = page.query_selector_all(".samples button")
    assert len(buttons) == 12
    sample = index[4]
    buttons[4].click()
    page.wait_for_function("document.querySelector('#preview').alt.startsWith('sample image')")
    assert page.get_attribute(".samples li:nth-child(5) button", "aria-pressed") == "true"
    assert page.input_value("#question")  # a suggested question is filled in for a first try
    assert _ask(page, "what shape is in the image?") == sample["shape"]
    page.click("#suggestions li:nth-child(2) button")  # "what colour is the shape?"
    _wait_answered(page)
    assert page.inner_text("#answer").split()[0] == sample["color"]


def test_a_non_image_gets_a_readable_error(page, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("this is not a picture\n")
    page.set_input_files("#image", str(f))
    page.fill("#question", "what shape is in the image?")
    page.click("#ask-button")
    err = page.wait_for_selector(".error")
    text = err.inner_text()
    assert "not an image" in text
    assert "{" not in text and "invalid_image" not in text and "request_id" not in text
    assert err.get_attribute("role") == "alert"


def test_heatmap_toggle(page):
    page.click(".samples li:nth-child(1) button")
    page.wait_for_function("document.querySelector('#preview').alt.startsWith('sample image')")
    page.uncheck("#show-heat")
    _ask(page, "what shape is in the image?")
    assert page.eval_on_selector("#heat", "c => c.style.display") == "none"
    assert page.query_selector(".legend") is None  # asked without explain
    page.check("#show-heat")  # switching it on fetches the heatmap for the same question
    _wait_answered(page)
    page.wait_for_selector(".legend")
    page.wait_for_function("document.querySelector('#heat').style.display === 'block'")
    assert "8×8" in page.inner_text(".legend")
    # drawn, and not uniform: the hottest and the coolest pixels differ
    spread = page.eval_on_selector("#heat", """c => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let lo = 255, hi = 0;
        for (let i = 1; i < d.length; i += 4) { lo = Math.min(lo, d[i]); hi = Math.max(hi, d[i]); }
        return hi - lo; }""")
    assert spread > 50
    page.uncheck("#show-heat")
    assert page.eval_on_selector("#heat", "c => c.style.display") == "none"
    page.check("#show-heat")
    assert page.eval_on_selector("#heat", "c => c.style.display") == "block"


def test_unknown_words_are_marked_with_a_tooltip(page):
    page.click(".samples li:nth-child(2) button")
    page.wait_for_function("document.querySelector('#preview').alt.startsWith('sample image')")
    _ask(page, "Please tell me, is there a rectangle?")
    marks = page.query_selector_all(".asked mark")
    assert [m.inner_text() for m in marks] == ["Please", "tell", "me"]
    assert "not in the model's training vocabulary" in marks[0].get_attribute("title")


def test_phone_width_does_not_scroll_sideways(page):
    page.set_viewport_size({"width": 375, "height": 800})
    page.reload()
    page.click(".samples li:nth-child(3) button")
    page.wait_for_function("document.querySelector('#preview').alt.startsWith('sample image')")
    _ask(page, "please tell me, what colour would you say the shape is in this picture?")
    page.wait_for_selector("ul.bars li")
    widths = page.evaluate("[document.documentElement.scrollWidth, document.body.scrollWidth, window.innerWidth]")
    assert max(widths[:2]) <= widths[2] == 375
    assert page.eval_on_selector("#drop", "e => e.getBoundingClientRect().right") <= 375


def test_keyboard_only_and_every_control_labelled(page):
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, button, select, textarea')]
        .filter(e => {
            const name = (e.labels && e.labels.length ? [...e.labels].map(l => l.innerText).join(' ') : '')
                || e.getAttribute('aria-label') || e.innerText || '';
            return !name.trim();
        }).map(e => e.outerHTML.slice(0, 80))""")
    assert unlabelled == []
    assert page.get_attribute("#result", "aria-live") == "polite"
    # Tab from the top: the file picker, the samples, the question box, Ask are all reachable.
    seen = []
    page.focus("body")
    for _ in range(40):
        page.keyboard.press("Tab")
        seen.append(page.evaluate("document.activeElement.id || document.activeElement.getAttribute('aria-label') "
                                  "|| document.activeElement.innerText"))
    assert "image" in seen and "question" in seen and "ask-button" in seen and "show-heat" in seen
    assert any(s and s.startswith("Use sample image") for s in seen)
    # choose a sample and ask with the keyboard alone
    page.focus(".samples li:nth-child(6) button")
    page.keyboard.press("Enter")
    page.wait_for_function("document.activeElement.id === 'question'")  # focus moves on to the question
    page.keyboard.press("Control+A")
    page.keyboard.type("what shape is in the image?")
    page.keyboard.press("Enter")
    _wait_answered(page)
    index = json.loads((SAMPLES / "index.json").read_text())
    assert page.inner_text("#answer").split()[0] == index[5]["shape"]
