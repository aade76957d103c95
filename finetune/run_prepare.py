"""Everything before a run's first update: its split, model, recipe plan, decoded caches and class balance.

`finetune.trainer.fine_tune` calls `prepare_run` once, on every process; what it returns (`TrainingRun`) is
then trained by the probe and fine-tuning phases and closed by `finetune.run_finish`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from finetune import labels_csv, multilabel_train
from finetune.config import TrainConfig
from finetune.data import DatasetSplit, scan_dataset, write_bad_files
from finetune.distributed import DistContext
from finetune.engine import EventCallback, StopCheck, TrainEvent
from finetune.errors import DatasetError
from finetune.inspect import apply_exclusions
from finetune.modeling import (
    create_model_and_transforms,
    draft_size_for,
    resolve_model_data_config,
    split_eval_transform,
)
from finetune.pixel_cache import CachedImages, build_cache
from finetune.precision import resolve_precision, training_precision
from finetune.recipe import plan_recipe
from finetune.split import (
    SPLIT_FILE,
    compare_with_folder,
    read_split,
    record_split,
    warn_about_classes,
    write_split,
)
from finetune.training_run import TrainingRun

logger = logging.getLogger(__name__)

BAD_FILES = "bad_files.txt"


def prepare_run(
    config: TrainConfig, dist: DistContext, emit: EventCallback, stop: StopCheck, resume: bool = False
) -> TrainingRun:
    """Scan (or reread) the split, create the model, plan the recipe and decode every subset once.

    Everything a run needs before its first update, checked up front (no validation image, a class with no
    readable image) so that a bad dataset fails in seconds rather than after the probe.
    """
    emit(TrainEvent("status", message=f"Scanning {config.data_dir}"))
    split = _dataset_split(config, dist, resume)
    if not split.val:
        raise DatasetError(
            f"'{config.data_dir}' leaves no validation image: give some class at least 2 images "
            "or add a val/ folder."
        )
    torch.manual_seed(config.seed)  # a new head (and a random-init model) starts the same on every run
    created = create_model_and_transforms(config.model, len(split.classes), config.weights)
    model = created.model
    native = int(created.data_config["input_size"][-1])
    plan = plan_recipe(
        split.train, native, config.img_size, config.frozen_groups, linear_probe=config.strategy == "linear"
    )
    if isinstance(split, labels_csv.MultiLabelSplit):  # several things an image: see multilabel_train
        plan = multilabel_train.plan_resolution(plan, native, config.img_size)
    image_size = plan.image_size
    data_config = resolve_model_data_config(model, image_size)
    if isinstance(split, labels_csv.MultiLabelSplit):
        data_config = multilabel_train.whole_image(data_config)
    geometric, mean, std = split_eval_transform(data_config)
    draft = draft_size_for(data_config)  # decode as inference does, so both see the same pixels
    caches = _decode_subsets(config, split, dist, emit, stop, geometric, data_config, draft)
    bad = [file for cache in caches.values() for file in cache.bad_files]
    task = (
        multilabel_train.MultiLabelTask(split.classes, config.multilabel_loss)
        if isinstance(split, labels_csv.MultiLabelSplit)
        else None
    )
    if task is not None:
        warnings = task.attach_targets(caches, split.label_sets(), config.data_dir)
    else:
        _check_usable(split.classes, caches["train"], bad, config.data_dir)
        warnings = warn_about_classes(
            split.classes, caches["train"].targets.tolist(), caches["val"].targets.tolist()
        )
    for warning in warnings:
        logger.warning("%s", warning)
        emit(TrainEvent("status", message=f"Warning: {warning}"))
    precision = resolve_precision(config.precision, dist.device)
    train_precision = training_precision(precision, config.precision, image_size)
    model.to(dist.device).to(memory_format=torch.channels_last)
    if task is not None:  # images showing each label
        counts = caches["train"].targets.sum(dim=0).numpy().astype(np.int64)
    else:
        counts = np.bincount(caches["train"].targets.numpy(), minlength=len(split.classes))
    studio = {
        "train_config": config.to_dict(),
        "weights_source": created.weights_source,
        "versions": _versions(),
        "dataset": {
            "num_train": len(caches["train"]),
            "num_val": len(caches["val"]),
            "num_test": len(caches["test"]) if "test" in caches else 0,
            "layout": split.layout,
            "has_val_folder": split.has_val_folder,
            "warnings": warnings,
            "class_counts": {label: int(n) for label, n in zip(split.classes, counts, strict=True)},
            "num_bad_files": len(bad),
            "image_size": image_size,
        },
        "plan": {"image_size": image_size, "frozen_groups": plan.frozen_groups, "reason": plan.reason},
        "precision": precision.name,  # evaluation and the probe's features
        "train_precision": train_precision.name,  # fine-tuning updates
        "device": str(dist.device),
        "world_size": dist.world_size,
    }
    run = TrainingRun(
        config=config, dist=dist, emit=emit, should_stop=stop, precision=precision,
        train_precision=train_precision, model=model,
        labels=split.classes, data_config=data_config, mean=mean, std=std, train=caches["train"],
        val=caches["val"], studio=studio, test=caches.get("test"), plan=plan, multilabel=task,
    )  # fmt: skip
    if task is not None:
        studio["balance_used"] = task.set_balance(config.balance, counts, len(caches["train"]))
        studio["multilabel"] = task.studio()
    else:
        _set_balance(run, counts)
    if bad and dist.is_main:
        write_bad_files(config.out / BAD_FILES, bad)
        logger.warning(
            "Skipped %d unreadable image(s); the list is in %s (first: %s: %s)",
            len(bad), config.out / BAD_FILES, bad[0][0], bad[0][1],
        )  # fmt: skip
    emit(TrainEvent("status", message=_describe(run)))
    return run


def _decode_subsets(
    config: TrainConfig,
    split: DatasetSplit,
    dist: DistContext,
    emit: EventCallback,
    stop: StopCheck,
    geometric: Callable[[Image.Image], Image.Image],
    data_config: dict[str, Any],
    draft: tuple[int, int] | None,
) -> dict[str, CachedImages]:
    """Each subset's decoded cache: built by the node's first process, then opened by the others.

    The file name holds the size and the crop, so a cache of other pixels (another size, or a center crop
    where a multi-label run sees whole images) is never mistaken for this run's.
    """
    cache_dir = config.cache_dir or (config.out / ".cache")
    image_size = int(data_config["input_size"][-1])
    crop_permille = round(float(data_config.get("crop_pct") or 1.0) * 1000)
    caches = {}
    for name, samples in split.subsets().items():
        if not samples:  # only test/ may be absent
            continue
        emit(
            TrainEvent(
                "status", phase="cache", message=f"Decoding {len(samples)} {name} images at {image_size} px"
            )
        )

        def progress(done: int, total: int, name: str = name) -> None:
            emit(TrainEvent("cache", phase=name, step=done, steps=total))

        path = cache_dir / f"{name}_{image_size}_crop{crop_permille}.npy"
        if dist.is_local_main:
            caches[name] = build_cache(
                samples, geometric, image_size, path, config.workers or None, progress, draft,
                stop if dist.world_size == 1 else None,  # one process: no rank left waiting at the barrier
                config.cache_max_gb,
            )  # fmt: skip
        dist.barrier()
        if not dist.is_local_main:
            caches[name] = build_cache(
                samples, geometric, image_size, path, config.workers or None, None, draft,
                max_gb=config.cache_max_gb,
            )  # fmt: skip
    return caches


def _dataset_split(config: TrainConfig, dist: DistContext, resume: bool) -> DatasetSplit:
    """A new run scans DATA_DIR and records the split in split.json; a resumed run reuses that record.

    Recomputing the split on resume would reshuffle any class whose files changed and move trained-on images
    into validation, so a dataset that changed since the run started is refused with what changed.
    """
    if labels_csv.is_labels_csv(config.data_dir):
        return labels_csv.csv_dataset_split(config, dist.is_main, resume)
    record = read_split(config.out) if resume else None
    if record is not None:
        changes = compare_with_folder(record, config.val_fraction, config.seed, config.workers or None)
        if changes:
            raise DatasetError(
                f"the dataset '{record.data_dir}' changed since this run started: {changes.describe()}. "
                "Resuming would train and validate on other images than the run so far (images could move "
                "between training and validation); restore the files, or start a new run on the dataset as "
                f"it is now: python -m finetune {record.data_dir} --out NEW_RUN_DIR."
            )
        return record.to_split()
    if resume:
        logger.warning(
            "%s has no %s (saved by an older version): recomputing the split from the folder, which only "
            "matches the first one if no file was added, removed or renamed since.", config.out, SPLIT_FILE,
        )  # fmt: skip
    split = scan_dataset(config.data_dir, config.val_fraction, config.seed, config.val_max_images)
    if config.exclude_issues is not None:  # files a data report flagged, left out on purpose
        split = apply_exclusions(split, config.data_dir, config.exclude_issues)
    if dist.is_main and not resume:
        write_split(config.out, record_split(split, config.data_dir, config.workers or None))
    return split


def _check_usable(
    classes: list[str], train: CachedImages, bad: list[tuple[Path, str]], data_dir: Path
) -> None:
    present = set(train.targets.tolist())
    empty = [name for index, name in enumerate(classes) if index not in present]
    if empty:
        raise DatasetError(
            f"class(es) {', '.join(repr(n) for n in empty)} in '{data_dir}' have no usable training image "
            f"({len(bad)} file(s) could not be read, e.g. {bad[0][0] if bad else '-'}); add readable images."
        )


def _set_balance(run: TrainingRun, counts: np.ndarray) -> None:
    mode = run.config.balance
    ratio = counts.max() / max(counts.min(), 1)
    if mode == "auto":
        mode = "loss" if ratio >= 3 else "none"
        if mode == "loss":
            logger.info("Classes differ %.1fx in size: weighting the loss by inverse class frequency.", ratio)
    run.studio["balance_used"] = mode
    inverse = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)
    if mode == "loss":
        run.class_weights = inverse
    elif mode == "sampler":
        run.sample_weights = inverse[run.train.targets]


def _describe(run: TrainingRun) -> str:
    data, train = run.studio["dataset"], run.train_precision.name
    return (
        f"{len(run.labels)} classes, {data['num_train']} train / {data['num_val']} val"
        + (f" / {data['num_test']} test (evaluated once, at the end)" if data.get("num_test") else "")
        + f" images at "
        f"{data['image_size']} px; {run.config.model} ({run.studio['weights_source']}) on {run.dist.device}, "
        f"{run.precision.name}" + ("" if train == run.precision.name else f" (training in {train})")
    )


def _versions() -> dict[str, str]:
    import platform

    import timm

    return {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "studio": "0.1.0",
    }
