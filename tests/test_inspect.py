"""Data checks on real images: `python -m finetune.inspect`, the checks at training start, the report's JSON
schema and HTML (in the real browser), and `--exclude-issues` leaving exactly the listed files out.

One small planted dataset (sklearn digits 0/1/2 in train/ + val/, with a leaked copy, a resized JPEG leak,
a cross-class copy, a flipped label, a photo outlier, a tiny image named like HTML and a very wide image)
is inspected once with the embedded lite0 backbone and trained once with timm's tiny random-init model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_MODEL, photo, write_digits_folder
from PIL import Image

from finetune.data_health import CHECKS, FileRef, exact_duplicates
from finetune.data_report import ISSUES_FILE, REPORT_HTML, REPORT_JSON, read_exclusions
from finetune.inspect import main as inspect_main

HOSTILE = "<img src=x onerror=alert(1)>.png"  # a file name is data, never markup
PLANTED = {
    "exact_leak": ("train/digit_0/000.png", "val/digit_0/leak.png"),
    "near_leak": ("train/digit_1/001.png", "val/digit_1/leak_resized.jpg"),
    "conflict": ("train/digit_2/002.png", "train/digit_0/conflict.png"),
    "flipped": "train/digit_2/flipped.png",
    "outlier": "train/digit_1/photo.png",
    "tiny": "train/digit_0/" + HOSTILE,
    "wide": "train/digit_2/wide.png",
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ (12 per class) + val/ (4 per class) of real digits, with one of each planted problem."""
    root = tmp_path_factory.mktemp("planted")
    source = write_digits_folder(root / "all", per_class=17)
    data = root / "digits"
    for folder in sorted(source.iterdir()):
        files = sorted(folder.iterdir())
        for subset, chosen in (("train", files[:12]), ("val", files[12:16])):
            (data / subset / folder.name).mkdir(parents=True)
            for file in chosen:
                shutil.copyfile(file, data / subset / folder.name / file.name)
    spare_one = sorted((source / "digit_1").iterdir())[16]
    shutil.copyfile(data / PLANTED["exact_leak"][0], data / PLANTED["exact_leak"][1])
    Image.open(data / PLANTED["near_leak"][0]).resize((28, 28)).save(
        data / PLANTED["near_leak"][1], quality=80
    )
    shutil.copyfile(data / PLANTED["conflict"][0], data / PLANTED["conflict"][1])
    shutil.copyfile(spare_one, data / PLANTED["flipped"])  # a 1 filed as a 2
    photo("chelsea").crop((100, 20, 300, 220)).resize((32, 32)).save(data / PLANTED["outlier"])
    spare_zero = sorted((source / "digit_0").iterdir())[16]
    Image.open(spare_zero).resize((6, 6)).save(data / PLANTED["tiny"])
    Image.open(sorted((source / "digit_2").iterdir())[16]).resize((160, 24)).save(data / PLANTED["wide"])
    return data


