"""Dataset scanning, the stratified split, bad-input errors and the decoded-image cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_digits_folder
from PIL import Image

from finetune.data import Sample, find_layout, scan_dataset, stratified_split, suggest_image_size
from finetune.errors import DatasetError
from finetune.modeling import create_model_and_transforms, split_eval_transform
from finetune.pixel_cache import build_cache


def test_split_is_stratified_seeded_and_disjoint(tmp_path: Path) -> None:
    root = write_digits_folder(tmp_path / "d", classes=(0, 1, 2), per_class=10)
    split = scan_dataset(root, val_fraction=0.2, seed=0)
    assert split.classes == ["digit_0", "digit_1", "digit_2"]
    assert split.class_counts(split.val) == {"digit_0": 2, "digit_1": 2, "digit_2": 2}
    assert split.class_counts() == {"digit_0": 8, "digit_1": 8, "digit_2": 8}
    train_paths = {s.path for s in split.train}
    assert not train_paths & {s.path for s in split.val}
    again = scan_dataset(root, val_fraction=0.2, seed=0)
    assert [s.path for s in again.val] == [s.path for s in split.val]
    other = scan_dataset(root, val_fraction=0.2, seed=1)
    assert [s.path for s in other.val] != [s.path for s in split.val]


def test_a_large_set_holds_out_a_smaller_share_up_to_the_cap() -> None:
    """--val-max-images: the same smaller share of every class, so validation stays stratified."""
    sizes = {0: 1000, 1: 500, 2: 100, 3: 2}
    samples = [Sample(Path(f"c{t}/{i:04d}.png"), t) for t, n in sizes.items() for i in range(n)]

    def val_counts(val_max_images: int) -> dict[int, int]:
        _, val = stratified_split(samples, 0.2, seed=0, val_max_images=val_max_images)
        return {t: sum(s.target == t for s in val) for t in sizes}

    assert val_counts(0) == {0: 200, 1: 100, 2: 20, 3: 1}  # no cap: 20% of each class
    assert val_counts(161) == {0: 100, 1: 50, 2: 10, 3: 1}  # 10% of each (161 / 1,602), a class of 2 keeps 1
    assert val_counts(1000) == val_counts(0)  # a cap above 20% of the set changes nothing
    train, val = stratified_split(samples, 0.2, seed=0, val_max_images=161)
    assert len(train) + len(val) == len(samples) and not {s.path for s in train} & {s.path for s in val}


def test_single_image_class_stays_in_training(tmp_path: Path) -> None:
    root = write_digits_folder(tmp_path / "d", classes=(0, 1), per_class=5)
    for extra in list((root / "digit_1").iterdir())[1:]:
        extra.unlink()
    split = scan_dataset(root)
    assert split.class_counts() == {"digit_0": 4, "digit_1": 1}
    assert split.class_counts(split.val) == {"digit_0": 1, "digit_1": 0}


@pytest.mark.parametrize("val_name", ["val", "valid"])
def test_existing_train_and_val_folders_are_used(tmp_path: Path, val_name: str) -> None:
    write_digits_folder(tmp_path / "train", classes=(0, 1), per_class=6)
    write_digits_folder(tmp_path / val_name, classes=(0, 1), per_class=2)
    split = scan_dataset(tmp_path)
    assert split.has_val_folder
    assert len(split.train) == 12 and len(split.val) == 4
    assert all(val_name in s.path.parts for s in split.val)


def test_missing_folder_is_a_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nowhere")


def test_fewer_than_two_classes_is_a_dataset_error(tmp_path: Path) -> None:
    write_digits_folder(tmp_path / "d", classes=(0,), per_class=3)
    with pytest.raises(DatasetError, match="at least 2 class"):
        scan_dataset(tmp_path / "d")


def test_class_without_images_is_a_dataset_error(tmp_path: Path) -> None:
    root = write_digits_folder(tmp_path / "d", classes=(0, 1), per_class=3)
    (root / "empty_class").mkdir()
    (root / "empty_class" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="'empty_class'.*no images"):
        scan_dataset(root)


def test_cache_skips_bad_files_and_is_reused(tmp_path: Path) -> None:
    root = write_digits_folder(tmp_path / "d", classes=(0, 1), per_class=4)
    (root / "digit_0" / "broken.png").write_bytes(b"not a png at all")
    (root / "digit_1" / "empty.jpg").write_bytes(b"")
    split = scan_dataset(root, val_fraction=0.25)
    samples = split.train + split.val
    created = create_model_and_transforms("test_efficientnet", 2, weights="none", img_size=48)
    geometric, _, _ = split_eval_transform(created.data_config)
    cache_path = tmp_path / "cache" / "all_48.npy"
    cached = build_cache(samples, geometric, 48, cache_path)
    assert len(cached) == 8
    assert tuple(cached.pixels.shape) == (8, 3, 48, 48)
    assert sorted(p.name for p, _ in cached.bad_files) == ["broken.png", "empty.jpg"]
    assert cached.pixels[:].float().std() > 10  # real digits, not zeros
    again = build_cache(samples, lambda image: pytest.fail("cache should be reused"), 48, cache_path)
    assert torch.equal(again.pixels[:], cached.pixels[:])


def test_cached_pixels_match_the_eval_transform(tmp_path: Path) -> None:
    """Training sees exactly what inference sees: the same resize and crop, then the same normalization."""
    import torch

    from finetune.augment import normalize
    from finetune.images import open_image
    from finetune.modeling import create_eval_transform

    root = write_digits_folder(tmp_path / "d", classes=(0, 1), per_class=2, size=40)
    split = scan_dataset(root, val_fraction=0.5)
    created = create_model_and_transforms("test_efficientnet", 2, weights="none", img_size=64)
    geometric, mean, std = split_eval_transform(created.data_config)
    cached = build_cache(split.train, geometric, 64)
    expected = create_eval_transform(created.data_config)(open_image(cached.paths[0]))
    assert torch.allclose(normalize(cached.pixels[:1], mean, std)[0], expected, atol=1e-5)


def test_suggested_size_doubles_small_images_and_keeps_native_for_photos(
    tmp_path: Path, photo_dir: Path
) -> None:
    root = write_digits_folder(tmp_path / "d", classes=(0, 1), per_class=3, size=64)
    assert suggest_image_size(scan_dataset(root).train, native_size=224) == 128
    photos = tmp_path / "photos"
    for name in ("cats", "cups"):
        (photos / name).mkdir(parents=True)
    shutil.copy(photo_dir / "chelsea.jpg", photos / "cats")
    shutil.copy(photo_dir / "coffee.jpg", photos / "cups")
    assert suggest_image_size(scan_dataset(photos).train + scan_dataset(photos).val, native_size=224) == 224
    tiny = tmp_path / "tiny"
    for name in ("a", "b"):
        (tiny / name).mkdir(parents=True)
        Image.new("RGB", (20, 20)).save(tiny / name / "x.png")
    assert suggest_image_size(stratified_split(scan_dataset(tiny).train, 0.2, 0)[0], native_size=224) == 64


def test_train_and_test_folders_split_validation_out_of_train(tmp_path: Path) -> None:
    """train/ + test/: validation comes out of train/; test/ is kept apart (never a class, never trained)."""
    write_digits_folder(tmp_path / "train", classes=(0, 1), per_class=10)
    write_digits_folder(tmp_path / "test", classes=(0, 1), per_class=3)
    split = scan_dataset(tmp_path, val_fraction=0.2)
    assert split.classes == ["digit_0", "digit_1"] and split.layout == "train+test"
    assert not split.has_val_folder
    assert (len(split.train), len(split.val), len(split.test)) == (16, 4, 6)
    assert all(s.path.parts[-3] == "train" for s in split.train + split.val)
    assert all(s.path.parts[-3] == "test" for s in split.test)
    assert find_layout(tmp_path).class_roots() == [tmp_path / "train", tmp_path / "test"]


def test_train_val_and_test_folders_are_all_used(tmp_path: Path) -> None:
    for name, count in (("train", 6), ("val", 2), ("test", 3)):
        write_digits_folder(tmp_path / name, classes=(0, 1), per_class=count)
    split = scan_dataset(tmp_path)
    assert split.layout == "train+val+test" and split.has_val_folder
    assert (len(split.train), len(split.val), len(split.test)) == (12, 4, 6)
    assert {s.path.parts[-3] for s in split.val} == {"val"}


@pytest.mark.parametrize(
    ("folders", "message"),
    [
        (("test", "cat", "dog"), "has a test/ folder but no train/ folder"),
        (("val", "cat", "dog"), "has a val/ folder but no train/ folder"),
        (("train", "test", "extra"), "has a train/ folder and also 'extra'"),
    ],
)
def test_ambiguous_layouts_are_refused_instead_of_becoming_classes(
    tmp_path: Path, folders: tuple[str, ...], message: str
) -> None:
    for name in folders:
        write_digits_folder(tmp_path / name, classes=(0, 1), per_class=2)
    with pytest.raises(DatasetError, match=message):
        scan_dataset(tmp_path)


def test_test_folder_classes_must_be_training_classes(tmp_path: Path) -> None:
    write_digits_folder(tmp_path / "train", classes=(0, 1), per_class=4)
    write_digits_folder(tmp_path / "test", classes=(0, 7), per_class=2)
    with pytest.raises(DatasetError, match="test/ folder of .* has classes that train/ lacks: digit_7"):
        scan_dataset(tmp_path)


def test_interrupted_cache_build_resumes_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stopped decode keeps its images on disk; the next build decodes only the rest, a changed list all."""
    import finetune.pixel_cache
    from finetune.errors import StoppedError

    monkeypatch.setattr(finetune.pixel_cache, "PROGRESS_EVERY", 4)
    root = write_digits_folder(tmp_path / "d", classes=(0, 1), per_class=12)
    samples = scan_dataset(root, val_fraction=0.25).train
    created = create_model_and_transforms("test_efficientnet", 2, weights="none", img_size=48)
    geometric, _, _ = split_eval_transform(created.data_config)
    decoded: list[Path] = []

    def counting(image: Image.Image) -> Image.Image:
        decoded.append(image)
        return geometric(image)

    cache_path = tmp_path / "cache" / "train_48.npy"
    with pytest.raises(StoppedError, match=f"8 of {len(samples)} are decoded and kept"):
        build_cache(samples, counting, 48, cache_path, workers=1, should_stop=lambda: len(decoded) >= 8)
    assert not cache_path.exists() and cache_path.with_suffix(".progress.json").is_file()
    decoded.clear()
    resumed = build_cache(samples, counting, 48, cache_path, workers=1)
    assert len(decoded) == len(samples) - 8  # only the images the first build did not reach
    assert cache_path.is_file() and not cache_path.with_suffix(".progress.json").exists()
    in_memory = build_cache(samples, geometric, 48)
    assert torch.equal(resumed.pixels[:], in_memory.pixels[:])
    assert resumed.paths == in_memory.paths

    decoded.clear()
    with pytest.raises(StoppedError):
        build_cache(samples[1:], counting, 48, cache_path, workers=1, should_stop=lambda: len(decoded) >= 4)
    decoded.clear()
    other = build_cache(samples, counting, 48, cache_path, workers=1)  # the file list changed again
    assert len(decoded) == len(samples)  # a progress file of other files is never reused
    assert torch.equal(other.pixels[:], in_memory.pixels[:])


