"""Calibrated confidence and "none of these": the fit, every runtime applying it, the CLIs and old runs."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MODEL, photo, write_digits_folder

from finetune import ood
from finetune.calibration import ece, fit_temperature, nll, softmax_t
from finetune.checkpoint import load_run
from finetune.inference import softmax


def test_fit_temperature_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, size=(20000, 10))
    true_t = 2.5
    probs = softmax_t(logits, true_t)
    targets = (probs.cumsum(axis=1) < rng.random((len(probs), 1))).sum(axis=1)  # one draw per row
    fitted = fit_temperature(logits, targets)
    assert fitted == pytest.approx(true_t, rel=0.05)
    # the raw softmax is over-confident on these labels; the fitted temperature fixes it
    assert ece(softmax_t(logits), targets) > 0.1
    assert ece(softmax_t(logits, fitted), targets) < 0.02
    assert nll(softmax_t(logits, fitted), targets) < nll(softmax_t(logits), targets)


def test_ood_measures_rank_and_threshold_as_documented() -> None:
    inside, outside = np.arange(100.0), np.arange(100.0) + 50  # half the OOD scores overlap
    assert ood.auroc(inside, outside) == pytest.approx(0.875, abs=0.01)
    assert ood.threshold_for(inside, 0.95) == 95.0
    assert ood.fpr_at_tpr(inside, outside) == pytest.approx(0.46)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny digits run trained by the real engine, so it carries calibration and an OOD rule."""
    from finetune.config import TrainConfig
    from finetune.trainer import fine_tune

    root = tmp_path_factory.mktemp("trust")
    write_digits_folder(root / "data", classes=(0, 1, 2), per_class=16)
    config = TrainConfig(
        data_dir=root / "data", out=root / "run", model=TINY_MODEL, weights="none", img_size=32, epochs=2,
        batch_size=8, quiet=True, strategy="finetune", workers=1,
    )  # fmt: skip
    fine_tune(config)
    return root / "run"


def test_training_stores_temperature_and_ood_rule(trained_run: Path) -> None:
    studio = json.loads((trained_run / "config.json").read_text())["studio"]
    calibration, rule = studio["calibration"], studio["ood"]
    assert 0.05 <= calibration["temperature"] <= 20
    assert calibration["nll_after"] <= calibration["nll_before"] + 1e-9  # fitted to minimise it
    assert rule["method"] == ood.DEFAULT_METHOD and rule["accept_rate"] == 0.95
    assert len(rule["class_means"]) == 3
    assert rule["val_accepted"] >= 0.95


