"""Multi-label training from a labels CSV: parsing and refusals, split, thresholds, metrics, CLIs, ONNX.

One tiny run (timm's random-init `test_efficientnet` on real digit mosaics, one fine-tuning epoch) is
trained once for the module through the real CLI and read by the CLI, ONNX and single-label checks.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MODEL, needs_int8_dot_product
from multilabel_data import NAMES, write_digit_mosaics
from PIL import Image

from finetune import multilabel
from finetune.errors import DatasetError
from finetune.labels_csv import read_csv_split, read_labels_csv, scan_labels_csv, split_labels


def _write_csv(root: Path, rows: list[str], header: str = "path,labels", images: int = 4) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for n in range(images):
        Image.new("RGB", (8, 8), (n * 40, 0, 0)).save(root / "img" / f"{n}.png")
    path = root / "labels.csv"
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def test_labels_split_on_spaces_and_semicolons_without_repeats():
    assert split_labels(" cat; dog  cat;;bird ") == ["cat", "dog", "bird"]
    assert split_labels("") == []


def test_read_labels_csv_resolves_paths_beside_it_and_keeps_negatives(tmp_path):
    path = _write_csv(tmp_path, [])
    # columns in another order, named in any case, found by name
    path.write_text(
        "Labels,Path\ncat dog,img/0.png\ndog;cat,img/1.png\n,img/2.png\n  ,img/3.png\n", encoding="utf-8"
    )
    labels, entries = read_labels_csv(path)
    assert labels == ["cat", "dog"]
    assert [p.name for p, _ in entries] == ["0.png", "1.png", "2.png", "3.png"]
    assert entries[0][0] == (tmp_path / "img" / "0.png").absolute()
    assert [names for _, names in entries] == [["cat", "dog"], ["dog", "cat"], [], []]


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        ("path,tags", ["img/0.png,cat"], "no 'labels' column"),
        ("file,labels", ["img/0.png,cat"], "no 'path' column"),
        ("path,labels", ["img/0.png,cat", "img/9.png,cat"], "'img/9.png' does not exist"),
        ("path,labels", ["img/0.png,cat dog", "img/1.png,cat"], "'dog' in"),  # used by one image
        ("path,labels", ["../outside.png,cat", "img/1.png,cat"], "not inside the CSV's folder"),
        ("path,labels", ["img/0.png,cat", "img/0.png,cat"], "twice"),
        ("path,labels", ["labels.csv,cat", "img/1.png,cat"], "is not an image file"),
        ("path,labels", [], "lists no images"),
        ("path,labels", [",cat"], "empty 'path'"),
    ],
)
def test_bad_labels_csv_is_refused_with_what_to_fix(tmp_path, header, rows, message):
    path = _write_csv(tmp_path, rows, header)
    with pytest.raises(DatasetError, match=message):
        scan_labels_csv(path)


def test_missing_labels_csv_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_labels_csv(tmp_path / "labels.csv")


def test_split_puts_every_label_in_validation_and_is_seeded(tmp_path):
    csv_path = write_digit_mosaics(tmp_path, count=40)
    split = scan_labels_csv(csv_path, val_fraction=0.25, seed=3)
    again = scan_labels_csv(csv_path, val_fraction=0.25, seed=3)
    assert [s.path for s in split.val] == [s.path for s in again.val]
    assert len(split.train) + len(split.val) == 40
    assert all(n > 0 for n in split.positive_counts(split.val).values())
    assert all(n > 0 for n in split.positive_counts(split.train).values())


def test_threshold_maximises_f1_and_separates_by_a_margin():
    targets = np.array([1, 1, 0, 1, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.1])
    threshold = multilabel.fit_threshold(targets, scores)
    assert 0.3 < threshold < 0.6  # all three positives above, one false alarm: F1 6/7, the best cut
    best = max(
        2 * ((scores >= t) & (targets == 1)).sum() / ((scores >= t).sum() + targets.sum()) for t in scores
    )
    predicted = scores >= threshold
    assert 2 * (predicted & (targets == 1)).sum() / (predicted.sum() + targets.sum()) == pytest.approx(best)
    assert multilabel.fit_threshold(np.zeros(3), np.array([0.9, 0.1, 0.5])) == multilabel.DEFAULT_THRESHOLD


def test_metrics_match_scikit_learn():
    from sklearn import metrics

    rng = np.random.default_rng(0)
    targets = (rng.random((200, 5)) < [0.1, 0.3, 0.5, 0.2, 0.05]).astype(float)
    probs = np.clip(targets * 0.35 + rng.random((200, 5)) * 0.7, 0, 1).round(2)  # ties included
    thresholds = np.array([0.5, 0.4, 0.6, 0.55, 0.45])
    report = multilabel.multilabel_report(targets, probs, thresholds, list("abcde"))
    predicted = probs >= thresholds
    for i, name in enumerate("abcde"):
        truth, scores, calls = targets[:, i], probs[:, i], predicted[:, i]
        assert report[name]["ap"] == pytest.approx(metrics.average_precision_score(truth, scores))
        assert report[name]["precision"] == pytest.approx(metrics.precision_score(truth, calls))
        assert report[name]["recall"] == pytest.approx(metrics.recall_score(truth, calls))
    scores = multilabel.summary(report)
    assert scores["mAP"] == pytest.approx(metrics.average_precision_score(targets, probs, average="macro"))
    assert scores["micro_f1"] == pytest.approx(metrics.f1_score(targets, predicted, average="micro"))
    assert scores["macro_f1"] == pytest.approx(metrics.f1_score(targets, predicted, average="macro"))


def test_auto_trains_small_multilabel_images_at_native_size_for_more_updates():
    from finetune.multilabel_train import MAX_EPOCHS, TARGET_STEPS, plan_resolution, wanted_steps
    from finetune.recipe import RecipePlan

    small = RecipePlan(128, -1, "128 px: about twice the size of small images; first half frozen (speed)")
    plan = plan_resolution(small, native_size=224)
    assert (plan.image_size, plan.frozen_groups) == (224, -1)  # the freezing decision is kept
    assert plan.reason.startswith("224 px: native size") and plan.reason.endswith("first half frozen (speed)")
    assert plan_resolution(small, native_size=224, img_size=128) is small  # --img-size wins
    few_shot = RecipePlan(224, 0, "224 px: few images; whole backbone; probe only (8 < 24)", probe_only=True)
    kept = plan_resolution(few_shot, native_size=224)  # the few-shot rule is for single-label data
    assert not kept.probe_only and "probe only" not in kept.reason
    assert wanted_steps(4 * 75, steps_per_epoch=75) == 75 * -(-TARGET_STEPS // 75)  # whole epochs
    assert wanted_steps(4 * 500, steps_per_epoch=500) == 4 * 500  # never fewer than single-label
    assert wanted_steps(4, steps_per_epoch=1) == MAX_EPOCHS


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(labels.csv, run folder): one fine-tuning epoch through `python -m finetune labels.csv --out RUN`."""
    import torch

    from finetune.__main__ import main

    root = tmp_path_factory.mktemp("multilabel")
    csv_path = write_digit_mosaics(root / "data", count=48)
    run_dir = root / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = [str(csv_path), "--out", str(run_dir), "--model", TINY_MODEL, "--weights", "none"]
        assert main([*args, "--epochs", "1", "--img-size", "48", "--quiet", "--workers", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    return csv_path, run_dir


def test_training_stores_thresholds_reports_and_the_split(trained):
    csv_path, run_dir = trained
    config = json.loads((run_dir / "config.json").read_text())
    assert config["label_names"] == sorted(NAMES) and config["num_classes"] == 3
    assert multilabel.is_multilabel(config)
    assert set(config["studio"]["multilabel"]["thresholds"]) == set(NAMES)
    metrics = config["studio"]["metrics"]
    assert 0 <= metrics["val_map"] <= 1 and metrics["selected_on"].startswith("validation mAP")
    for name in ("classification_report.json", "classification_report.txt", "pr_curves.png", "split.json"):
        assert (run_dir / name).is_file(), name
    report = json.loads((run_dir / "classification_report.json").read_text())
    assert report["macro avg"]["ap"] == pytest.approx(metrics["val_map"])
    record = read_csv_split(run_dir)
    assert record is not None and record.split.csv_path == csv_path.absolute()
    assert {s.path for s in record.split.train}.isdisjoint({s.path for s in record.split.val})
    from finetune.split import read_split  # class-folder readers still parse it (strata as classes)

    assert read_split(run_dir).classes == [*sorted(NAMES), "(no label)"]


def test_evaluate_json_scores_the_runs_validation_split_like_training(trained, capsys):
    from finetune.evaluate import main

    csv_path, run_dir = trained
    assert main([str(csv_path), "--checkpoint", str(run_dir), "--json", "--runtime", "torch"]) == 0
    result = json.loads(capsys.readouterr().out)
    config = json.loads((run_dir / "config.json").read_text())
    assert result["subset"] == "val"
    assert result["mAP"] == pytest.approx(config["studio"]["metrics"]["val_map"], abs=1e-6)
    assert result["macro_f1"] == pytest.approx(config["studio"]["metrics"]["val_macro_f1"], abs=1e-6)
    assert set(result["per_label"]) == {*NAMES, "micro avg", "macro avg"}
    assert {"micro_f1", "n", "bad_files"} <= set(result)


def test_evaluate_refuses_a_csv_with_labels_the_run_does_not_know(trained, tmp_path, capsys):
    from finetune.evaluate import main

    _, run_dir = trained
    path = _write_csv(tmp_path, ["img/0.png,zero three", "img/1.png,three"])
    assert main([str(path), "--checkpoint", str(run_dir), "--runtime", "torch"]) == 2
    assert "'three'" in capsys.readouterr().err


def test_predict_writes_labels_above_thresholds_and_every_probability(trained, tmp_path, capsys):
    from finetune.predict import main

    csv_path, run_dir = trained
    images = sorted((csv_path.parent / "images").glob("*.png"))[:5]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert main([*map(str, images), str(broken), "--checkpoint", str(run_dir), "--runtime", "torch"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    config = json.loads((run_dir / "config.json").read_text())
    thresholds = config["studio"]["multilabel"]["thresholds"]
    expected = ["path", "label", "prob", "error", "labels", *[f"prob_{n}" for n in sorted(NAMES)]]
    assert list(rows[0]) == expected
    for row in rows[:-1]:
        above = {name for name in NAMES if float(row[f"prob_{name}"]) >= thresholds[name]}
        assert set(filter(None, row["labels"].split(";"))) == above
    assert rows[-1]["error"] and not rows[-1]["labels"]


def test_resume_refuses_an_edited_csv(trained, tmp_path, capsys):
    from finetune.__main__ import main

    csv_path, run_dir = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    state = json.loads((copy / "train_state.json").read_text())
    state["state"]["finished"] = False
    (copy / "train_state.json").write_text(json.dumps(state))
    original = csv_path.read_text()
    try:
        csv_path.write_text(original.replace("images/m000.png,", "images/m000.png,zero "))
        assert main(["--resume", str(copy), "--quiet"]) == 2
        assert "labels.csv was edited" in capsys.readouterr().err
    finally:
        csv_path.write_text(original)


def test_onnx_serves_the_same_independent_probabilities(trained):
    pytest.importorskip("onnxruntime")
    from finetune.checkpoint import load_run
    from finetune.inference import Classifier
    from finetune.runtime import create_classifier

    csv_path, run_dir = trained
    copy = run_dir.parent / "onnx_run"
    shutil.copytree(run_dir, copy, dirs_exist_ok=True)
    run = load_run(copy)
    images = [Image.open(p).convert("RGB") for p in sorted((csv_path.parent / "images").glob("*.png"))[:8]]
    onnx = create_classifier(run, runtime="onnx")
    expected = Classifier(run).predict_probs(images)
    actual = onnx.predict_probs(images)
    assert onnx.runtime == "onnx" and (copy / "model.onnx").is_file()
    assert np.abs(expected - actual).max() < 1e-4
    assert not np.allclose(expected.sum(axis=1), 1.0)  # independent sigmoids, not a softmax
    thresholds = json.loads((copy / "config.json").read_text())["studio"]["multilabel"]["thresholds"]
    assert json.loads(onnx.metadata["studio.multilabel_thresholds"]) == thresholds


@needs_int8_dot_product
def test_int8_export_is_checked_on_the_csv_split_by_the_labels_it_answers(trained, capsys):
    pytest.importorskip("onnxruntime")
    from finetune.checkpoint import load_run
    from finetune.export import main
    from finetune.multilabel import labels_above, thresholds_of
    from finetune.quantize import INT8_FILE, read_int8_report
    from finetune.runtime import create_classifier

    csv_path, run_dir = trained
    copy = run_dir.parent / "int8_run"
    shutil.copytree(run_dir, copy, dirs_exist_ok=True)
    assert main([str(copy), "--int8", "--quiet"]) == 0
    assert "same labels as FP32 on" in capsys.readouterr().out
    run = load_run(copy)
    int8 = create_classifier(run, "onnx-int8")
    assert int8.onnx_path == copy / INT8_FILE and int8.is_multilabel
    thresholds = json.loads((copy / "config.json").read_text())["studio"]["multilabel"]["thresholds"]
    assert json.loads(int8.metadata["studio.multilabel_thresholds"]) == thresholds
    report = read_int8_report(int8)
    record = read_csv_split(copy)
    assert record is not None and report is not None
    # calibrated and checked on the run's own CSV split, not on photos, and judged by the label sets
    assert report.source == "held-out validation images" and report.answer == "labels"
    assert report.n_images == len(record.split.val) and report.n_calibration == len(record.split.train)
    assert report.fp32_top1 is not None and report.int8_top1 is not None  # micro-F1 of each
    images = [Image.open(p).convert("RGB") for p in sorted((csv_path.parent / "images").glob("*.png"))]
    fp32 = create_classifier(run, "onnx")
    expected, actual = fp32.predict_probs(images), int8.predict_probs(images)
    assert not np.array_equal(expected, actual)  # really the quantized model
    cut = thresholds_of(run.config, run.labels)
    fp32_answers = labels_above(expected, cut, run.labels)
    same = [a == b for a, b in zip(fp32_answers, labels_above(actual, cut, run.labels), strict=True)]
    assert np.mean(same) >= 0.9


def test_timm_local_dir_and_the_card_carry_the_multilabel_head(trained):
    import timm
    import torch

    from finetune.checkpoint import load_run
    from finetune.inference import Classifier

    csv_path, run_dir = trained
    model = timm.create_model(f"local-dir:{run_dir}", pretrained=True).eval()
    classifier = Classifier(load_run(run_dir))
    image = Image.open(sorted((csv_path.parent / "images").glob("*.png"))[0]).convert("RGB")
    with torch.no_grad():
        probs = model(classifier.preprocess([image])).sigmoid().numpy()
    assert np.abs(probs - classifier.predict_probs([image])).max() < 1e-5
    card = (run_dir / "README.md").read_text()
    assert "multi-label" in card and ".sigmoid()" in card and "| Threshold |" in card
    assert "name: mAP" in card and "pr_curves.png" in card


def test_a_multilabel_run_sees_the_whole_image_everywhere(trained):
    """No center crop: a thing at the edge of a multi-label image is seen in training and at inference."""
    import timm
    import torch

    from finetune.checkpoint import load_run
    from finetune.inference import Classifier

    _, run_dir = trained
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data_config"]["crop_pct"] == 1.0 and config["pretrained_cfg"]["crop_pct"] == 1.0
    model = timm.create_model(f"local-dir:{run_dir}", pretrained=True)
    assert timm.data.resolve_data_config({}, model=model)["crop_pct"] == 1.0  # the card's snippet too
    assert sorted(p.name for p in (run_dir / ".cache").glob("*.npy")) == [
        "train_48_crop1000.npy", "val_48_crop1000.npy",
    ]  # fmt: skip
    framed = np.zeros((48, 48, 3), np.uint8)
    framed[:2], framed[-2:], framed[:, :2], framed[:, -2:] = 255, 255, 255, 255  # a white frame, 2 px wide
    pixels = Classifier(load_run(run_dir)).preprocess([Image.fromarray(framed)])[0]
    mean, std = (torch.tensor(config["data_config"][key]).view(3, 1) for key in ("mean", "std"))
    white = (1.0 - mean) / std  # each channel's value of a white pixel
    for edge in (pixels[:, 0, :], pixels[:, -1, :], pixels[:, :, 0], pixels[:, :, -1]):
        assert torch.allclose(edge, white.expand_as(edge), atol=1e-4)  # the frame is still there


def test_a_single_label_run_still_answers_with_softmax(untrained_run_dir, photo_dir):
    from finetune.checkpoint import load_run
    from finetune.inference import Classifier
    from finetune.predict import columns

    classifier = Classifier(load_run(untrained_run_dir))
    assert not classifier.is_multilabel
    probs = classifier.predict_probs([Image.open(photo_dir / "chelsea.jpg")])
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert columns(1) == ["path", "label", "prob", "error", "top1_label", "top1_prob", "ood_score", "unknown"]


@pytest.mark.app
def test_app_answers_with_every_label_above_its_threshold(trained, tmp_path):
    from app_server import serve
    from gradio_client import Client, handle_file

    from demo.service import InferenceService
    from finetune.checkpoint import load_run
    from finetune.inference import Classifier

    csv_path, run_dir = trained
    images = sorted((csv_path.parent / "images").glob("*.png"))[:4]
    run = load_run(run_dir)
    thresholds = multilabel.thresholds_of(run.config, run.labels)
    expected = Classifier(run).predict_probs([Image.open(p).convert("RGB") for p in images])
    service = InferenceService.from_checkpoint(run_dir, runtime="torch")
    try:
        with serve(service) as url:
            client = Client(url, verbose=False)
            assert (expected >= thresholds).any()  # some label is present somewhere: the check has teeth
            for path, probs in zip(images, expected, strict=True):
                answer = client.predict(handle_file(path), 1, api_name="/classify")  # k does not cap it
                shown = {entry["label"]: entry["confidence"] for entry in answer.get("confidences") or []}
                above = {name: p for name, p, t in zip(run.labels, probs, thresholds, strict=True) if p >= t}
                assert set(shown) == set(above)
                assert all(shown[name] == pytest.approx(above[name], abs=1e-4) for name in shown)
            table, _ = client.predict([handle_file(p) for p in images], api_name="/batch")
            assert table["headers"][-1] == "labels"
            for row, probs in zip(table["data"], expected, strict=True):
                present = {n for n, p, t in zip(run.labels, probs, thresholds, strict=True) if p >= t}
                assert set(filter(None, row[-1].split("; "))) == present
            _, _, caption = client.predict(handle_file(images[0]), "two", 0.5, api_name="/explain")
            assert "Explaining **two**" in caption
        from demo.classify_tab import model_card

        card = model_card(service.info())  # the panel beside the answer: sigmoids, not a softmax
        assert "independent sigmoid probability per label" in card and "softmax" not in card
    finally:
        service.close()


def test_train_tab_zip_with_labels_csv_becomes_a_multilabel_dataset(trained, tmp_path):
    import zipfile

    from demo.uploads import import_zip
    from finetune.labels_csv import labels_source

    csv_path, _ = trained
    archive = tmp_path / "upload.zip"
    lines = csv_path.read_text().splitlines()
    with zipfile.ZipFile(archive, "w") as zipped:
        for line in lines[1:25]:
            name = line.split(",")[0]
            zipped.write(csv_path.parent / name, f"shop/{name}")
        zipped.writestr("shop/images/broken.png", b"not a png")
        zipped.writestr("shop/notes.txt", "hello")
        zipped.writestr("shop/labels.csv", "\n".join([*lines[:25], "images/broken.png,zero"]) + "\n")
    dataset = import_zip(archive, tmp_path / "datasets")
    assert labels_source(dataset.root) == dataset.root / "labels.csv"
    assert dataset.num_images == 24 and set(dataset.class_counts) == set(NAMES)
    reasons = {item.name: item.reason for item in dataset.skipped}
    assert "shop/notes.txt" in reasons and "images/broken.png" in reasons
    assert "24 images with 3 labels" in dataset.summary()
    split = scan_labels_csv(labels_source(dataset.root))
    assert len(split.train) + len(split.val) == 24

    once = tmp_path / "once.zip"
    with zipfile.ZipFile(once, "w") as zipped:
        for line in lines[1:4]:
            zipped.write(csv_path.parent / line.split(",")[0], line.split(",")[0])
        rows = [
            lines[0],
            f"{lines[1].split(',')[0]},rare common",
            *[f"{r.split(',')[0]},common" for r in lines[2:4]],
        ]
        zipped.writestr("labels.csv", "\n".join(rows) + "\n")
    with pytest.raises(DatasetError, match="'rare'"):
        import_zip(once, tmp_path / "datasets2")
    assert not any((tmp_path / "datasets2").iterdir())  # nothing left behind
