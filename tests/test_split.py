"""The run's recorded split (split.json): written once, read back as the same split, changes detected."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import write_digits_folder

from finetune.data import scan_dataset
from finetune.errors import CheckpointError
from finetune.split import SPLIT_FILE, compare_with_folder, read_split, record_split, write_split


def recorded(root: Path, run_dir: Path, **scan) -> None:
    write_split(run_dir, record_split(scan_dataset(root, **scan), root))


def test_split_json_lists_every_file_with_its_subset_class_and_sha256(tmp_path: Path) -> None:
    root = write_digits_folder(tmp_path / "d", classes=(0, 1), per_class=5)
    recorded(root, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / SPLIT_FILE).read_text())
    assert saved["layout"] == "folders" and saved["classes"] == ["digit_0", "digit_1"]
    assert saved["counts"] == {"train": 8, "val": 2, "test": 0}
    first = saved["files"][0]
    assert first["path"].startswith("digit_0/") and first["class"] == "digit_0" and first["subset"] == "train"
    assert first["sha256"] == hashlib.sha256((root / first["path"]).read_bytes()).hexdigest()


def test_recorded_split_reads_back_as_the_same_split(tmp_path: Path) -> None:
    for name, count in (("train", 6), ("test", 2)):
        write_digits_folder(tmp_path / "data" / name, classes=(0, 1), per_class=count)
    split = scan_dataset(tmp_path / "data", seed=3)
    write_split(tmp_path / "run", record_split(split, tmp_path / "data"))
    again = read_split(tmp_path / "run").to_split()
    assert again.classes == split.classes and again.layout == "train+test"
    for subset, samples in split.subsets().items():
        assert [(s.path, s.target) for s in again.subsets()[subset]] == [(s.path, s.target) for s in samples]


def test_adding_a_file_would_reshuffle_a_recomputed_split_but_not_the_recorded_one(tmp_path: Path) -> None:
    """Why the split is recorded: one new file moves validation images of its class into training."""
    root = write_digits_folder(tmp_path / "d", classes=(0, 1), per_class=20)
    recorded(root, tmp_path / "run")
    before = {s.path for s in scan_dataset(root).val}
    shutil.copy(root / "digit_0" / "000.png", root / "digit_0" / "new.png")
    after = {s.path for s in scan_dataset(root).val}
    assert before - after, "a recomputed split should have moved some validation images"
    record = read_split(tmp_path / "run")
    assert {s.path for s in record.to_split().val} == before
    changes = compare_with_folder(record)
    assert changes.added == ["digit_0/new.png"] and not changes.removed and not changes.modified
    assert "1 file(s) added (digit_0/new.png)" in changes.describe()


def test_removed_and_modified_files_are_named(tmp_path: Path) -> None:
    root = write_digits_folder(tmp_path / "d", classes=(0, 1), per_class=5)
    recorded(root, tmp_path / "run")
    (root / "digit_1" / "004.png").unlink()
    (root / "digit_0" / "002.png").write_bytes((root / "digit_0" / "003.png").read_bytes())
    record = read_split(tmp_path / "run")
    changes = compare_with_folder(record)
    assert (changes.added, changes.removed) == ([], ["digit_1/004.png"])
    assert changes.modified == ["digit_0/002.png"]
    every = {f"digit_{c}/{n:03d}.png" for c in (0, 1) for n in range(5)}
    assert changes.unchanged(record) == every - {"digit_1/004.png", "digit_0/002.png"}


def test_a_new_test_folder_is_a_layout_change(tmp_path: Path) -> None:
    write_digits_folder(tmp_path / "data" / "train", classes=(0, 1), per_class=4)
    recorded(tmp_path / "data", tmp_path / "run")
    write_digits_folder(tmp_path / "data" / "test", classes=(0, 1), per_class=1)
    changes = compare_with_folder(read_split(tmp_path / "run"))
    assert changes.layout == ("train", "train+test")
    assert "the layout changed from train to train+test" in changes.describe()


def test_a_damaged_split_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / SPLIT_FILE).write_text('{"version": 1, "files": [{"path": "x"}]}')
    with pytest.raises(CheckpointError, match="is damaged"):
        read_split(tmp_path)
    assert read_split(tmp_path / "elsewhere") is None  # no record at all: the caller decides
