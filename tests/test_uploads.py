"""Uploads: zips are extracted safely or refused whole; files per typed class become class folders."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from PIL import Image
from train_data import add_symlink, jpeg_bytes, photo_zip, write_photo_classes, zip_folder

from demo.uploads import UploadLimits, import_class_files, import_zip, parse_class_names
from finetune.data import scan_dataset
from finetune.errors import DatasetError


def files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file()) if folder.exists() else []


def two_class_zip(path: Path, extra: dict[str, bytes] | None = None) -> zipfile.ZipFile:
    """A zip with one good image in each of two classes, plus `extra` entries; returned open for more."""
    archive = zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED)
    for name in ("cat/a.jpg", "cat/b.jpg", "coffee/a.jpg"):
        archive.writestr(name, jpeg_bytes())
    for name, data in (extra or {}).items():
        archive.writestr(name, data)
    return archive


def test_zip_of_a_folder_of_class_folders_imports_and_scans(tmp_path: Path) -> None:
    dataset = import_zip(photo_zip(tmp_path, per_class=4), tmp_path / "data" / "datasets")
    assert dataset.class_counts == {"cat": 4, "coffee": 4}  # the top folder "photos/" was flattened
    assert dataset.skipped == []
    assert dataset.root.parent == tmp_path / "data" / "datasets"
    split = scan_dataset(dataset.root)
    assert split.classes == ["cat", "coffee"] and len(split.train) + len(split.val) == 8
    assert "8 images in 2 classes: cat (4), coffee (4)." in dataset.summary()


def test_zip_with_train_and_val_folders_keeps_them(tmp_path: Path) -> None:
    folder = tmp_path / "split"
    write_photo_classes(folder / "train", per_class=3)
    write_photo_classes(folder / "val", per_class=1, seed=7)
    dataset = import_zip(zip_folder(folder, tmp_path / "split.zip"), tmp_path / "datasets")
    assert dataset.has_val_folder and dataset.class_counts == {"cat": 4, "coffee": 4}
    assert scan_dataset(dataset.root).has_val_folder


def test_zip_with_train_and_test_folders_follows_the_clis_layout_rule(tmp_path: Path) -> None:
    """The zip import and the CLI share one layout rule: test/ is a held-out set, not a class."""
    folder = tmp_path / "split"
    write_photo_classes(folder / "train", per_class=3)
    write_photo_classes(folder / "test", per_class=1, seed=7)
    dataset = import_zip(zip_folder(folder, tmp_path / "split.zip"), tmp_path / "datasets")
    assert not dataset.has_val_folder and dataset.class_counts == {"cat": 3, "coffee": 3}  # test/ not counted
    split = scan_dataset(dataset.root)
    assert split.layout == "train+test" and len(split.test) == 2
    lone_test = tmp_path / "lone"
    write_photo_classes(lone_test, per_class=2)  # cat/ coffee/ and a test/ beside them: which is it?
    write_photo_classes(lone_test / "test", per_class=1)
    with pytest.raises(DatasetError, match="the zip has a test/ folder but no train/ folder") as refused:
        import_zip(zip_folder(lone_test, tmp_path / "lone.zip"), tmp_path / "datasets")
    assert str(tmp_path) not in str(refused.value)


def test_non_images_are_skipped_and_listed(tmp_path: Path) -> None:
    huge = tmp_path / "huge.png"
    Image.new("1", (9000, 8000)).save(huge)  # 72 megapixels in a few kB: over the pixel limit
    extra = {
        "cat/notes.txt": b"not an image",
        "coffee/broken.jpg": b"\xff\xd8\xff garbage",
        "coffee/huge.png": huge.read_bytes(),
        "README.md": b"# my dataset",
        "__MACOSX/cat/._a.jpg": b"\0\5\26\7",
        "cat/.DS_Store": b"\0",
    }
    with two_class_zip(tmp_path / "mixed.zip", extra):
        pass
    dataset = import_zip(tmp_path / "mixed.zip", tmp_path / "datasets")
    assert dataset.class_counts == {"cat": 2, "coffee": 1}
    reasons = {item.name: item.reason for item in dataset.skipped}
    assert set(reasons) == set(extra)
    assert reasons["cat/notes.txt"] == "not an image file (.txt)"
    assert reasons["coffee/broken.jpg"].startswith("not an image PIL can read")
    assert reasons["coffee/huge.png"].startswith("9000x8000 pixels, more than the limit")
    assert reasons["README.md"] == "not inside a class folder"
    assert reasons["__MACOSX/cat/._a.jpg"] == "hidden or system file"
    assert sorted(p.name for p in files_under(dataset.root)) == ["a.jpg", "a.jpg", "b.jpg"]
    summary = dataset.summary()
    assert "Skipped 6 file(s): " in summary and "cat/notes.txt: not an image file" in summary


@pytest.mark.parametrize("evil", ["../evil.jpg", "cat/../../evil.jpg", "/tmp/evil.jpg", "C:/evil.jpg"])
def test_zip_with_paths_outside_the_folder_is_refused_and_writes_nothing(tmp_path: Path, evil: str) -> None:
    datasets = tmp_path / "data" / "datasets"
    datasets.mkdir(parents=True)
    with two_class_zip(tmp_path / "evil.zip", {evil: jpeg_bytes()}):
        pass
    with pytest.raises(DatasetError, match="points outside its folder"):
        import_zip(tmp_path / "evil.zip", datasets)
    assert files_under(tmp_path / "data") == []
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "data" / "evil.jpg").exists()


def test_zip_with_a_symlink_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    datasets = tmp_path / "datasets"
    with two_class_zip(tmp_path / "link.zip") as archive:
        add_symlink(archive, "cat/passwd.jpg", "/etc/passwd")
    with pytest.raises(DatasetError, match=r"symbolic link \('cat/passwd.jpg'\)"):
        import_zip(tmp_path / "link.zip", datasets)
    assert files_under(datasets) == []


def test_zip_bomb_is_refused_before_anything_is_extracted(tmp_path: Path) -> None:
    datasets = tmp_path / "datasets"
    with two_class_zip(tmp_path / "bomb.zip") as archive:
        archive.writestr("cat/bomb.bmp", b"\0" * (20 * 1024**2))  # 20 MB of zeros deflate to ~20 kB
    assert (tmp_path / "bomb.zip").stat().st_size < 100_000
    with pytest.raises(DatasetError, match=r"expands \d[\d,]*x .*looks like a zip bomb"):
        import_zip(tmp_path / "bomb.zip", datasets)
    assert files_under(datasets) == []


def test_zip_over_the_uncompressed_size_limit_is_refused(tmp_path: Path) -> None:
    zip_path = photo_zip(tmp_path, per_class=3)
    total = sum(info.file_size for info in zipfile.ZipFile(zip_path).infolist())
    with pytest.raises(DatasetError, match="expands to more than"):
        import_zip(zip_path, tmp_path / "datasets", UploadLimits(max_total_bytes=total - 1))
    assert files_under(tmp_path / "datasets") == []


def test_zip_with_too_many_files_is_refused(tmp_path: Path) -> None:
    zip_path = photo_zip(tmp_path, per_class=3)
    with pytest.raises(DatasetError, match="holds 6 files; the limit is 5"):
        import_zip(zip_path, tmp_path / "datasets", UploadLimits(max_files=5))


def test_zip_with_one_class_or_no_zip_at_all_is_refused_clearly(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "one.zip", "w") as archive:
        archive.writestr("cat/a.jpg", jpeg_bytes())
        archive.writestr("cat/b.jpg", jpeg_bytes())
    with pytest.raises(DatasetError, match="at least 2 class folders .*found only 'cat'"):
        import_zip(tmp_path / "one.zip", tmp_path / "datasets")
    (tmp_path / "fake.zip").write_bytes(b"PK not really")
    with pytest.raises(DatasetError, match="not a readable zip file"):
        import_zip(tmp_path / "fake.zip", tmp_path / "datasets")
    assert files_under(tmp_path / "datasets") == []


def test_class_files_become_class_folders_and_non_images_are_listed(tmp_path: Path) -> None:
    photos = write_photo_classes(tmp_path / "photos", per_class=3)
    note = tmp_path / "notes.txt"
    note.write_text("hello")
    names = parse_class_names("cat,\n coffee ")
    classes = [(name, [*sorted((photos / name).iterdir())]) for name in names]
    classes[1][1].append(note)
    dataset = import_class_files(classes, tmp_path / "datasets")
    assert dataset.class_counts == {"cat": 3, "coffee": 3}
    assert [(item.name, item.reason) for item in dataset.skipped] == [
        ("coffee/notes.txt", "not an image file (.txt)")
    ]
    assert scan_dataset(dataset.root).classes == ["cat", "coffee"]


def test_class_names_are_checked(tmp_path: Path) -> None:
    for text, message in [
        ("cat", "at least 2 class names"),
        ("cat, Cat", "differ only in case"),
        ("cat, ../dog", r"'\.\./dog' is refused: it must start with a letter"),
        ("cat, .hidden", r"'\.hidden' is refused: it must start with a letter"),
    ]:
        with pytest.raises(DatasetError, match=message):
            parse_class_names(text)
    photos = write_photo_classes(tmp_path / "photos", per_class=2)
    with pytest.raises(DatasetError, match="'coffee' got no usable image"):
        import_class_files(
            [("cat", sorted((photos / "cat").iterdir())), ("coffee", [])], tmp_path / "datasets"
        )
    assert files_under(tmp_path / "datasets") == []
