"""The end of a training run: the kept checkpoint evaluated once more for the reports, calibrated, scored
once on test/ when there is one, and saved with its model card and a state marked finished.

The validation scores chose the kept weights, so they flatter it a little; test/ took no part in training or
in that choice, so its scores are the unbiased estimate.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune import checkpoint, multilabel_train, reports
from finetune.config import TrainConfig
from finetune.decode_budget import return_freed_memory
from finetune.distributed import DistContext
from finetune.engine import TrainEvent, evaluate, logits_metrics
from finetune.inspect import add_top_losses
from finetune.model_card import write_model_card
from finetune.precision import Precision
from finetune.probe_refit import FOLDS, fit_few_shot_head
from finetune.training_run import TrainingRun, TrainResult, keeps_probe, studio_of
from finetune.trust_fit import calibration_section, collect_outputs, draw_reliability, trust_sections

logger = logging.getLogger(__name__)


def finish(run: TrainingRun, interrupted: bool) -> TrainResult:
    """Evaluate the kept checkpoint once more for the reports, and once on test/ when there is one."""
    bad = [file for cache in (run.train, run.val, run.test) if cache is not None for file in cache.bad_files]
    return_freed_memory()  # the heap training fragmented goes back to the OS before the closing passes
    if not run.best:
        return TrainResult(run.run_dir, {}, run.history, "none", interrupted, bad)
    studio = studio_of(run)
    if run.multilabel is not None:
        return _finish_multilabel(run, interrupted, studio, bad)
    if run.dist.is_main:
        best = checkpoint.load_run(run.run_dir, device=run.dist.device)
        # fp32 so the stored score is what `finetune.evaluate` reproduces from the saved files
        fp32 = Precision(run.dist.device, None)
        # one fp32 pass over validation serves the reports and the calibration / "none of these" fit
        val_outputs = collect_outputs(best.model, run.val, run.mean, run.std, run.dist.device)
        result = logits_metrics(torch.from_numpy(val_outputs[0]), run.val.targets)
        matrix = reports.confusion_matrix(
            result.targets.tolist(), result.predictions.tolist(), len(run.labels)
        )
        report = reports.write_reports(run.run_dir, matrix, run.labels)
        add_top_losses(run.run_dir, run.config.data_dir, run.val, result.logits, run.labels)
        studio["metrics"].update(val_top1=result.top1, val_top5=result.top5, val_loss=result.loss)
        studio["metrics"]["val_macro_f1"] = report["macro avg"]["f1"]
        studio.update(trust_sections(best.model, run.train, run.val, run.mean, run.std, run.dist.device,
                                     len(run.labels), run.config.accept_rate,
                                     run.run_dir / "reliability.png", val_outputs))  # fmt: skip
        if keeps_probe(run) and run.best.get("phase") == "probe":
            _refit_probe(run, best.model, val_outputs[1], studio)
        if run.test is not None and len(run.test):
            studio["metrics"].update(_test_metrics(run, best.model, fp32))
        studio["metrics"]["interrupted"] = interrupted
        _save_final(run, best.model, studio, interrupted)
    run.dist.barrier()
    run.emit(TrainEvent("done", metrics=studio["metrics"]))
    return TrainResult(
        run.run_dir, studio["metrics"], run.history, studio["metrics"]["strategy_used"], interrupted, bad
    )


def _refit_probe(
    run: TrainingRun, model: torch.nn.Module, val_features: np.ndarray, studio: dict[str, Any]
) -> None:
    """Fit the kept probe's head again on training + validation features, into `model`; record it in `studio`.

    With a few images per class every one counts, and k-fold over all of them picks the head's L2 strength
    (finetune/probe_refit.py). The reported validation scores stay those of the head fitted on training
    images alone (held out); the "none of these" rule does not depend on the head (cosine distance of the
    features to the class means); the temperature is refitted on the k-fold's out-of-fold logits: the
    refitted head's own scale, measured on images that each fold held out.
    """
    _, train_features = collect_outputs(model, run.train, run.mean, run.std, run.dist.device)
    features = torch.from_numpy(np.concatenate([train_features, val_features]))
    targets = torch.cat([run.train.targets, run.val.targets])
    weights = None if run.class_weights is None else run.class_weights[targets]
    if run.sample_weights is not None:  # --balance sampler: the same inverse frequency over both
        counts = torch.bincount(targets, minlength=len(run.labels)).float()
        weights = (counts.sum() / (len(counts) * counts.clamp(min=1)))[targets]
    head = fit_few_shot_head(features, targets, len(run.labels), weights, run.config.seed)
    classifier = model.get_classifier()
    with torch.no_grad():
        classifier.weight.copy_(head.weight.to(classifier.weight))
        classifier.bias.copy_(head.bias.to(classifier.bias))
    if head.oof_logits is not None:
        fitted_on = f"out-of-fold logits of the refitted head ({FOLDS}-fold over train + validation)"
        studio["calibration"] = calibration_section(head.oof_logits, targets.numpy(), fitted_on)
        draw_reliability(head.oof_logits, targets.numpy(), studio["calibration"]["temperature"],
                         run.run_dir / "reliability.png")  # fmt: skip
    studio["probe_refit"] = {
        "train_images": len(run.train), "val_images": len(run.val), "c": head.c, "cv_top1": head.cv_top1,
    }  # fmt: skip
    logger.info(
        "Few-shot data: the probe's head was refitted on %d training + %d validation images (C = %g, chosen "
        "by %d-fold cross-validation); the validation scores above are those of the head fitted on training "
        "images alone.", len(run.train), len(run.val), head.c, FOLDS,
    )  # fmt: skip


def _finish_multilabel(
    run: TrainingRun, interrupted: bool, studio: dict[str, Any], bad: list[tuple[Path, str]]
) -> TrainResult:
    """The kept multi-label model: thresholds fitted on validation (fp32), reports, the run saved again."""
    assert run.multilabel is not None
    if run.dist.is_main:
        model = checkpoint.load_run(run.run_dir, device=run.dist.device).model
        fp32, alone = Precision(run.dist.device, None), DistContext(device=run.dist.device)
        result = multilabel_train.evaluate(model, run.val, run.mean, run.std, fp32, alone)
        finished = run.multilabel.finish(run.run_dir, result)
        studio["multilabel"] = run.multilabel.studio(finished["thresholds"])
        studio["metrics"].update(finished["metrics"], interrupted=interrupted)
        _save_final(run, model, studio, interrupted)
    run.dist.barrier()
    run.emit(TrainEvent("done", metrics=studio["metrics"]))
    metrics = studio["metrics"]
    return TrainResult(run.run_dir, metrics, run.history, metrics["strategy_used"], interrupted, bad)


def _save_final(run: TrainingRun, model: torch.nn.Module, studio: dict[str, Any], interrupted: bool) -> None:
    """The kept model with its final metrics (`wall_s` is the whole run), history, card, and the state
    marked finished so a --resume says so instead of training again."""
    studio["metrics"]["wall_s"] = time.perf_counter() - run.started
    checkpoint.save_run(run.run_dir, model, run.labels, run.data_config, studio)
    reports.write_history(run.run_dir, run.history)
    write_model_card(run.run_dir)
    if not interrupted:
        state = checkpoint.load_train_state(run.run_dir)
        checkpoint.save_train_state(run.run_dir, {**state, "finished": True})


def _test_metrics(run: TrainingRun, model: torch.nn.Module, precision: Precision) -> dict[str, Any]:
    """Scores of the kept model on test/, with its own per-class report (test_classification_report.*)."""
    assert run.test is not None
    result = evaluate(model, run.test, run.mean, run.std, precision, DistContext(device=run.dist.device),
                      keep_predictions=True)  # fmt: skip
    matrix = reports.confusion_matrix(result.targets.tolist(), result.predictions.tolist(), len(run.labels))
    report = reports.write_reports(run.run_dir, matrix, run.labels, prefix="test_")
    missing = reports.classes_without_images(report)
    if missing:
        logger.warning("Test macro averages leave out classes without test images: %s", ", ".join(missing))
    return {
        "test_top1": result.top1,
        "test_top5": result.top5,
        "test_loss": result.loss,
        "test_macro_f1": report["macro avg"]["f1"],
        "num_test": result.count,
    }


def finished_result(config: TrainConfig, state: dict[str, Any]) -> TrainResult:
    loaded = checkpoint.read_run_config(config.out)
    metrics = loaded.get("studio", {}).get("metrics", {})
    return TrainResult(config.out, metrics, state["history"], metrics.get("strategy_used", ""), False)