LIMITED_TRAINING = """
import json, resource, sys
from pathlib import Path
from finetune.config import TrainConfig
from finetune.evaluate import evaluate_folder
from finetune.trainer import fine_tune

small, data, out = map(Path, sys.argv[1:4])
headroom, size = map(int, sys.argv[4:6])
def status_bytes(field):  # VmData: private writable memory, what RLIMIT_DATA counts (not shared file maps)
    lines = open("/proc/self/status").read().splitlines()
    return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field))
def train(folder, run):
    fine_tune(TrainConfig(
        data_dir=folder, out=run, model="test_efficientnet", weights="none", img_size=size,
        strategy="finetune", epochs=1, batch_size=8, quiet=True, workers=2,
    ))
    return evaluate_folder(folder, str(run), runtime="torch")[0]
train(small, out.with_name("warmup"))  # what training and evaluation need besides the cache
freed_since_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - status_bytes("VmRSS")
limit = status_bytes("VmData") + max(0, freed_since_peak) + headroom
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
metrics = train(data, out)
print(json.dumps({"n": metrics["n"], "top1": metrics["top1"]}))
"""


def test_training_on_a_cache_larger_than_the_memory_limit(tmp_path: Path) -> None:
    """RLIMIT_DATA caps private memory below what training needs plus the cache: training still runs.

    The limit is the peak of a warm-up run with the same validation folder and as many training images (full
    batches in every pass over them: imports, model, optimizer, activations, evaluation batches) plus a
    headroom of less than half of what the big run's cache adds. glibc's mmap threshold is fixed, so freed
    activations leave the data segment instead of fragmenting it (its default threshold moves as blocks are
    freed, which made the same run's data segment differ by 100 MB between machines).

    The cache is a shared file mapping (not counted by RLIMIT_DATA) and batches are gathered
    from it, so only a batch of pixels is ever in private memory; a cache held in RAM raises MemoryError.
    """
    import json
    import subprocess
    import sys

    size, per_class, val_per_class = 320, 150, 22  # 66 validation images: full evaluation batches of 64
    small, big = tmp_path / "small", tmp_path / "big"
    for root, train_per_class in ((small, val_per_class), (big, per_class)):
        write_digits_folder(root / "train", classes=(0, 1, 2), per_class=train_per_class)
        write_digits_folder(root / "val", classes=(0, 1, 2), per_class=val_per_class)
    cache_bytes = 3 * (per_class + val_per_class) * 3 * size * size  # ~158 MB of train and val .npy
    added_bytes = 3 * (per_class - val_per_class) * 3 * size * size  # ~118 MB more than the warm-up's
    headroom = 40 * 2**20
    result = subprocess.run(
        [sys.executable, "-c", LIMITED_TRAINING, str(small), str(big), str(tmp_path / "run"), str(headroom),
         str(size)],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1],
        # one malloc arena per thread would pass the limit; a fixed mmap threshold returns freed blocks
        env={**os.environ, "MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    on_disk = sum(p.stat().st_size for p in (tmp_path / "run" / ".cache").glob("*.npy"))
    assert on_disk > cache_bytes and added_bytes > 2 * headroom
    assert json.loads(result.stdout.strip().splitlines()[-1])["n"] == 3 * val_per_class


def _rss_file_mb() -> float:
    """Resident pages of file mappings in this process (the cache's pages count here once touched)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("RssFile:")[1].split()[0]) / 1024


def test_reading_the_cache_does_not_grow_resident_memory(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """An epoch over a memory-mapped cache touches every page; released every few MB, RSS stays flat."""
    import numpy as np

    from finetune import pixel_cache

    path = tmp_path / "cache.npy"
    pixels = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(256, 3, 128, 128))  # 12 MB
    pixels[:] = 7
    pixels.flush()
    del pixels

    def epoch_growth(release_every: int) -> float:
        monkeypatch.setattr(pixel_cache, "RELEASE_EVERY_BYTES", release_every)
        cached = pixel_cache.CachedPixels(np.load(path, mmap_mode="r"), np.arange(256))
        before = _rss_file_mb()
        for index in torch.split(torch.randperm(256), 16):
            assert int(cached[index][0, 0, 0, 0]) == 7
        return _rss_file_mb() - before

    assert epoch_growth(release_every=2**40) > 10  # never released: the whole 12 MB cache is resident
    assert epoch_growth(release_every=2**20) < 3  # released every MB: about a MB at a time


def test_views_of_one_cache_share_the_page_release(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A probe sample and the training set are views of one mapping: reads through either count toward
    one release, so many views cannot each keep their own share of mapped pages."""
    import numpy as np

    from finetune import pixel_cache

    path = tmp_path / "cache.npy"
    pixels = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(64, 3, 64, 64))  # 768 KB
    pixels[:] = 3
    pixels.flush()
    del pixels
    rows_40 = 3 * 64 * 64 * 40  # more than one view holds
    monkeypatch.setattr(pixel_cache, "RELEASE_EVERY_BYTES", rows_40)
    released = []
    monkeypatch.setattr(pixel_cache, "release_pages", lambda array: released.append(len(array)))
    whole = pixel_cache.CachedPixels(np.load(path, mmap_mode="r"), np.arange(64))
    views = [whole.subset(np.arange(0, 32)), whole.subset(np.arange(32, 64))]
    for start in range(0, 32, 4):  # four rows through each view in turn: 64 rows read in all
        for view in views:
            assert int(view[torch.arange(start, start + 4)][0, 0, 0, 0]) == 3
    assert len(released) == 1  # 64 rows read through the two views: one release (none if each counted alone)
