"""A real browser uses the app: Debian's chromium, driven by playwright, on each tab and on a bad upload.

Screenshots go to test-artifacts/ (gitignored) and are copied to docs/screenshots/ for the README. Without
chromium or playwright the tests skip locally and fail on CI (env CI set), where they must run.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from app_server import serve
from upload_cases import write_broken_files

from demo.service import InferenceService

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


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install -r requirements-dev.txt)")
    if not CHROMIUM.exists():
        _missing(f"chromium is not at {CHROMIUM} (sudo apt-get install -y chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    service = InferenceService.from_checkpoint(None)
    try:
        with serve(service) as local_url:
            yield local_url
    finally:
        service.close()


@pytest.fixture
def page(browser, url: str):
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
    assert saved[0] == "file,top-1,confidence,top-k,error" and len(saved) == len(files) + 1


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
    """Save under test-artifacts/ and refresh the README's copy in docs/screenshots/."""
    ARTIFACTS.mkdir(exist_ok=True)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    shutil.copyfile(path, SCREENSHOTS / f"{name}.png")


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"browser tests must run on CI: {reason}")
    pytest.skip(reason)