@pytest.fixture(scope="module")
def report_dir(planted: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert inspect_main([str(planted), "--out", str(out), "--img-size", "96", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def report(report_dir: Path) -> dict:
    return json.loads((report_dir / REPORT_JSON).read_text())


def _findings(report: dict, check: str) -> list[dict]:
    return [f for f in report["findings"] if f["check"] == check]


def _paths(finding: dict) -> set[str]:
    return {f["path"] for f in finding["files"]}


def test_exact_duplicates_are_leakage_across_subsets_and_conflicts_across_classes(report: dict) -> None:
    exact = {frozenset(_paths(f)): f for f in _findings(report, "exact_duplicate")}
    leak = exact[frozenset(PLANTED["exact_leak"])]
    conflict = exact[frozenset(PLANTED["conflict"])]
    assert (leak["kind"], conflict["kind"]) == ("leakage", "conflict")
    assert leak["exclude"] == [PLANTED["exact_leak"][0]]  # the training copy; validation stays as split
    assert sorted(conflict["exclude"]) == sorted(PLANTED["conflict"])  # which label is right is unknown
    assert len(exact) == 2


def test_a_resized_jpeg_copy_in_val_is_a_near_duplicate_leak(report: dict) -> None:
    near = {frozenset(_paths(f)): f for f in _findings(report, "near_duplicate")}
    leak = near[frozenset(PLANTED["near_leak"])]
    assert leak["kind"] == "leakage" and "pixel correlation" in leak["detail"]


def test_flipped_label_is_a_label_issue_with_its_true_class_suggested(report: dict) -> None:
    issues = {f["files"][0]["path"]: f for f in _findings(report, "label_issue")}
    assert PLANTED["flipped"] in issues
    assert issues[PLANTED["flipped"]]["suggested_class"] == "digit_1"
    assert len(issues) <= 6  # a handful out of 50, not every image


def test_photo_among_digits_is_an_outlier_and_odd_sizes_are_flagged(report: dict) -> None:
    assert PLANTED["outlier"] in {f["files"][0]["path"] for f in _findings(report, "outlier")}
    assert {f["files"][0]["path"] for f in _findings(report, "tiny_image")} == {PLANTED["tiny"]}
    assert {f["files"][0]["path"] for f in _findings(report, "extreme_aspect")} == {PLANTED["wide"]}
    assert _findings(report, "class_imbalance") == []  # 16-17 images a class


def test_class_imbalance_and_within_class_copies_from_hashes() -> None:
    files = [FileRef(f"train/a/{i}.png", "a", "train") for i in range(9)] + [
        FileRef("train/b/0.png", "b", "train")
    ]
    from finetune.data_health import class_imbalance

    (finding,) = class_imbalance(files, ["a", "b"])
    assert finding.score == 9.0 and "b (1)" in finding.detail
    (copies,) = exact_duplicates(files[:3], ["x", "x", "y"])
    assert copies.kind == "within_class" and copies.exclude == ["train/a/1.png"]


REPORT_SCHEMA = {
    "type": "object",
    "required": [
        "schema_version",
        "data_dir",
        "model",
        "image_size",
        "classes",
        "num_files",
        "class_counts",
        "counts",
        "kinds",
        "exclude",
        "findings",
        "timings_s",
        "after_training",
    ],  # fmt: skip
    "properties": {
        "schema_version": {"const": 1},
        "classes": {"type": "array", "items": {"type": "string"}},
        "num_files": {"type": "integer"},
        "counts": {"type": "object", "required": list(CHECKS), "additionalProperties": {"type": "integer"}},
        "exclude": {"type": "array", "items": {"type": "string"}},
        "findings": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["check", "files", "score", "kind", "suggested_class", "detail", "exclude"],
                "properties": {
                    "check": {"enum": list(CHECKS)},
                    "kind": {"enum": ["leakage", "conflict", "within_class", None]},
                    "score": {"type": "number"},
                    "suggested_class": {"type": ["string", "null"]},
                    "files": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["path", "label", "subset"],
                            "properties": {"subset": {"enum": ["train", "val", "test"]}},
                        },
                    },
                },
            },
        },
        "after_training": {
            "type": ["object", "null"],
            "properties": {
                "top_losses": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["path", "label", "predicted", "confidence", "loss"],
                    },
                },
                "most_confused": {
                    "type": "array",
                    "items": {"type": "object", "required": ["true", "predicted", "count"]},
                },
            },
        },
    },
}


def test_report_json_follows_the_schema_and_the_issues_list_matches_it(
    report: dict, report_dir: Path
) -> None:
    import jsonschema

    jsonschema.validate(report, REPORT_SCHEMA)
    assert report["num_files"] == 55 and sum(report["counts"].values()) == len(report["findings"])
    assert read_exclusions(report_dir / ISSUES_FILE) == set(report["exclude"])
    assert PLANTED["flipped"] in report["exclude"] and PLANTED["tiny"] not in report["exclude"]


@pytest.mark.browser
def test_report_html_opens_in_chromium_with_thumbnails_and_escaped_names(report_dir: Path) -> None:
    from test_browser import CHROMIUM, CHROMIUM_ARGS

    playwright_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"chromium is not at {CHROMIUM}")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto((report_dir / REPORT_HTML).as_uri())
            assert page.locator("h1").inner_text() == "Data report"
            assert page.locator("section").count() == len(CHECKS)
            loaded = page.evaluate(
                "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length"
            )
            assert loaded >= 8 and loaded == page.locator("img").count()
            assert page.locator("img[src='x']").count() == 0  # the hostile file name stayed text
            assert page.get_by_text(HOSTILE[:20]).count() >= 1
            assert not errors
            docs = Path(__file__).resolve().parents[1] / "test-artifacts"
            docs.mkdir(exist_ok=True)
            page.screenshot(path=str(docs / "data_report.png"), full_page=False)
        finally:
            browser.close()


