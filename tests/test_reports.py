"""Per-class reports: macro averages speak only for classes that have images in the evaluated set."""

from __future__ import annotations

import pytest

from finetune.reports import classes_without_images, classification_report, confusion_matrix


def test_macro_f1_leaves_out_a_class_without_validation_images() -> None:
    """Perfect predictions on the classes that have images score 1.0, not 2/3 (the empty class is named)."""
    labels = ["cat", "dog", "owl"]
    matrix = confusion_matrix([0, 0, 1, 1, 1], [0, 0, 1, 1, 1], num_classes=3)
    report = classification_report(matrix, labels)
    assert report["macro avg"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 5}
    assert report["owl"]["support"] == 0
    assert classes_without_images(report) == ["owl"]


def test_macro_averages_weigh_each_present_class_equally() -> None:
    # cat: 3 of 4 right (one called dog); dog: its one image called owl; owl: no image of its own
    matrix = confusion_matrix([0, 0, 0, 0, 1], [0, 0, 0, 1, 2], num_classes=3)
    report = classification_report(matrix, ["cat", "dog", "owl"])
    assert report["cat"]["recall"] == pytest.approx(0.75) and report["dog"]["recall"] == pytest.approx(0.0)
    assert report["macro avg"]["recall"] == pytest.approx((0.75 + 0.0) / 2)
    assert report["macro avg"]["precision"] == pytest.approx((1.0 + 0.0) / 2)
    assert report["weighted avg"]["recall"] == pytest.approx(3 / 5)  # the accuracy
