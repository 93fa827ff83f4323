"""The web page at / on the HTTP port, in a real browser: headless Chromium (Debian's `chromium`)
driven by playwright. It loads the page, picks a PNG, waits for the answer and checks the rendered
top-1 label against the gRPC answer for the same image, the timing breakdown, the latency panel
and the model list; a screenshot lands in the test's temp dir."""
from __future__ import annotations

import importlib.util
import shutil

import grpc
import pytest

from serve._proto.zoo.serving.v1 import classifier_pb2 as pb
from serve._proto.zoo.serving.v1 import classifier_pb2_grpc as pb_grpc
from tests.serve.conftest import SERVE_MODELS, png_bytes, random_image, running

MODEL = "resnext_mini"
INSTALL = "apt-get install -y chromium && pip install playwright"
WAIT_MS = 60_000  # generous: only a hang fails it


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None or importlib.util.find_spec("playwright") is None:
        pytest.skip(f"headless Chromium and playwright are needed for the web page test: {INSTALL}")
    return path


def test_page_classifies_a_png_like_grpc(repo, tmp_path):
    browser_path = chromium()
    from playwright.sync_api import sync_playwright

    image = png_bytes(random_image(11, 48, 40))
    (tmp_path / "digit.png").write_bytes(image)
    with running(repo, http_port=0) as (server, port):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            want = pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(image=image, model=MODEL, top_k=5))
        url = f"http://127.0.0.1:{server.http_port}"
        with sync_playwright() as p:
            # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
            browser = p.chromium.launch(executable_path=browser_path, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                requested, errors = [], []
                page.on("request", lambda r: requested.append(r.url))
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.goto(url + "/", wait_until="load", timeout=WAIT_MS)
                page.wait_for_function("document.querySelectorAll('#model option').length === 2", timeout=WAIT_MS)
                page.select_option("#model", f"{MODEL}:1")
                page.set_input_files("#file", str(tmp_path / "digit.png"))
                top1 = page.locator('#classes li[data-rank="1"] .label')
                top1.wait_for(timeout=WAIT_MS)
                assert top1.inner_text() == want.classes[0].label
                shown = page.locator("#classes .label").all_inner_texts()
                assert shown == [c.label for c in want.classes]
                parts = page.locator("#timing tr").evaluate_all("rows => rows.map(r => r.dataset.part)")
                assert parts == ["decode", "preprocess", "queue", "inference", "total"]
                assert page.locator("#served-by").inner_text().startswith(f"{MODEL}:1 on ")
                page.locator(f'#latency tr[data-model="{MODEL}"]').wait_for(timeout=WAIT_MS)
                models = page.locator("#models tbody tr td:first-child").all_inner_texts()
                assert sorted(models) == sorted(SERVE_MODELS)
                page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            finally:
                browser.close()
    assert (tmp_path / "page.png").stat().st_size > 0
    assert errors == []
    fetched = [u for u in requested if not u.startswith(("blob:", "data:"))]  # the preview, the favicon: local
    assert fetched and all(u.startswith(url + "/") for u in fetched), fetched  # nothing from elsewhere: no CDN