@pytest.fixture(scope="module")
def trained(planted: Path, report_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set]:
    """A linear-probe run of the tiny model, leaving out two files of an edited data_issues.txt."""
    from finetune.config import TrainConfig
    from finetune.trainer import fine_tune

    lines = (report_dir / ISSUES_FILE).read_text().splitlines()
    kept = [line for line in lines if line.startswith((PLANTED["flipped"], PLANTED["outlier"]))]
    edited = tmp_path_factory.mktemp("edited") / "issues.txt"
    edited.write_text("# my edit\n" + "\n".join(kept) + "\n")
    out = tmp_path_factory.mktemp("run") / "run"
    config = TrainConfig(
        data_dir=planted, out=out, model=TINY_MODEL, weights="none", strategy="linear", probe_epochs=2,
        img_size=32, quiet=True, exclude_issues=edited,
    )  # fmt: skip
    fine_tune(config)
    return out, {PLANTED["flipped"], PLANTED["outlier"]}


def test_exclude_issues_leaves_exactly_the_listed_files_out(planted: Path, trained: tuple[Path, set]) -> None:
    out, excluded = trained
    recorded = {f["path"] for f in json.loads((out / "split.json").read_text())["files"]}
    on_disk = {p.relative_to(planted).as_posix() for p in planted.rglob("*") if p.is_file()}
    assert recorded == on_disk - excluded


def test_training_writes_the_report_with_top_losses_into_the_run_and_card(trained: tuple[Path, set]) -> None:
    out, excluded = trained
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["num_files"] == 53 and not excluded & {
        f["path"] for x in report["findings"] for f in x["files"]
    }
    after = report["after_training"]
    assert after["num_images"] == 14
    assert all(row["label"] != row["predicted"] for row in after["top_losses"])
    losses = [row["loss"] for row in after["top_losses"]]
    assert losses == sorted(losses, reverse=True)
    assert "id='after_training'" in (out / REPORT_HTML).read_text()
    assert report["timings_s"]["total"] > 0
    card = (out / "README.md").read_text()
    assert "Data check" in card


