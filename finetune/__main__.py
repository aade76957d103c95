"""`python -m finetune DATA_DIR --out RUN_DIR`: fine-tune a timm model on a folder of class subfolders.

Also the entry point of distributed runs: `torchrun --nproc_per_node=N -m finetune DATA_DIR --out RUN_DIR`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from torch.distributed.elastic.multiprocessing.errors import record

from finetune.cli import EXIT_INTERRUPTED, configure_logging, run_cli
from finetune.config import (
    AUGMENT_MODES,
    BALANCE_MODES,
    DEVICES,
    MULTILABEL_LOSSES,
    PRECISIONS,
    STRATEGIES,
    TrainConfig,
)
from finetune.engine import TrainEvent

DEFAULTS = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
EXIT_COLLECTIVE_FAILED = 1


def get_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The CLI; a function so other launchers can reuse it as a parent parser."""
    d = DEFAULTS
    parser = argparse.ArgumentParser(
        prog="python -m finetune",
        description="Fine-tune a pretrained timm model on DATA_DIR (one subfolder per class, or train/ with "
        "optional val/ and test/) and write a self-describing run folder (model.safetensors, config.json, "
        "metrics, plots).",
        add_help=add_help,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "data_dir", type=Path, nargs="?", help="folder of class subfolders (optional with --resume)"
    )
    parser.add_argument("--out", type=Path, help="run folder to create (required unless --resume)")
    parser.add_argument(
        "--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run in RUN_DIR"
    )

    model = parser.add_argument_group("model")
    model.add_argument("--model", default=d["model"], help="timm architecture name")
    model.add_argument(
        "--weights", default=d["weights"],
        help="'auto' (embedded ImageNet weights for tf_efficientnet_lite0, else timm's download), 'none' "
        "(random init) or a .safetensors / state-dict file",
    )  # fmt: skip
    model.add_argument(
        "--img-size", type=int, default=d["img_size"], help="square input size; 0 picks from the data"
    )

    recipe = parser.add_argument_group("recipe")
    recipe.add_argument(
        "--strategy", choices=STRATEGIES, default=d["strategy"],
        help="linear: frozen backbone; finetune: everything; lp-ft: probe then fine-tune; auto: probe, then "
        "fine-tune if it fits the time budget, keeping whichever validates best",
    )  # fmt: skip
    recipe.add_argument(
        "--epochs", type=int, default=d["epochs"], help="fine-tuning epochs; 0 picks from data size"
    )
    recipe.add_argument(
        "--time-budget-s", type=float, default=d["time_budget_s"], help="time budget for auto (s)"
    )
    recipe.add_argument("--batch-size", type=int, default=d["batch_size"], help="global batch size")
    recipe.add_argument(
        "--lr", type=float, default=d["lr"], help="peak LR at batch 32 (scaled with batch size)"
    )
    recipe.add_argument(
        "--layer-decay", type=float, default=d["layer_decay"], help="layer-wise LR decay; 1 = off"
    )
    recipe.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="AdamW weight decay")
    recipe.add_argument("--opt", default=d["opt"], help="any timm optimizer (adamw, sgd, lamb, ...)")
    recipe.add_argument(
        "--warmup-epochs", type=float, default=d["warmup_epochs"], help="linear warmup epochs"
    )
    recipe.add_argument("--label-smoothing", type=float, default=d["label_smoothing"], help="label smoothing")
    recipe.add_argument("--clip-grad", type=float, default=d["clip_grad"], help="max grad norm; 0 = off")
    recipe.add_argument("--ema", action="store_true", help="keep and save an EMA of the weights")
    recipe.add_argument(
        "--ema-decay", type=float, default=d["ema_decay"], help="EMA decay after its warmup (starts at 0)"
    )
    recipe.add_argument(
        "--balance", choices=BALANCE_MODES, default=d["balance"],
        help="class imbalance: loss weights, a balanced sampler, none, or auto (loss weights past 3x)",
    )  # fmt: skip
    recipe.add_argument(
        "--multilabel-loss", choices=MULTILABEL_LOSSES, default=d["multilabel_loss"],
        help="loss of multi-label runs (a labels CSV): timm's BinaryCrossEntropy or asymmetric loss",
    )  # fmt: skip
    recipe.add_argument(
        "--hflip", action="store_true", help="random horizontal flips (only if flips keep meaning)"
    )
    recipe.add_argument(
        "--augment", choices=AUGMENT_MODES, default=d["augment"],
        help="mild rotation/scale/shift/brightness/contrast jitter of training images; auto: on, except for "
        "20,000+ training images seen at most 6 times each, which train as they are",
    )  # fmt: skip
    recipe.add_argument(
        "--frozen-groups", type=int, default=d["frozen_groups"],
        help="leading layer groups (stem, then stages or blocks) kept frozen while fine-tuning; -1 = from "
        "the data (none for few or small images, the first half for photos), 0 = train everything",
    )  # fmt: skip
    recipe.add_argument(
        "--no-trunk-cache", dest="trunk_cache", action="store_false",
        help="run the frozen layers in every step, even when their activations could be computed once "
        "(by default they are when training images are used as they are: no jitter, no flips)",
    )  # fmt: skip
    recipe.add_argument(
        "--train-bn",
        dest="freeze_bn",
        action="store_false",
        help="update BatchNorm statistics while fine-tuning",
    )
    recipe.add_argument(
        "--patience", type=int, default=d["patience"], help="early-stopping patience (epochs)"
    )
    recipe.add_argument("--probe-epochs", type=int, default=d["probe_epochs"], help="linear-probe epochs")
    recipe.add_argument(
        "--accept-rate", type=float, default=d["accept_rate"],
        help="'none of these' threshold: share of validation images accepted as one of the classes",
    )  # fmt: skip

    data = parser.add_argument_group("data")
    data.add_argument(
        "--val-fraction", type=float, default=d["val_fraction"], help="validation share per class"
    )
    data.add_argument(
        "--val-max-images", type=int, default=d["val_max_images"],
        help="at most about this many validation images in all (a smaller share of a large set); 0 = no cap",
    )  # fmt: skip
    data.add_argument(
        "--seed", type=int, default=d["seed"], help="seed for split, shuffling and augmentation"
    )
    data.add_argument("--workers", type=int, default=d["workers"], help="decoding threads; 0 = all cores")
    data.add_argument("--cache-dir", type=Path, help="decoded-image cache folder (default RUN_DIR/.cache)")
    data.add_argument(
        "--cache-max-gb", type=float, default=d["cache_max_gb"],
        help="largest decoded-image cache; a larger dataset is decoded batch by batch from its files "
        "by worker processes (0 = 90%% of the free disk)",
    )  # fmt: skip
    data.add_argument(
        "--exclude-issues", type=Path, metavar="FILE",
        help="leave out the files a data report flagged: its data_report.json, or data_issues.txt after "
        "deleting the lines you disagree with (python -m finetune.inspect writes both; so does every run)",
    )  # fmt: skip

    system = parser.add_argument_group("system")
    system.add_argument("--device", choices=DEVICES, default=d["device"], help="auto picks CUDA when present")
    system.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d["precision"],
        help="autocast precision; auto: bf16 where the device has it (on a CPU without AMX, training steps "
        "at 96 px and below run in fp32, which is faster there)",
    )
    system.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The one place parsed flags become a `TrainConfig` (which validates them)."""
    from finetune.errors import ConfigError

    if args.resume is None and (args.data_dir is None or args.out is None):
        raise ConfigError("give DATA_DIR and --out RUN_DIR (or --resume RUN_DIR to continue a run).")
    if args.resume is not None:  # the saved config wins: a resumed run ends where the first would have
        from finetune.checkpoint import read_train_config

        saved = read_train_config(args.resume)
        return TrainConfig.from_dict({**saved, "out": args.resume, "quiet": args.quiet})
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in DEFAULTS})


class ProgressBars:
    """tqdm bars for decoding and epochs, with live loss/accuracy; silent with --quiet or off rank 0."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.key: tuple[str, int] | None = None

    def __call__(self, event: TrainEvent) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if event.kind in ("cache", "step"):
            key = (event.phase, event.epoch)
            if key != self.key:
                self.close()
                self.key = key
                title = {"train": "decode train", "val": "decode val", "probe": "features"}.get(event.phase)
                title = title or f"epoch {event.epoch}/{event.epochs}"
                unit = "batch" if event.kind == "step" else "img"
                leave = event.phase == "finetune"
                self.bar = tqdm(total=event.steps, desc=title, unit=unit, leave=leave, file=sys.stderr)
            if event.metrics:
                metrics = event.metrics
                self.bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}", acc=f"{metrics['acc']:.3f}", refresh=False
                )
            # update() redraws at most every mininterval; a forced redraw per image wrote 55,000 frames
            self.bar.update(event.step - self.bar.n)
        elif event.kind == "epoch":
            self.close()
            m = event.metrics
            star = " *" if m.get("improved") else ""
            name = "probe" if event.phase == "probe" else f"epoch {event.epoch}/{event.epochs}"
            score = f"val mAP {m['val_map']:.4f}" if "val_map" in m else f"val top-1 {m['val_top1']:.4f}"
            tqdm_write(f"{name}: {score}  val loss {m['val_loss']:.4f}{star}")
        elif event.kind == "status":
            self.close()
            tqdm_write(event.message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.key = None


def tqdm_write(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


@record  # under torchrun, a crash (a bug, out of memory) is shown in torchrun's failure summary
def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    is_main_process = int(os.environ.get("RANK", "0")) == 0  # set by torchrun; only rank 0 logs progress
    configure_logging(args.quiet or not is_main_process)
    return run_cli(lambda: _train(args))


def _train(args: argparse.Namespace) -> int:
    from finetune.distributed import init_distributed, is_collective_failure, shutdown_distributed
    from finetune.trainer import fine_tune

    config = config_from_args(args)
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        if stop_requested.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        stop_requested.set()
        if int(os.environ.get("RANK", "0")) == 0:  # torchrun signals every process; one notice is enough
            tqdm_write("Stopping after this batch (Ctrl-C again to abort)...")

    # Ctrl-C, and SIGTERM (sent by torchrun to every process when one fails, or by a job scheduler), only
    # request a stop at the next batch edge: a file being saved is never cut short, and if another process
    # is gone the next collective fails at once, with the message below.
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    dist = init_distributed(config.device)
    try:
        bars = ProgressBars(enabled=not config.quiet and dist.is_main)
        result = fine_tune(config, bars, stop_requested.is_set, dist, resume=args.resume is not None)
        bars.close()
    except Exception as error:
        if not (dist.is_distributed and is_collective_failure(error)):
            raise
        # a peer died or hung: its own error is the one to read, not this process's broken collective
        reason = (str(error).strip() or type(error).__name__).splitlines()[0].split(". ")[0][:200]
        print(
            f"error: rank {dist.rank} of {dist.world_size} stopped because another process of the job failed "
            f"or stopped answering ({reason}). That process's own error is above and in torchrun's summary; "
            f"{_what_is_kept(config.out, dist.world_size)}",
            file=sys.stderr,
        )
        return EXIT_COLLECTIVE_FAILED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutdown_distributed()
    if dist.is_main:
        _print_summary(result, dist.world_size)
    return EXIT_INTERRUPTED if result.interrupted else 0


def _what_is_kept(run_dir: Path, world_size: int) -> str:
    """After a failure: checkpoints are written atomically, so what the run folder holds still loads."""
    from finetune.checkpoint import STATE_META_FILE
    from finetune.distributed import resume_command

    if not (run_dir / STATE_META_FILE).exists():
        return f"nothing was saved in {run_dir} yet."
    return f"the last checkpoint in {run_dir} is intact; continue with: {resume_command(run_dir, world_size)}"


def _print_summary(result: Any, world_size: int = 1) -> None:
    from finetune.distributed import resume_command

    metrics = result.metrics
    if metrics.get("val_map") is not None:  # a multi-label run (labels CSV)
        return _print_multilabel_summary(result, resume_command(result.run_dir, world_size))
    if result.interrupted:
        kept = f"best so far (val top-1 {metrics['val_top1']:.4f}) kept" if metrics else "no checkpoint yet"
        print(
            f"Interrupted: {kept}. Continue with: {resume_command(result.run_dir, world_size)}",
            file=sys.stderr,
        )
    if metrics:
        print(
            f"Run folder: {result.run_dir}\nStrategy used: {result.strategy_used}; best epoch "
            f"{metrics['best_epoch']}; val top-1 {metrics['val_top1']:.4f}, top-5 {metrics['val_top5']:.4f} "
            "(validation: used to choose the kept weights)"
        )
        if metrics.get("test_top1") is not None:
            print(
                f"Test (test/ folder, {metrics['num_test']} images, never used for training or choosing): "
                f"top-1 {metrics['test_top1']:.4f}, top-5 {metrics['test_top5']:.4f}, "
                f"macro F1 {metrics['test_macro_f1']:.4f}"
            )
    if result.bad_files:
        print(f"Skipped {len(result.bad_files)} unreadable file(s): see {result.run_dir}/bad_files.txt")


def _print_multilabel_summary(result: Any, resume: str) -> None:
    metrics = result.metrics
    if result.interrupted:
        print(f"Interrupted: best so far kept. Continue with: {resume}", file=sys.stderr)
    print(
        f"Run folder: {result.run_dir}\nStrategy used: {result.strategy_used}; best epoch "
        f"{metrics['best_epoch']}; val mAP {metrics['val_map']:.4f}, micro F1 "
        f"{metrics['val_micro_f1']:.4f}, macro F1 {metrics['val_macro_f1']:.4f} "
        "(validation: chose the kept weights and the thresholds)"
    )
    if result.bad_files:
        print(f"Skipped {len(result.bad_files)} unreadable file(s): see {result.run_dir}/bad_files.txt")


if __name__ == "__main__":
    raise SystemExit(main())
