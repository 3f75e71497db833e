"""Swagger UI, driven by a real headless Chromium: open /docs, Try it out, choose an image
file, type a question, Execute, read the answer. Proves the upload form works (the schema's
binary field renders as a file picker) with the locally served assets (no CDN).

Needs Chromium (Debian package `chromium`, which .ci/run installs) and the playwright package
(the [test] extra); without Chromium it skips, saying so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.server import ServerProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OP = "#operations-answer-answer_v1_answer_post"


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (apt-get install chromium)")
def test_swagger_ui_upload_form_answers(tmp_path: Path, easy_vqa_samples):
    from playwright.sync_api import sync_playwright

    img, question, expected = easy_vqa_samples[0]
    image_file = tmp_path / "shape.png"
    image_file.write_bytes(img)
    with ServerProcess({"VQA_DEVICE": "cpu"}) as srv, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.goto(srv.url + "/docs")
            page.click(f"{OP} .opblock-summary")
            page.click(f"{OP} button.try-out__btn")
            page.set_input_files(f"{OP} tr[data-property-name=image] input[type=file]", str(image_file))
            page.fill(f"{OP} tr[data-property-name=question] input", question)
            page.click(f"{OP} button.execute")
            status = page.wait_for_selector(f"{OP} .live-responses-table tbody .response-col_status")
            assert status.inner_text().strip() == "200"
            body = json.loads(page.inner_text(f"{OP} .live-responses-table tbody .response-col_description pre"))
        finally:
            browser.close()
    assert body["question"] == question
    assert body["answer"] == expected
