"""A real browser teaches two classes from chromium's fake camera, trains, and watches the live preview.

The browser, the chromium launch (with `--use-fake-device-for-media-stream --use-fake-ui-for-media-stream`)
and the screenshot helper are `test_browser`'s. The server trains the real embedded model on the captured
frames. Chromium's fake camera shows one synthetic scene (a moving circle and a frame counter), so both
classes see the same kind of image: the test checks the flow (bursts land in the right class, training ends
with a model, the preview labels every frame with the new classes and updates), not how well it tells them
apart.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import pytest
from app_server import studio_with_training
from test_browser import TIMEOUT_MS, VIEWPORT, browser, screenshot  # noqa: F401 (browser is a fixture)

from demo.teach_actions import SHOWN_THUMBNAILS
from demo.teach_tab import store_root
from demo.training_jobs import TrainingManager

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, TrainingManager]]:
    with studio_with_training(tmp_path_factory.mktemp("teach-browser") / "studio-data") as served:
        yield served


def counts(page) -> dict[str, int]:
    text = page.locator("#teach-counts").inner_text()
    return {name: int(n) for name, n in re.findall(r'"([^"]+)"\s*:\s*(\d+)', text)} if text else {}


def start_camera(page, elem_id: str) -> None:
    """Grant the fake camera to a streaming image and press its Record button (the stream starts)."""
    camera = page.locator(f"#{elem_id}")
    camera.get_by_text("Click to Access Webcam").click()
    page.wait_for_function(
        f"() => {{ const video = document.querySelector('#{elem_id} video');"
        " return video !== null && video.readyState >= 2 && video.videoWidth > 0; }"
    )
    camera.get_by_label("capture photo").click()


BURST_S = 5  # long enough that a loaded 2-core machine still streams a few frames into it
MIN_FRAMES = 3


def capture_burst(page, name: str) -> None:
    """Pick class `name`, capture a BURST_S burst, wait for its first frames, then for the burst to end."""
    menu = page.locator("#teach-target input")
    menu.click()
    page.get_by_role("option", name=name, exact=True).click()
    page.locator("#teach-seconds input[type=number]").fill(str(BURST_S))
    page.locator("#teach-seconds input[type=number]").press("Enter")
    page.locator("#teach-record").click()
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while counts(page).get(name, 0) < MIN_FRAMES and time.monotonic() < deadline:
        page.wait_for_timeout(250)
    shown = page.locator("#teach-recording").inner_text()
    assert counts(page).get(name, 0) >= MIN_FRAMES, (name, counts(page), shown)
    page.wait_for_timeout(BURST_S * 1000 + 500)  # the rest of the burst


def test_teach_two_classes_from_the_fake_camera_train_and_see_the_live_preview_update(
    browser,  # noqa: F811 (the imported fixture)
    served: tuple[str, TrainingManager],
) -> None:
    from playwright.sync_api import expect

    url, manager = served

    expect.set_options(timeout=TIMEOUT_MS)
    context = browser.new_context(viewport={**VIEWPORT, "height": 2200}, permissions=["camera"])
    page = context.new_page()
    try:
        page.goto(url)
        page.get_by_role("tab", name="Teach").click()
        for name in ("thumbs up", "open hand"):
            page.locator("#teach-class-name textarea").fill(name)
            page.locator("#teach-add-class").click()
            expect(page.locator("#teach-counts")).to_contain_text(name)
        start_camera(page, "teach-camera")
        capture_burst(page, "thumbs up")
        capture_burst(page, "open hand")
        page.locator("#teach-camera").get_by_label("capture photo").click()  # stop the capture stream
        expect(page.locator("#teach-camera")).to_contain_text("Record")
        captured = counts(page)
        assert set(captured) == {"thumbs up", "open hand"}
        assert all(MIN_FRAMES <= n <= BURST_S * 5 + 1 for n in captured.values()), captured  # <= 5 frames/s
        # the gallery shows the newest SHOWN_THUMBNAILS of the class (a 5 s burst can bring up to 26)
        shown = min(captured["open hand"], SHOWN_THUMBNAILS)
        expect(page.locator("#teach-gallery img")).to_have_count(shown)

        page.locator("#teach-train").click()
        expect(page.locator("#teach-progress [data-state=done]")).to_be_visible()
        run_id = page.locator("#teach-run-id textarea").input_value()
        expect(page.locator("#teach-metrics")).to_contain_text("val_top1")
        expect(page.locator("#teach-download a")).to_have_attribute("download", f"{run_id}.zip")
        expect(page.locator("#teach-publish")).to_contain_text(f"python -m finetune.publish {run_id}")
        expect(page.locator("#model-menu input")).to_have_value(run_id)  # the session's model now

        start_camera(page, "live-camera")
        label = page.locator("#live-label")
        expect(label).to_contain_text(re.compile("thumbs up|open hand"))
        expect(page.locator("#live-rate")).to_contain_text(re.compile(r"\d+\.\d frames/s"))
        seen = set()
        deadline = time.monotonic() + TIMEOUT_MS / 1000  # a loaded 2-core machine answers frames slowly
        while len(seen) < 3 and time.monotonic() < deadline:
            seen.add(label.inner_text())  # the fake scene moves: the probabilities change frame by frame
            page.wait_for_timeout(300)
        assert len(seen) >= 3, seen
        expect(page.locator(".toast-body")).to_have_count(0)
        screenshot(page, "teach")
        print(json.dumps({"captured": captured, "rate": page.locator("#live-rate").inner_text()}))
    finally:
        context.close()
    sessions = store_root(manager)
    for _ in range(60):  # the page closed: Gradio's unload (heartbeat gone) drops the session's images
        if not any(sessions.iterdir()):
            break
        time.sleep(1)
    assert not any(sessions.iterdir())
