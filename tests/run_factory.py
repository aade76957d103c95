"""A small but really trained run folder with every file the training engine writes, for card and Hub tests.

The engine is not used on purpose: these tests are about the run format, so the run is built from its
parts (a few optimizer steps on sklearn's real digits, `save_run`, and the metrics, report and plots written
in the engine's documented layout) and does not change when the engine's recipe does.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from conftest import TINY_MODEL, write_digits_folder

from finetune.checkpoint import save_run, write_json
from finetune.data import DatasetSplit, Sample
from finetune.images import open_image
from finetune.modeling import create_eval_transform, create_model_and_transforms
from finetune.split import record_split, write_split

LABELS = ["digit_0", "digit_1", "digit_2"]
VAL_PER_CLASS = 4
_SHARED: dict[str, Path] = {}


def shared_trained_run(tmp_path_factory) -> Path:
    """One trained run per test session (several test modules read it; none may modify it: copy first)."""
    if "run" not in _SHARED:
        _SHARED["run"] = make_trained_run(tmp_path_factory.mktemp("trained"))
    return _SHARED["run"]


def make_trained_run(root: Path, steps: int = 12) -> Path:
    """Train `test_efficientnet` on 3 digit classes for a few steps and write a complete run folder."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches on a shared 2-core machine: extra OpenMP threads only spin
    try:
        return _train_and_save(root, steps)
    finally:
        torch.set_num_threads(threads)


def _train_and_save(root: Path, steps: int) -> Path:
    torch.manual_seed(0)
    data_dir = write_digits_folder(root / "digits", per_class=12)
    created = create_model_and_transforms(TINY_MODEL, num_classes=len(LABELS), weights="none", img_size=32)
    model, data_config = created.model, created.data_config
    transform = create_eval_transform(data_config)
    train, val = _split(data_dir, transform)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for step in range(steps):
        model.train()
        started = time.perf_counter()
        logits = model(train[0])
        loss = torch.nn.functional.cross_entropy(logits, train[1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 3 == 2:
            val_loss, val_pred = _evaluate(model, val)
            history.append(
                {
                    "epoch": len(history) + 1,
                    "phase": "finetune",
                    "train_loss": float(loss.detach()),
                    "train_acc": float((logits.argmax(1) == train[1]).float().mean()),
                    "val_loss": val_loss,
                    "val_top1": float((val_pred == val[1]).float().mean()),
                    "lr": 3e-3,
                    "time_s": time.perf_counter() - started,
                }
            )
    val_loss, val_pred = _evaluate(model, val)
    top1 = float((val_pred == val[1]).float().mean())
    run_dir = root / "run"
    studio = {
        "train_config": {"data_dir": str(data_dir), "out": str(run_dir), "model": TINY_MODEL, "lr": 3e-3},
        "metrics": {
            "val_top1": top1,
            "val_top5": 1.0,
            "val_loss": val_loss,
            "best_epoch": len(history),
            "strategy_used": "finetune",
        },
        "weights_source": created.weights_source,
        "versions": {"torch": torch.__version__, "studio": "test"},
        "dataset": {
            "num_train": len(train[1]),
            "num_val": len(val[1]),
            "class_counts": {label: int((train[1] == i).sum()) for i, label in enumerate(LABELS)},
        },
    }
    save_run(run_dir, model, LABELS, data_config, studio)
    write_split(run_dir, record_split(_recorded_split(data_dir), data_dir))  # the split it really used
    write_json(run_dir / "metrics.json", {"epochs": history})
    write_json(run_dir / "classification_report.json", _report(val[1].numpy(), val_pred.numpy()))
    _plot(run_dir, history, val[1].numpy(), val_pred.numpy())
    return run_dir


def _recorded_split(data_dir: Path) -> DatasetSplit:
    """The same files `_split` takes, as the engine records them in split.json."""
    train, val = [], []
    for index, label in enumerate(LABELS):
        for n, path in enumerate(sorted((data_dir / label).glob("*.png"))):
            (val if n < VAL_PER_CLASS else train).append(Sample(path=path, target=index))
    return DatasetSplit(classes=list(LABELS), train=train, val=val)


def _split(data_dir: Path, transform) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    train_x, train_y, val_x, val_y = [], [], [], []
    for index, label in enumerate(LABELS):
        for n, path in enumerate(sorted((data_dir / label).glob("*.png"))):
            xs, ys = (val_x, val_y) if n < VAL_PER_CLASS else (train_x, train_y)
            xs.append(transform(open_image(path)))
            ys.append(index)
    return (torch.stack(train_x), torch.tensor(train_y)), (torch.stack(val_x), torch.tensor(val_y))


@torch.no_grad()
def _evaluate(model: torch.nn.Module, val: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, torch.Tensor]:
    model.eval()
    logits = model(val[0])
    return float(torch.nn.functional.cross_entropy(logits, val[1])), logits.argmax(1)


def _report(truth: np.ndarray, predicted: np.ndarray) -> dict:
    """sklearn's classification report in the engine's layout ("f1" rather than "f1-score")."""
    from sklearn.metrics import classification_report

    report = classification_report(
        truth, predicted, labels=range(len(LABELS)), target_names=LABELS, output_dict=True, zero_division=0
    )
    return {
        name: {
            "precision": v["precision"],
            "recall": v["recall"],
            "f1": v["f1-score"],
            "support": v["support"],
        }
        for name, v in report.items()
        if isinstance(v, dict)
    }


def _plot(run_dir: Path, history: list[dict], truth: np.ndarray, predicted: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    figure, axis = plt.subplots(figsize=(4, 3))
    epochs = [entry["epoch"] for entry in history]
    axis.plot(epochs, [entry["train_loss"] for entry in history], label="train loss")
    axis.plot(epochs, [entry["val_loss"] for entry in history], label="val loss")
    axis.legend()
    figure.savefig(run_dir / "curves.png", dpi=60)
    plt.close(figure)
    display = ConfusionMatrixDisplay.from_predictions(truth, predicted, display_labels=LABELS)
    display.figure_.savefig(run_dir / "confusion_matrix.png", dpi=60)
    plt.close(display.figure_)
