"""Tab handlers and the shared Gradio boundary, called on plain values without a server (tiny real run)."""

from __future__ import annotations

import base64
import csv
from dataclasses import replace
from pathlib import Path

import gradio as gr
import pytest
from conftest import photo
from gradio_uploads import as_upload, upload_copy
from upload_cases import write_broken_files

from demo import batch_tab, classify_tab, explain_tab
from demo.service import InferenceService
from demo.ui import NOT_AN_UPLOAD, image_source, user_errors
from finetune.errors import ImageError


@pytest.fixture(scope="module")
def service(untrained_run_dir: Path):
    service = InferenceService.from_checkpoint(untrained_run_dir)
    try:
        yield service
    finally:
        service.close()


def test_user_errors_turns_studio_errors_into_a_gradio_modal_and_leaves_bugs_alone() -> None:
    with pytest.raises(gr.Error) as shown, user_errors():
        raise ImageError("'x.jpg' is empty (0 bytes); it is not an image.")
    assert shown.value.message == "'x.jpg' is empty (0 bytes); it is not an image."
    assert shown.value.print_exception is False
    with pytest.raises(KeyError), user_errors():
        raise KeyError("a bug keeps its traceback")


def test_image_source_reads_uploads_and_data_urls_and_refuses_server_paths(tmp_path: Path) -> None:
    photo("rocket").save(tmp_path / "rocket.png")
    upload = as_upload(tmp_path / "rocket.png")
    assert image_source(upload) == (upload["path"], "rocket.png")
    for payload in (str(tmp_path / "rocket.png"), {"path": str(tmp_path / "rocket.png")}):
        with pytest.raises(ImageError) as refused:
            image_source(payload)
        assert str(refused.value) == NOT_AN_UPLOAD
    data_url = "data:image/png;base64," + base64.b64encode((tmp_path / "rocket.png").read_bytes()).decode()
    source, name = image_source({"path": None, "url": data_url})
    assert source == (tmp_path / "rocket.png").read_bytes() and name == "the pasted image"
    with pytest.raises(ImageError, match="no image"):
        image_source(None)
    with pytest.raises(ImageError, match="not valid base64"):
        image_source("data:image/png;base64,@@@")


def test_classify_handler_gives_a_label_dict_and_latency(service: InferenceService, photo_dir: Path) -> None:
    label, latency_s = classify_tab.classify(service, as_upload(photo_dir / "chelsea.jpg"), 2)
    assert len(label) == 2 and set(label) <= {"cat", "coffee", "rocket"}
    assert 0.0 < latency_s < 60.0
    assert classify_tab.describe_latency(0.0421) == (
        "Answered in **42 ms** on the server (decoding, batching and inference)."
    )


def test_classify_handler_shows_bad_files_as_a_modal(service: InferenceService, tmp_path: Path) -> None:
    empty = write_broken_files(tmp_path)["empty.png"]
    with pytest.raises(gr.Error, match="'empty.png' is empty"):
        classify_tab.classify(service, as_upload(empty), 3)


def test_model_card_names_the_model_its_weights_and_metrics(service: InferenceService) -> None:
    card = classify_tab.model_card(service.info())
    assert "test_efficientnet" in card and "**Classes (3):** cat, coffee, rocket" in card
    assert "**Weights:** `none`" in card and "no metrics recorded" in card


def test_model_card_shows_scalar_metrics_and_leaves_curves_out(service: InferenceService) -> None:
    info = replace(service.info(), metrics={"best": {"val_acc": 0.93125, "epoch": 7}, "history": [0.1, 0.2]})
    card = classify_tab.model_card(info)
    assert "**Validation:** best.val\\_acc 0.9313, best.epoch 7" in card and "history" not in card  # escaped


def test_explain_handler_and_opacity_reblend(service: InferenceService, photo_dir: Path) -> None:
    single, multi, caption, explanation = explain_tab.explain(
        service, as_upload(photo_dir / "coffee.jpg"), "coffee", 0.4
    )
    assert single.size == multi.size == explanation.view.size
    assert caption.startswith("Explaining **coffee**")
    stronger, _ = explain_tab.reblend(explanation, 0.9)
    assert stronger.tobytes() != single.tobytes()
    assert explain_tab.reblend(None, 0.5) == (gr.skip(), gr.skip())


def test_batch_handler_writes_the_table_as_csv(
    service: InferenceService, photo_dir: Path, tmp_path: Path
) -> None:
    broken = write_broken_files(tmp_path)["truncated.jpg"]
    files = [upload_copy(photo_dir / "chelsea.jpg"), upload_copy(broken)]
    table, csv_path = batch_tab.classify_files(service, files)
    assert list(table.columns) == batch_tab.COLUMNS and len(table) == 2
    assert Path(csv_path).name == "predictions.csv"
    with open(csv_path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == batch_tab.COLUMNS and rows[1][0] == "chelsea.jpg" and "truncated" in rows[2][4]
    with pytest.raises(gr.Error, match="no files"):
        batch_tab.classify_files(service, [])
