"""The real app on 127.0.0.1 via gradio_client: classify, explain, batch, bad uploads, limits, concurrency.

One server with the embedded ImageNet model serves the whole module (it is real and works offline).
"""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import httpx
import pytest
from app_server import serve
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from upload_cases import BROKEN, write_broken_files, write_unusual_images

import app
from demo.service import InferenceService

pytestmark = pytest.mark.app

EXAMPLES = Path(__file__).resolve().parents[1] / "demo" / "examples"
CAT_CLASSES = {"tiger cat", "Egyptian cat", "tabby"}


@pytest.fixture(scope="module")
def url(service: InferenceService) -> Iterator[str]:
    with serve(service) as local_url:
        yield local_url


@pytest.fixture(scope="module")
def client(url: str) -> Client:
    return Client(url, verbose=False)


def test_api_exposes_exactly_classify_explain_batch_and_select_model(client: Client) -> None:
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == {"/classify", "/explain", "/batch", "/select_model"}
    assert [p["parameter_name"] for p in endpoints["/classify"]["parameters"]] == ["image", "k"]


def test_classify_chelsea_puts_a_cat_on_top(client: Client) -> None:
    result = client.predict(handle_file(EXAMPLES / "chelsea.jpg"), 5, api_name="/classify")
    assert result["label"] in CAT_CLASSES
    confidences = result["confidences"]
    assert len(confidences) == 5
    assert {entry["label"] for entry in confidences[:3]} == CAT_CLASSES
    assert confidences[0]["confidence"] >= confidences[-1]["confidence"]


def test_classify_returns_k_classes(client: Client) -> None:
    result = client.predict(handle_file(EXAMPLES / "coffee.jpg"), 2, api_name="/classify")
    assert len(result["confidences"]) == 2
    assert result["label"] in {"espresso", "cup", "coffee mug"}


def test_explain_returns_two_heatmaps_over_the_models_view(client: Client) -> None:
    single, multi, caption = client.predict(
        handle_file(EXAMPLES / "chelsea.jpg"), "", 0.5, api_name="/explain"
    )
    for path in (single, multi):
        with Image.open(path) as image:
            assert image.size == (448, 448)  # lite0's 224 crop, drawn at the view size
    assert "Explaining **" in caption and any(cat in caption for cat in CAT_CLASSES)
    assert "1.5x" in caption  # the multi-scale view really ran at several scales


def test_explain_a_chosen_class_and_refuse_an_unknown_one(client: Client) -> None:
    _, _, caption = client.predict(handle_file(EXAMPLES / "coffee.jpg"), "cup", 0.3, api_name="/explain")
    assert "Explaining **cup**" in caption
    with pytest.raises(AppError, match="unknown class 'teacup'"):
        client.predict(handle_file(EXAMPLES / "coffee.jpg"), "teacup", 0.3, api_name="/explain")


def test_batch_returns_one_row_per_file_and_the_same_rows_as_csv(client: Client, tmp_path: Path) -> None:
    broken = write_broken_files(tmp_path)["not_an_image.jpg"]
    files = [EXAMPLES / f"{name}.jpg" for name in ("chelsea", "coffee", "rocket")] + [broken]
    table, csv_path = client.predict([handle_file(file) for file in files], api_name="/batch")
    assert table["headers"] == ["file", "top-1", "confidence", "top-k", "error", "ood_score", "unknown"]
    rows = table["data"]
    assert [row[0] for row in rows] == [file.name for file in files]
    assert rows[0][1] in CAT_CLASSES and rows[0][4] == ""
    assert "not an image" in rows[3][4] and rows[3][1] == ""
    with open(csv_path, newline="") as handle:
        saved = list(csv.reader(handle))
    assert saved[0] == table["headers"] and [row[0] for row in saved[1:]] == [row[0] for row in rows]


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_bad_upload_gets_a_message_and_the_next_request_works(
    client: Client, tmp_path: Path, name: str
) -> None:
    path = write_broken_files(tmp_path)[name]
    with pytest.raises(AppError, match=BROKEN[name]) as refused:
        client.predict(handle_file(path), 3, api_name="/classify")
    assert name in str(refused.value) and "/tmp" not in str(refused.value)
    result = client.predict(handle_file(EXAMPLES / "chelsea.jpg"), 3, api_name="/classify")
    assert result["label"] in CAT_CLASSES


def test_unusual_images_are_classified(client: Client, tmp_path: Path) -> None:
    """CMYK, 16-bit, palette, RGBA, animated GIF and grayscale versions of chelsea: still a cat."""
    for name, path in write_unusual_images(tmp_path).items():
        result = client.predict(handle_file(path), 5, api_name="/classify")
        assert CAT_CLASSES & {entry["label"] for entry in result["confidences"]}, name


