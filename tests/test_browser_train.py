"""A real browser trains new classes: upload a zip, watch the progress, read the metrics, classify with it.

The browser, the chromium launch and the screenshot helper are `test_browser`'s; the server here also has the
Train tab and trains the real default model (embedded weights) for three epochs on two photo classes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from app_server import studio_with_training
from test_browser import TIMEOUT_MS, VIEWPORT, browser, screenshot  # noqa: F401 (browser is a fixture)
from train_data import held_out_image, photo_zip

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with studio_with_training(tmp_path_factory.mktemp("browser") / "studio-data") as (local_url, _):
        yield local_url


def test_train_tab_trains_shows_progress_and_the_new_model_classifies(
    browser,  # noqa: F811 (the imported fixture)
    url: str,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    context = browser.new_context(viewport={**VIEWPORT, "height": 1400})
    page = context.new_page()
    try:
        page.goto(url)
        page.get_by_role("tab", name="Train").click()
        zip_path = photo_zip(tmp_path, per_class=10, size=160)
        page.locator("#train-zip input[type=file]").set_input_files(zip_path)
        page.locator("#train-epochs-option input").fill("3")
        page.locator("#train-start").click()
        expect(page.locator("#train-progress [data-state=running]")).to_be_visible()  # the live bar
        expect(page.locator("#train-progress [data-state=done]")).to_be_visible()
        expect(page.locator("#train-progress")).to_contain_text("100%")
        expect(page.locator(".toast-body")).to_have_count(0)  # nothing else ran: no queue message
        rows = page.locator("#train-epochs").get_by_role("row")
        expect(rows).to_have_count(5)  # header, the linear probe (epoch 0), fine-tuning epochs 1-3
        expect(page.locator("#train-curves img")).to_be_visible()
        expect(page.locator("#train-data-check")).to_contain_text("Data check of 20 images")  # issue 15
        expect(page.locator("#train-metrics")).to_contain_text("val_top1")
        run_id = page.locator("#train-run-id textarea").input_value()
        note = page.locator("#train-result")
        expect(note).to_contain_text(re.compile(r"Validation top-1 of the kept model: \d+\.\d%"))
        expect(note).to_contain_text(f"The model {run_id} is now in the Model menu")
        expect(page.locator("#train-download a")).to_have_attribute("download", f"{run_id}.zip")
        page.wait_for_timeout(500)  # let the curves image settle before the screenshot
        screenshot(page, "train")

        menu = page.locator("#model-menu input")
        menu.click()
        page.get_by_role("option", name=run_id).click()
        expect(menu).to_have_value(run_id)
        page.get_by_role("tab", name="Classify").click()
        expect(page.locator("#classify-model-card")).to_contain_text(run_id)
        held_out = held_out_image("cat", tmp_path / "held_out_cat.jpg", 160)
        page.locator("#classify-image input[type=file]").set_input_files(held_out)
        page.locator("#classify-button").click()
        expect(page.locator("#classify-label")).to_contain_text("cat")
        expect(page.locator("#classify-label")).to_contain_text("coffee")  # the run's two classes, no others

        page.reload()  # a new session; the browser's remembered token still owns the run
        menu = page.locator("#model-menu input")
        menu.click()
        expect(page.get_by_role("option", name=run_id)).to_be_visible()
        stranger = browser.new_context(viewport=VIEWPORT).new_page()  # another visitor: own storage
        stranger.goto(url)
        stranger.locator("#model-menu input").click()
        expect(stranger.get_by_role("option").first).to_be_visible()
        expect(stranger.get_by_role("option", name=run_id)).to_have_count(0)
        stranger.context.close()
    finally:
        context.close()


def test_class_names_mode_offers_one_labelled_upload_per_class(
    browser,  # noqa: F811 (the imported fixture)
    url: str,
) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    try:
        page.goto(url)
        page.get_by_role("tab", name="Train").click()
        expect(page.locator("#train-class-names")).to_be_hidden()
        page.get_by_label("Class names + images").check()
        expect(page.locator("#train-zip")).to_be_hidden()
        page.locator("#train-class-names textarea").fill("cat, coffee, rocket")
        expect(page.locator("#train-class-files-2")).to_be_visible()
        expect(page.locator("#train-class-files-2")).to_contain_text("Images of 'rocket'")
        expect(page.locator("#train-class-files-0")).to_contain_text("Images of 'cat'")
        expect(page.locator("#train-class-files-3")).to_be_hidden()
    finally:
        context.close()