def test_inspect_cli_refuses_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert inspect_main([str(tmp_path / "nope"), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_exclusion_list_reads_json_and_text(tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text(json.dumps({"exclude": ["train/a/1.png"]}))
    (tmp_path / "l.txt").write_text("# comment\ntrain/a/2.png\t# label issue\n\n")
    assert read_exclusions(tmp_path / "r.json") == {"train/a/1.png"}
    assert read_exclusions(tmp_path / "l.txt") == {"train/a/2.png"}


def test_train_tab_panel_shows_counts_findings_and_top_losses(trained: tuple[Path, set]) -> None:
    from demo.data_check_view import render_data_check

    out, _ = trained
    html = render_data_check(out)
    assert "Data check of 53 images" in html and "Top losses" in html
    assert html.count("data:image/png;base64,") >= 2 and "<img src=x" not in html
    assert str(out) not in html  # no server path reaches the browser
    assert render_data_check(out.parent / "no-such-run") == ""


def test_inspect_with_a_checkpoint_uses_its_split_and_adds_its_top_losses(
    planted: Path, trained: tuple[Path, set], tmp_path: Path
) -> None:
    out, excluded = trained
    assert inspect_main([str(planted), "--checkpoint", str(out), "--out", str(tmp_path), "--quiet"]) == 0
    report = json.loads((tmp_path / REPORT_JSON).read_text())
    assert report["model"] == TINY_MODEL and report["image_size"] == 32
    assert report["num_files"] == 53  # the run's recorded split, without the files it left out
    assert report["after_training"]["num_images"] == 14
    assert (tmp_path / "top_losses.png").is_file() == bool(report["after_training"]["top_losses"])


def test_published_folder_leaves_the_data_report_out_and_its_card_names_no_file(
    trained: tuple[Path, set], tmp_path: Path
) -> None:
    from finetune.data_report import LOCAL_FILES
    from finetune.publish import write_upload_folder

    out, _ = trained
    assert (out / REPORT_JSON).is_file() and (out / REPORT_HTML).is_file()
    write_upload_folder(out, "someone/digits", tmp_path / "upload", None)
    uploaded = {p.name for p in (tmp_path / "upload").rglob("*") if p.is_file()}
    assert not uploaded & set(LOCAL_FILES)
    card = (tmp_path / "upload" / "README.md").read_text()
    assert "## Data check" in card and "| Likely label issues |" in card  # the counts stay
    assert "top_losses.png" not in card and "val/digit_" not in card and "train/digit_" not in card


def test_neighbours_of_a_large_set_are_searched_on_principal_directions_and_rescored_exactly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Above EXACT_SEARCH_UP_TO images the search runs on a few directions; what it returns must still be
    the exact cosines, the planted copies must still be each other's first neighbour, and the neighbour
    lists must mostly agree with the exact search (real features: sklearn's digits, 64 pixels each)."""
    import torch
    from sklearn.datasets import load_digits

    from finetune import neighbours

    digits = torch.tensor(load_digits().data, dtype=torch.float32)
    copies = digits[:20] + 0.05 * torch.randn(20, 64, generator=torch.Generator().manual_seed(0))
    features = torch.cat([digits, copies])  # rows 1797.. are near copies of rows 0..19
    exact = neighbours.nearest_neighbours(features)
    monkeypatch.setattr(neighbours, "EXACT_SEARCH_UP_TO", 500)
    monkeypatch.setattr(neighbours, "SEARCH_DIMS", 16)
    searched = neighbours.nearest_neighbours(features)

    unit = torch.nn.functional.normalize(features, dim=1)
    true = (unit[:, None, :] * unit[searched.index]).sum(dim=2)
    assert torch.allclose(searched.similarity, true, atol=1e-5)  # exact cosines, best first
    assert bool((searched.similarity[:, :-1] >= searched.similarity[:, 1:]).all())
    assert searched.index[:20, 0].tolist() == list(range(1797, 1817))  # each copy found first
    assert searched.index[1797:, 0].tolist() == list(range(20))
    pairs = zip(exact.index.tolist(), searched.index.tolist(), strict=True)
    overlap = sum(len(set(a) & set(b)) for a, b in pairs)
    assert overlap / (10 * len(features)) > 0.85  # 0.92 here with 16 of 64 directions
    assert not bool((searched.index == torch.arange(len(features))[:, None]).any())  # never itself


def test_principal_directions_match_the_svd_of_the_centred_rows() -> None:
    """The covariance route (no centred copy of a large feature matrix) finds the SVD's top directions."""
    import torch

    from finetune.neighbours import principal_directions

    generator = torch.Generator().manual_seed(0)
    scales = torch.linspace(5.0, 0.1, 32)  # distinct variances: a well-defined order of directions
    rows = torch.randn(2000, 32, generator=generator) * scales @ torch.linalg.qr(torch.randn(32, 32))[0] + 3.0
    mean, basis = principal_directions(rows, 4)
    centred = rows - rows.mean(dim=0)
    top = torch.linalg.svd(centred, full_matrices=False).Vh[:4].T
    assert torch.allclose(mean, rows.mean(dim=0), atol=1e-5)
    assert basis.shape == (32, 4) and basis.dtype == rows.dtype
    assert torch.allclose((basis.T @ top).abs(), torch.eye(4), atol=1e-3)  # same directions, same order


def test_the_checks_read_unit_rows_without_copying_or_changing_them() -> None:
    """The caller normalizes the features once (60,000 x 1,280 is 307 MB a copy): the checks must find the
    same on unit rows as on raw ones, take unit rows as they are, and leave them unchanged."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    from finetune.data_health import label_issues, outliers
    from finetune.neighbours import nearest_neighbours, unit_rows

    digits = load_digits()
    raw = torch.tensor(digits.data[:600], dtype=torch.float32) + 1.0
    targets = digits.target[:600].copy()
    targets[:6] = (targets[:6] + 1) % 10  # six planted label errors
    files = [FileRef(f"train/{i}.png", str(t), "train") for i, t in enumerate(targets)]
    classes = [str(c) for c in range(10)]
    unit = torch.nn.functional.normalize(raw, dim=1)
    kept = unit.clone()

    assert unit_rows(unit) is unit  # no copy of rows already of length 1
    assert unit_rows(raw) is not raw and torch.allclose(unit_rows(raw), unit)
    from_raw, from_unit = nearest_neighbours(raw), nearest_neighbours(unit)
    assert torch.equal(from_raw.index, from_unit.index)
    issues = [label_issues(files, classes, rows, nearest_neighbours(rows)) for rows in (raw, unit)]
    assert [f.files[0].path for f in issues[0]] == [f.files[0].path for f in issues[1]]
    assert len({f.files[0].path for f in issues[1]} & {f"train/{i}.png" for i in range(6)}) >= 4
    assert [f.files for f in outliers(files, classes, raw)] == [
        f.files for f in outliers(files, classes, unit)
    ]
    assert torch.equal(unit, kept) and np.isfinite(unit.numpy()).all()  # the caller's rows are unchanged
