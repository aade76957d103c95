"""A real browser uses the full app: Debian's chromium, driven by playwright, on each tab and on bad input.

The app is the one `app.build_app` builds, with the embedded ImageNet classifier and the Detect and Segment
tabs on random-init torchvision models of the real architectures (tests/vision_models.py): their boxes and
classes are arbitrary, the page around them is real. Screenshots always go to test-artifacts/ (gitignored);
with STUDIO_UPDATE_SCREENSHOTS=1 they also replace the README's copies in docs/screenshots/. Without chromium
or playwright the tests skip locally and fail on CI (env CI set), where they must run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from app_server import serve
from upload_cases import write_broken_files
from vision_models import random_vision_service

import app
from demo.service import InferenceService
from demo.vision_weights import (
    DEFAULT_MODEL,
    ENV_DOWNLOAD,
    ENV_MODEL,
    ENV_TABS,
    ENV_WEIGHTS,
    ENV_WEIGHTS_DIR,
    SPECS,
)

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "demo" / "examples"
ARTIFACTS = ROOT / "test-artifacts"
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--use-fake-device-for-media-stream",  # a synthetic webcam, so the webcam source can be tested
    "--use-fake-ui-for-media-stream",
]
VIEWPORT = {"width": 1280, "height": 900}
CAT = re.compile("tiger cat|Egyptian cat|tabby")
TIMEOUT_MS = 60_000  # a shared 2-core CI machine can be slow to run Grad-CAM at four scales
UPDATE_SCREENSHOTS = os.environ.get("STUDIO_UPDATE_SCREENSHOTS") == "1"
# Detect/Segment run random-init models here: their pictures stay in test-artifacts/ and never reach the
# README, which must not show random-weight output as if it were a model's answer.
RANDOM_WEIGHT_SHOTS = {"detect", "segment"}


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install -r requirements-dev.txt)")
    if not CHROMIUM.exists():
        _missing(f"chromium is not at {CHROMIUM} (as root: apt-get install -y chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def url(service: InferenceService, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The full app, Detect and Segment tabs included."""
    vision = random_vision_service(tmp_path_factory.mktemp("vision_weights"))
    with serve(service, vision) as local_url:
        yield local_url


@pytest.fixture
def page(browser, url: str):
    with open_page(browser, url) as page:
        yield page


@contextmanager
def open_page(browser, url: str):
    """A fresh browser context (own cookies, camera allowed) on `url`, closed afterwards."""
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    context = browser.new_context(viewport=VIEWPORT, permissions=["camera"])
    page = context.new_page()
    page.goto(url)
    try:
        yield page
    finally:
        context.close()


def test_classify_tab_shows_a_cat_for_chelsea(page) -> None:
    from playwright.sync_api import expect

    page.locator("#classify-image input[type=file]").set_input_files(EXAMPLES / "chelsea.jpg")
    page.locator("#classify-button").click()
    expect(page.locator("#classify-label")).to_contain_text(CAT)
    expect(page.locator("#classify-latency")).to_contain_text(re.compile(r"Answered in \d+ ms"))
    expect(page.locator("#classify-model-card")).to_contain_text("tf_efficientnet_lite0")
    screenshot(page, "classify")


def test_classify_tab_takes_a_webcam_photo(page) -> None:
    from playwright.sync_api import expect

    page.locator("#classify-image").get_by_label("Capture from camera").click()
    page.get_by_text("Click to Access Webcam").click()
    page.wait_for_function(
        "() => { const video = document.querySelector('#classify-image video');"
        " return video !== null && video.readyState >= 2 && video.videoWidth > 0; }"
    )
    page.locator("#classify-image").get_by_label("capture photo").click()
    expect(page.locator("#classify-image img")).to_be_visible()  # the capture, uploaded as a file
    page.locator("#classify-button").click()
    expect(page.locator("#classify-label")).to_contain_text(re.compile(r"\d+%"))
    expect(page.locator(".toast-body")).to_have_count(0)


def test_explain_tab_shows_both_heatmaps(page) -> None:
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Explain").click()
    page.locator("#explain-image input[type=file]").set_input_files(EXAMPLES / "chelsea.jpg")
    page.locator("#explain-button").click()
    expect(page.locator("#explain-caption")).to_contain_text(CAT)
    for output in ("#explain-single img", "#explain-multi img"):
        heatmap = page.locator(output)
        expect(heatmap).to_be_visible()
        heatmap.evaluate("image => image.decode()")  # wait for the heatmap's pixels, not just the tag
        assert heatmap.evaluate("image => image.naturalWidth") == 448
    screenshot(page, "explain")
    before = page.locator("#explain-single img").get_attribute("src")
    page.locator("#explain-opacity input[type=number]").fill("0.9")
    page.locator("#explain-opacity input[type=number]").press("Enter")
    expect(page.locator("#explain-single img")).not_to_have_attribute("src", before)  # re-blended