def test_concurrent_visitors_share_forward_passes_and_each_gets_its_own_answer(
    url: str, service: InferenceService
) -> None:
    """Requests arriving together at the real server are batched, yet each gets its own image's answer.

    Four photos with four different top classes, interleaved, so a mix-up inside a batch would show. Only
    behaviour is asserted; the time is printed for information (speed targets live in bench/serve.py, since
    timings on a shared test machine are noise).
    """
    names = ("chelsea", "coffee", "astronaut", "rocket")
    alone = {name: service.predict_topk(EXAMPLES / f"{name}.jpg", 3) for name in names}  # batches of one
    assert len({prediction.label for prediction in alone.values()}) == len(names)
    files = [EXAMPLES / f"{name}.jpg" for name in names] * 3
    visitors = [Client(url, verbose=False) for _ in range(4)]  # a session may hold 4 requests at once
    before = service.batch_sizes()
    start = time.perf_counter()
    jobs = [
        visitors[n % len(visitors)].submit(handle_file(file), 3, api_name="/classify")
        for n, file in enumerate(files)
    ]
    answers = [job.result(timeout=120) for job in jobs]
    elapsed_s = time.perf_counter() - start
    for file, answer in zip(files, answers, strict=True):
        expected = alone[file.stem]
        assert answer["label"] == expected.label, file.name
        assert [entry["label"] for entry in answer["confidences"]] == expected.labels, file.name
        confidences = [entry["confidence"] for entry in answer["confidences"]]
        assert confidences == pytest.approx(expected.probs, abs=1e-4), file.name
    after = service.batch_sizes()
    shared = {size: after[size] - before.get(size, 0) for size in after if size > 1}
    assert any(count > 0 for count in shared.values()), f"no request shared a forward pass: {after}"
    print(f"\n{len(files)} concurrent requests answered in {elapsed_s:.2f}s; new shared batches {shared}")


def test_server_serves_no_file_of_the_machine(url: str) -> None:
    for path in (Path(app.__file__).resolve(), Path("/etc/passwd"), EXAMPLES / "make_examples.py"):
        response = httpx.get(f"{url}gradio_api/file={path}")
        assert response.status_code in (403, 404), path


def test_upload_above_the_size_limit_is_refused_and_the_server_keeps_serving(
    client: Client, url: str, tmp_path: Path
) -> None:
    assert app.MAX_FILE_SIZE == "20mb"
    padded = (EXAMPLES / "chelsea.jpg").read_bytes() + b"\0" * (21 * 1024 * 1024)
    # The server's own check, bypassing the client's (which refuses large files before sending them).
    response = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.jpg", padded, "image/jpeg")})
    assert response.status_code == 413, response.text
    big = tmp_path / "big.jpg"
    big.write_bytes(padded)
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        client.predict(handle_file(big), 3, api_name="/classify")
    assert (
        client.predict(handle_file(EXAMPLES / "chelsea.jpg"), 3, api_name="/classify")["label"] in CAT_CLASSES
    )


def test_app_serves_a_fine_tuned_run_with_its_own_labels(untrained_run_dir: Path) -> None:
    service = InferenceService.from_checkpoint(untrained_run_dir)
    try:
        with serve(service) as local_url:
            result = Client(local_url, verbose=False).predict(
                handle_file(EXAMPLES / "rocket.jpg"), 3, api_name="/classify"
            )
    finally:
        service.close()
    assert {entry["label"] for entry in result["confidences"]} == {"cat", "coffee", "rocket"}


def test_command_line_takes_the_checkpoint_from_env_and_refuses_a_bad_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CHECKPOINT", "hf-hub:someone/some-run")
    args = app.get_parser().parse_args([])
    assert (args.checkpoint, args.runtime, args.host, args.port, args.share) == (
        "hf-hub:someone/some-run",
        "auto",
        None,  # Gradio's own default (GRADIO_SERVER_NAME or 127.0.0.1) applies
        None,  # likewise GRADIO_SERVER_PORT or 7860
        False,
    )
    assert app.main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint ")


def test_spaces_front_matter_matches_the_installed_gradio() -> None:
    readme = (EXAMPLES.parents[1] / "README.md").read_text(encoding="utf-8")
    front_matter = readme.split("---")[1]
    assert f"sdk_version: {gr.__version__}" in front_matter
    assert "app_file: app.py" in front_matter