def with_temperature(run_dir: Path, target: Path, temperature: float) -> Path:
    """A copy of `run_dir` whose stored temperature is `temperature` (the fit itself is tested above)."""
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("*.onnx", ".cache"))
    config = json.loads((target / "config.json").read_text())
    config["studio"]["calibration"]["temperature"] = temperature
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_every_runtime_applies_the_temperature_identically(trained_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from finetune.runtime import create_classifier

    run = load_run(with_temperature(trained_run, tmp_path / "run", 3.0))
    images = [photo("chelsea"), photo("coffee"), *(photo("camera").rotate(a) for a in (0, 90))]
    results = {}
    for runtime in ("torch", "onnx", "onnx-int8"):
        classifier = create_classifier(run, runtime)
        assert classifier.runtime == runtime and classifier.trust.temperature == 3.0
        batch = classifier.preprocess(images)
        logits, features = classifier.predict_outputs(batch)
        scores = classifier.score_images(images)
        # each runtime's probabilities are exactly softmax(its own logits / T), and it scores OOD
        np.testing.assert_allclose(scores.probs, softmax(logits / 3.0), atol=1e-6)
        assert features is not None and scores.ood_scores is not None and scores.unknown is not None
        results[runtime] = scores
    np.testing.assert_allclose(results["onnx"].probs, results["torch"].probs, atol=1e-4)
    np.testing.assert_allclose(results["onnx"].ood_scores, results["torch"].ood_scores, atol=1e-4)
    np.testing.assert_allclose(results["onnx-int8"].probs, results["torch"].probs, atol=0.05)
    # the temperature really changed the answer: T = 3 flattens the raw softmax
    raw = softmax(create_classifier(run, "torch").predict_logits(batch))
    assert results["torch"].probs.max(axis=1).mean() < raw.max(axis=1).mean()


def test_predict_writes_ood_columns_and_no_reject_leaves_the_verdict_out(
    trained_run: Path, tmp_path: Path
) -> None:
    from finetune.predict import main

    folder = tmp_path / "images"
    folder.mkdir()
    photo("chelsea").save(folder / "cat.jpg")
    shutil.copy(next((trained_run.parent / "data" / "digit_1").glob("*.png")), folder / "one.png")
    out = tmp_path / "rejecting.csv"
    assert main([str(folder), "--checkpoint", str(trained_run), "--runtime", "torch", "--out", str(out)]) == 0
    rows = {Path(row["path"]).name: row for row in csv.DictReader(out.open())}
    assert list(rows["cat.jpg"])[-2:] == ["ood_score", "unknown"]
    assert float(rows["cat.jpg"]["ood_score"]) > float(rows["one.png"]["ood_score"])
    assert rows["cat.jpg"]["unknown"] == "true" and rows["cat.jpg"]["label"].startswith("digit_")
    assert main([str(folder), "--checkpoint", str(trained_run), "--runtime", "torch", "--out", str(out),
                 "--no-reject"]) == 0  # fmt: skip
    rows = {Path(row["path"]).name: row for row in csv.DictReader(out.open())}
    assert rows["cat.jpg"]["unknown"] == "" and rows["cat.jpg"]["ood_score"] != ""


def test_evaluate_reports_calibration_and_draws_reliability(trained_run: Path, tmp_path: Path) -> None:
    from finetune.evaluate import evaluate_folder

    png = tmp_path / "reliability.png"
    metrics, _, _ = evaluate_folder(trained_run.parent / "data", str(trained_run), runtime="torch",
                                    reliability_png=png)  # fmt: skip
    calibration = metrics["calibration"]
    assert set(calibration) == {"temperature", "ece_before", "ece_after", "nll_before", "nll_after"}
    assert calibration["nll_after"] <= calibration["nll_before"] + 1e-6  # the split the temperature fit
    assert 0 <= metrics["rejection"]["unknown_rate"] <= 0.25  # its threshold accepts 95% of this split
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_folder_without_calibration_still_loads_as_before(
    trained_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from finetune.runtime import create_classifier

    old = tmp_path / "old_run"
    shutil.copytree(trained_run, old, ignore=shutil.ignore_patterns("*.onnx", ".cache"))
    config = json.loads((old / "config.json").read_text())
    del config["studio"]["calibration"], config["studio"]["ood"]
    (old / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.INFO, logger="finetune.trust"):
        classifier = create_classifier(load_run(old), "torch")
        create_classifier(load_run(old), "torch")
    assert sum("no calibration" in record.message for record in caplog.records) == 1  # said once
    images = [photo("chelsea")]
    scores = classifier.score_images(images)
    np.testing.assert_allclose(
        scores.probs, softmax(classifier.predict_logits(classifier.preprocess(images)))
    )
    assert scores.ood_scores is None and scores.unknown is None
    prediction = classifier.predict(images, k=2)[0]
    assert prediction.unknown is None and prediction.ood_score is None


@pytest.mark.app
def test_a_rejected_image_carries_the_flag_through_gradio_client(trained_run: Path, tmp_path: Path) -> None:
    from app_server import serve
    from gradio_client import Client, handle_file

    from demo.classify_tab import model_card
    from demo.service import InferenceService

    cat = tmp_path / "cat.jpg"
    photo("chelsea").save(cat)
    digit = next((trained_run.parent / "data" / "digit_1").glob("*.png"))
    service = InferenceService.from_checkpoint(trained_run, runtime="torch")
    try:
        card = model_card(service.info())  # the model panel shows the calibration and rejection figures
        assert "Confidence: calibrated on the validation split" in card and "None of these: on" in card
        with serve(service) as url:
            client = Client(url, verbose=False)
            rejected = client.predict(handle_file(cat), 3, api_name="/classify")
            accepted = client.predict(handle_file(digit), 3, api_name="/classify")
            table, _ = client.predict([handle_file(cat), handle_file(digit)], api_name="/batch")
    finally:
        service.close()
    assert rejected["unknown"] is True and rejected["ood_score"] > accepted["ood_score"]
    assert rejected["message"].startswith("Not one of the 3 classes this model knows; closest: digit_")
    assert rejected["label"].startswith("digit_") and len(rejected["confidences"]) == 3  # top-k still shown
    assert accepted["unknown"] is False and accepted["message"] == ""
    unknown = table["headers"].index("unknown")
    assert [row[unknown] for row in table["data"]] == [True, False]


def test_reject_on_a_model_without_a_fitted_rule_uses_the_confidence_floor(untrained_run_dir: Path) -> None:
    from finetune.runtime import create_classifier
    from finetune.trust import FALLBACK_MIN_CONFIDENCE

    classifier = create_classifier(load_run(untrained_run_dir), "torch")
    images = [photo("chelsea"), photo("coffee")]
    assert classifier.score_images(images).unknown is None  # today's behaviour by default
    classifier.set_reject(True)
    scores = classifier.score_images(images)
    np.testing.assert_array_equal(scores.unknown, scores.probs.max(axis=1) < FALLBACK_MIN_CONFIDENCE)
    classifier.set_reject(False)
    assert classifier.score_images(images).unknown is None and classifier.reject is False


def test_accept_rate_outside_its_range_is_a_config_error(tmp_path: Path) -> None:
    from finetune.config import TrainConfig
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError, match="accept_rate"):
        TrainConfig(data_dir=tmp_path, out=tmp_path / "run", accept_rate=1.0)


def test_a_damaged_ood_rule_is_ignored_with_a_warning(
    trained_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from finetune.runtime import create_classifier

    damaged = tmp_path / "damaged"
    shutil.copytree(trained_run, damaged, ignore=shutil.ignore_patterns("*.onnx", ".cache"))
    config = json.loads((damaged / "config.json").read_text())
    config["studio"]["ood"]["class_means"] = [[1.0, 0.0]] * 3  # not the model's feature size
    (damaged / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="finetune.trust"):
        classifier = create_classifier(load_run(damaged), "torch")
    assert "Ignoring the stored OOD rule" in caplog.text and classifier.trust.rejector is None
    assert classifier.trust.is_calibrated and classifier.predict([photo("chelsea")], k=1)[0].unknown is None
