"""Tests for demo/detect_tab.py and demo/segment_tab.py: handlers called directly, then a real Gradio server.

The service runs randomly initialised torchvision models of the real architectures, saved as local weight
files (tests/vision_models.py), so everything is offline and nothing is mocked. The browser drives both tabs
in the full app, in tests/test_browser.py.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from conftest import photo
from gradio_uploads import as_upload
from PIL import Image
from vision_models import SIZE, offline_vision, random_vision_service

from demo import detect_tab, segment_tab
from demo.vision_tasks import VisionService
from demo.vision_weights import DEFAULT_MODEL, SPECS


@pytest.fixture(scope="module")
def vision(tmp_path_factory: pytest.TempPathFactory) -> VisionService:
    return random_vision_service(tmp_path_factory.mktemp("tab_weights"))


@pytest.fixture(scope="module")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tab_images") / "astronaut.jpg"
    photo("astronaut").resize(SIZE).save(path, quality=95)
    return path


@pytest.fixture(autouse=True)
def download_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the JSON downloads of each test in its own folder."""
    monkeypatch.setattr(detect_tab, "DOWNLOAD_DIR", tmp_path / "downloads")
    return tmp_path / "downloads"


def test_detect_handler_returns_image_table_json_and_state(vision, image_path, download_dir):
    annotated, rows, json_path, result = detect_tab.detect(vision, as_upload(image_path), 0.0)

    assert annotated.size == SIZE
    assert len(rows) == len(result.detections) > 0
    assert all(len(row) == len(detect_tab.TABLE_HEADERS) for row in rows)
    assert rows[0][0] == result.detections[0].label and rows[0][1] == round(result.detections[0].score, 3)
    assert Path(json_path).parent == download_dir
    assert json.loads(Path(json_path).read_text()) == json.loads(json.dumps(result.as_dict()))


def test_detect_handler_accepts_gradio_payloads_and_data_urls(vision, image_path):
    from_payload = detect_tab.detect(vision, as_upload(image_path), 0.5)
    png = io.BytesIO()
    Image.open(image_path).save(png, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    from_url = detect_tab.detect(vision, {"path": None, "url": data_url}, 0.5)

    assert from_payload[0].size == from_url[0].size == SIZE


def test_threshold_slider_refilters_the_last_result(vision, image_path):
    *_, result = detect_tab.detect(vision, as_upload(image_path), 0.0)

    annotated, rows, _, moved = detect_tab.rethreshold(result, 1.0)
    assert rows == [] and moved.threshold == 1.0
    assert np.array_equal(np.asarray(annotated), np.asarray(Image.open(image_path).convert("RGB")))
    assert len(detect_tab.rethreshold(moved, 0.0)[1]) == len(result.detections)
    assert detect_tab.rethreshold(None, 0.5) == gr.skip()


def test_handlers_turn_bad_input_into_a_readable_gr_error(vision, tmp_path):
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"<html>not a photo</html>")
    for handler in (detect_tab.detect, segment_tab.segment):
        with pytest.raises(gr.Error, match="not an image PIL can read"):
            handler(vision, as_upload(bad), 0.5)
        with pytest.raises(gr.Error, match="no image; upload a photo"):
            handler(vision, None, 0.5)
    with pytest.raises(gr.Error, match="threshold must be a number from 0 to 1, got 1.5"):
        detect_tab.detect(vision, photo("coffee").resize(SIZE), 1.5)


def test_segment_handler_overlay_legend_and_opacity(vision, image_path):
    overlay, legend, result = segment_tab.segment(vision, as_upload(image_path), 0.6)

    assert overlay.size == SIZE
    for share in result.legend:
        assert f"{share.label}: {share.share * 100:.1f}%" in legend
        assert f"rgb{share.color}" in legend
    assert np.array_equal(np.asarray(segment_tab.recolor(result, 0.0)), np.asarray(result.image))
    assert segment_tab.recolor(None, 0.5) == gr.skip()
    with pytest.raises(gr.Error, match="opacity"):
        segment_tab.recolor(result, 7)


def test_tabs_explain_missing_weights_in_the_page_and_on_use(tmp_path, image_path):
    vision = offline_vision(tmp_path)
    with gr.Blocks() as demo:
        with gr.Tab("Detect"):
            detect_tab.build(vision)
        with gr.Tab("Segment"):
            segment_tab.build(vision)
    texts = [block.value for block in demo.blocks.values() if isinstance(block, gr.Markdown)]

    for task, handler in (("detector", detect_tab.detect), ("segmenter", segment_tab.segment)):
        file_name = SPECS[task][DEFAULT_MODEL[task]].file_name
        shown = [text for text in texts if file_name in text]
        assert len(shown) == 1 and "unavailable" in shown[0] and "VISION_TABS=off" in shown[0]
        assert str(tmp_path) not in shown[0] and "…/weights" in shown[0]  # no server path for visitors
        with pytest.raises(gr.Error, match=file_name):
            handler(vision, as_upload(image_path), 0.5)


def test_json_downloads_are_pruned(vision, image_path, download_dir, monkeypatch):
    monkeypatch.setattr(detect_tab, "MAX_DOWNLOADS", 3)
    *_, result = detect_tab.detect(vision, as_upload(image_path), 0.0)
    for threshold in np.linspace(0.0, 1.0, 6):
        detect_tab.write_download(result.with_threshold(float(threshold)))
    assert len(list(download_dir.glob("detections-*.json"))) == 3


@pytest.mark.app
def test_real_server_serves_detect_and_segment_by_api_name(vision, image_path, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not a png")
    with gr.Blocks() as demo:
        with gr.Tab("Detect"):
            detect_tab.build(vision)
        with gr.Tab("Segment"):
            segment_tab.build(vision)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {
            "/detect",
            "/segment",
        }

        annotated, table, json_path = client.predict(handle_file(str(image_path)), 0.0, api_name="/detect")
        assert Image.open(annotated).size == SIZE
        assert len(table["data"]) == len(json.loads(Path(json_path).read_text())["detections"]) > 0
        _, strict_table, _ = client.predict(handle_file(str(image_path)), 1.0, api_name="/detect")
        assert strict_table["data"] == []

        overlay, legend = client.predict(handle_file(str(image_path)), 0.5, api_name="/segment")
        assert Image.open(overlay).size == SIZE and "%" in legend

        for api_name, value in (("/detect", 0.5), ("/segment", 0.5)):
            with pytest.raises(AppError, match="not an image PIL can read"):
                client.predict(handle_file(str(bad)), value, api_name=api_name)
    finally:
        demo.close()