def test_batch_tab_fills_one_row_per_file(page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    broken = write_broken_files(tmp_path)["not_an_image.jpg"]
    files = [EXAMPLES / f"{name}.jpg" for name in ("chelsea", "coffee", "astronaut", "rocket")] + [broken]
    page.get_by_role("tab", name="Batch").click()
    page.locator("#batch-files input[type=file]").set_input_files(files)
    page.locator("#batch-button").click()
    rows = page.locator("#batch-table").get_by_role("row")
    expect(rows).to_have_count(len(files) + 1)  # a header row, then one per file
    expect(rows.nth(1)).to_contain_text(CAT)
    expect(rows.nth(len(files))).to_contain_text("not an image")
    screenshot(page, "batch")
    with page.expect_download() as download:
        page.locator("#batch-csv a[href$='predictions.csv']").click()
    saved = Path(download.value.path()).read_text().splitlines()
    assert saved[0] == "file,top-1,confidence,top-k,error,ood_score,unknown" and len(saved) == len(files) + 1


def test_detect_tab_draws_boxes_lists_them_and_offers_json(page) -> None:
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Detect").click()
    expect(page.locator("#detect-status")).to_contain_text("weights from file")
    page.locator("#detect-image input[type=file]").set_input_files(EXAMPLES / "astronaut.jpg")
    page.locator("#detect-button").click()
    annotated = page.locator("#detect-annotated img")
    expect(annotated).to_be_visible()
    annotated.evaluate("image => image.decode()")
    assert annotated.evaluate("image => image.naturalWidth") == 480  # boxes drawn on the 480 px photo itself
    first_row = page.locator("#detect-table tbody tr").first
    expect(first_row).to_contain_text(re.compile(r"\d\.\d"))
    with page.expect_download() as download:
        page.locator("#detect-json a[href$='.json']").click()
    saved = json.loads(Path(download.value.path()).read_text())
    assert saved["threshold"] == 0.5 and saved["image_size"] == [480, 480]
    assert saved["detections"] and all(entry["score"] >= 0.5 for entry in saved["detections"])
    expect(first_row).to_contain_text(saved["detections"][0]["label"])
    screenshot(page, "detect")


def test_segment_tab_shows_an_overlay_and_a_legend_of_class_shares(page) -> None:
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Segment").click()
    expect(page.locator("#segment-status")).to_contain_text("weights from file")
    page.locator("#segment-image input[type=file]").set_input_files(EXAMPLES / "astronaut.jpg")
    page.locator("#segment-button").click()
    overlay = page.locator("#segment-overlay img")
    expect(overlay).to_be_visible()
    overlay.evaluate("image => image.decode()")
    assert overlay.evaluate("image => image.naturalWidth") == 480
    entries = page.locator("#segment-legend li")
    expect(entries.first).to_have_text(re.compile(r"^[\w ]+: \d+\.\d%$"))
    shares = [float(text.rsplit(": ", 1)[1].rstrip("%")) for text in entries.all_inner_texts()]
    assert sum(shares) == pytest.approx(100.0, abs=0.1 * len(shares))  # every pixel has exactly one class
    swatch = entries.first.locator("span").evaluate("span => getComputedStyle(span).backgroundColor")
    assert swatch.startswith("rgb(")
    screenshot(page, "segment")


def test_without_weights_the_detect_tab_says_which_file_to_place(
    browser, service: InferenceService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default app, offline, nothing in the torch hub cache: the tab explains, and so does a click."""
    from playwright.sync_api import expect

    for name in (ENV_TABS, ENV_WEIGHTS_DIR, ENV_DOWNLOAD, *ENV_WEIGHTS.values(), *ENV_MODEL.values()):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache, whatever this machine holds
    vision = app.create_vision_service(app.get_parser().parse_args([]))
    assert not vision.config.allow_download  # HF_HUB_OFFLINE=1 (tests/conftest.py) means no download
    file_name = SPECS["detector"][DEFAULT_MODEL["detector"]].file_name
    with serve(service, vision) as local_url, open_page(browser, local_url) as page:
        page.get_by_role("tab", name="Detect").click()
        status = page.locator("#detect-status")
        expect(status).to_contain_text("Detection is unavailable")
        expect(status).to_contain_text(file_name)
        expect(status).to_contain_text(f"{ENV_TABS}=off")
        page.locator("#detect-image input[type=file]").set_input_files(EXAMPLES / "astronaut.jpg")
        page.locator("#detect-button").click()
        expect(page.locator(".toast-body")).to_contain_text(file_name)


def test_bad_upload_shows_a_message_and_the_next_photo_works(page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    broken = write_broken_files(tmp_path)["truncated.jpg"]
    page.locator("#classify-image input[type=file]").set_input_files(broken)
    page.locator("#classify-button").click()
    toast = page.locator(".toast-body")
    expect(toast).to_contain_text("'truncated.jpg' could not be decoded")
    expect(toast).to_be_visible()
    page.wait_for_timeout(800)  # let the toast finish sliding in before the screenshot
    screenshot(page, "error")
    toast.get_by_role("button").first.click()  # close it, as a visitor would
    page.locator("#classify-image").get_by_label("Remove Image").click()
    page.locator("#classify-image input[type=file]").set_input_files(EXAMPLES / "chelsea.jpg")
    page.locator("#classify-button").click()
    expect(page.locator("#classify-label")).to_contain_text(CAT)


def screenshot(page, name: str) -> None:
    """Save under test-artifacts/; with STUDIO_UPDATE_SCREENSHOTS=1 also refresh the README's copy.

    Tracked files are only rewritten on request, so an ordinary test run leaves the checkout clean.
    """
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if UPDATE_SCREENSHOTS and name not in RANDOM_WEIGHT_SHOTS:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SCREENSHOTS / f"{name}.png")


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"browser tests must run on CI: {reason}")
    pytest.skip(reason)
