"""`fine_tune()`: the whole recipe from a folder of images to a finished run folder.

The recipe (fastai's `fine_tune` in spirit): decode every image once; fit a linear probe on frozen features (a
few seconds, and a strong baseline on small data); then, when the strategy and the time budget allow,
fine-tune the whole network from that head with layer-wise learning-rate decay, warmup + cosine, label
smoothing and early stopping. The best validation checkpoint of any phase is kept, so `auto` never ends worse
than the probe. Every epoch leaves a resumable state; a stop request (Ctrl-C, the app's Cancel) ends cleanly
at a batch edge. The split is recorded in split.json and reused on resume; a test/ folder is scored once, at
the end, by the kept model, and never takes part in choosing it.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from timm.utils import ModelEmaV3

from finetune import checkpoint, multilabel_train
from finetune.budget import MIN_FINETUNE_STEPS, StepClock, StepCosts, UpdateSchedule, affordable_steps
from finetune.config import TrainConfig
from finetune.data import batches
from finetune.decode_budget import return_freed_memory
from finetune.distributed import DistContext, init_distributed
from finetune.engine import (
    EpochSettings,
    EventCallback,
    Optimization,
    StopCheck,
    TrainEvent,
    evaluate,
    extract_features,
    probe_metrics,
    train_one_epoch,
)
from finetune.errors import ConfigError, StoppedError
from finetune.inspect import check_run_data
from finetune.optimizers import create_optimizer
from finetune.probe import fit_linear_probe
from finetune.recipe import plan_jitter, shifts_cached_activations
from finetune.run_finish import finish, finished_result
from finetune.run_prepare import prepare_run
from finetune.training_run import (
    TrainingRun,
    TrainResult,
    history_row,
    is_better,
    keeps_probe,
    record,
    save_state,
    uses_probe,
)
from finetune.trunk_cache import (
    TRUNK_CACHE_DIR,
    TRUNK_FILES,
    ActivationSettings,
    TrunkCache,
    compute_activations,
    find_trunk,
)
from finetune.trust_fit import MAX_TRAIN_IMAGES

logger = logging.getLogger(__name__)

# `auto` wants about TARGET_STEPS updates in whole epochs, and at least MIN_AUTO_EPOCHS of a large set: the
# budget cuts what it cannot afford. Fashion-MNIST (48,000 images, 1,500 updates an epoch) wanted 4 and,
# on a quiet machine, finished them with 123 of its 1,200 s unspent while validation still rose (92.7 ->
# 93.2% in the 4th); at 6 it spends the budget instead. Sets of up to ~1,150 training images (35 updates an
# epoch or fewer; digits: 6 epochs of 31) already wanted 6 epochs or more, and so did issue 16's multi-label
# mosaics (75 updates an epoch, multilabel_train.wanted_steps); larger sets now want up to 2 epochs more.
MIN_AUTO_EPOCHS, MAX_AUTO_EPOCHS, TARGET_STEPS = 6, 20, 180
BACKWARD_COST = 3.0  # a training step costs about 3 forward passes (forward + backward + optimizer)
FP32_COST = 2.0  # the closing evaluation runs in fp32: about twice a bf16 forward on CPU
PROBE_SHARE = 0.25  # of the budget left after decoding, at most, for the probe's features (train + val)
PROBE_CALIBRATION_IMAGES, MIN_PROBE_IMAGES = 64, 2000  # timed first batch; the smallest sample worth a probe
# EMA decay warms up as 1 - (1 + step) ** -power (capped at --ema-decay): ~0.9 after 20 updates, 0.98 after
# 180, so a short run's average follows training instead of keeping ~70% of the starting weights
EMA_WARMUP_POWER = 0.75


def fine_tune(
    config: TrainConfig,
    on_event: EventCallback | None = None,
    should_stop: StopCheck | None = None,
    dist: DistContext | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train `config.model` on `config.data_dir` into `config.out`; `resume` continues a saved state.

    The time budget and `wall_s` count from here: scanning and decoding are part of the run.
    """
    started = time.perf_counter()
    dist = dist or init_distributed(config.device)
    emit = on_event or (lambda event: None)
    stop = should_stop or (lambda: False)
    state = checkpoint.load_train_state(config.out) if resume else None
    if state is not None:
        config = TrainConfig.from_dict({**state["config"], "out": str(config.out), "quiet": config.quiet})
        if state.get("finished"):
            emit(TrainEvent("status", message="This run already finished; nothing to resume."))
            return finished_result(config, state)
    else:  # on every process (rank 0 writes nothing before they all meet), so all of them stop with the error
        _check_new_run_dir(config.out)
    _check_batch_split(config.batch_size, dist.world_size)
    run = prepare_run(config, dist, emit, stop, resume=state is not None)
    run.started = started
    if state is not None:
        _restore(run, state)
    phase_done = state["phase"] if state is not None else None
    run.studio["plan"]["probe_only"] = keeps_probe(run)
    if run.plan is not None and run.plan.probe_only and not run.studio["plan"]["probe_only"]:
        run.studio["plan"]["reason"] = run.plan.reason.rsplit("; ", 1)[0]  # --epochs N: it fine-tunes
    if run.studio["plan"]["probe_only"]:
        run.emit(TrainEvent("status", message=f"Few-shot data: {run.plan.reason.rsplit('; ', 1)[-1]}; "
                                              "its head is refitted on train + val at the end"))  # fmt: skip
    if config.strategy != "linear" and not keeps_probe(run):
        _cache_trunk(run)
    interrupted = False
    if phase_done is None and uses_probe(run):
        interrupted = _linear_probe(run)
    elif phase_done is None:
        save_state(run, phase="probe", epoch=0, epochs=0)
    if not interrupted and config.strategy != "linear" and not keeps_probe(run):
        interrupted = _fine_tune_epochs(run, state if phase_done == "finetune" else None)
    _drop_trunk(run)
    return finish(run, interrupted)


def _check_new_run_dir(out: Path) -> None:
    if (out / checkpoint.CONFIG_FILE).exists() or (out / checkpoint.STATE_META_FILE).exists():
        raise ConfigError(
            f"'{out}' already holds a run; use --resume {out} to continue it, or choose another --out folder."
        )


def _check_batch_split(batch_size: int, world_size: int) -> None:
    """--batch-size is the global batch: each of the processes takes an equal part of it."""
    if batch_size % world_size:
        nearest = max(1, round(batch_size / world_size)) * world_size
        raise ConfigError(
            f"--batch-size {batch_size} (the global batch) does not split evenly over {world_size} "
            f"processes; use a multiple of {world_size}, such as {nearest}."
        )


def _linear_probe(run: TrainingRun) -> bool:
    """Fit the head on frozen features; it seeds fine-tuning and is the first 'best' checkpoint."""
    run.emit(TrainEvent("status", phase="probe", message="Linear probe: extracting features"))
    started = time.perf_counter()

    def check_stop(step: int = 0, steps: int = 0) -> None:
        if run.dist.world_size == 1 and run.should_stop():  # one process: no rank left in a collective
            raise StoppedError("stopped while extracting features; nothing was saved.")

    def progress(step: int, steps: int) -> None:
        run.emit(TrainEvent("step", phase="probe", step=step, steps=steps))
        check_stop()

    chosen = _probe_training_images(run)
    train = run.train if chosen is None else run.train.subset(chosen)
    extracting = time.perf_counter()
    trunk = run.trunk
    train_features = extract_features(
        run.model, train, run.mean, run.std, run.precision, on_step=progress, dist=run.dist,
        trunk=None if trunk is None else trunk.train if chosen is None else trunk.train.subset(chosen),
    )  # fmt: skip
    share = -(-len(train) // run.dist.world_size)  # images each process extracted
    # a whole forward pass an image, the frozen layers' share included when their activations were cached
    forward_s_per_image = (time.perf_counter() - extracting) / max(share, 1)
    if trunk is not None:
        forward_s_per_image += trunk.seconds_per_image
    val_features = extract_features(
        run.model, run.val, run.mean, run.std, run.precision, on_step=check_stop, dist=run.dist,
        trunk=None if trunk is None else trunk.val,
    )  # fmt: skip
    if run.dist.is_main and run.multilabel is None:  # the data checks (finetune/inspect.py) reuse these
        # features: seconds, not a pass (their label checks assume one class per image)
        caches = {"train": train, "val": run.val, **({"test": run.test} if run.test is not None else {})}
        features = {"train": train_features, "val": val_features}
        summary = check_run_data(
            run.run_dir, run.config.data_dir, run.labels, caches, features, run.config.model,
            run.studio["dataset"]["image_size"], run.config.seed,
        )  # fmt: skip
        run.emit(TrainEvent("status", phase="inspect", message=summary))
        return_freed_memory()  # the checks' freed blocks (~300 MB on 70,000 images), before training
    if run.dist.any_true(run.should_stop()):
        return True
    if run.multilabel is not None:
        loss = run.multilabel.loss_fn(torch.device("cpu"))
        head = multilabel_train.fit_probe(
            train_features, train.targets, run.config.probe_epochs, loss, run.config.seed
        )
    else:
        sample_weights = run.sample_weights
        if sample_weights is not None and chosen is not None:
            sample_weights = sample_weights[chosen]
        head = fit_linear_probe(
            train_features, train.targets, len(run.labels), run.config.probe_epochs, run.class_weights,
            run.config.seed, label_smoothing=run.config.label_smoothing, sample_weights=sample_weights,
        )  # fmt: skip
    # Same features and seed give the same head everywhere; rank 0's copy makes it exact across machines.
    run.dist.broadcast_([head.weight, head.bias])
    classifier = run.model.get_classifier()
    with torch.no_grad():
        classifier.weight.copy_(head.weight)
        classifier.bias.copy_(head.bias)
    if run.multilabel is not None:
        with torch.no_grad():
            result = multilabel_train.scores_of(head(val_features), run.val.targets)
            train_result = multilabel_train.scores_of(head(train_features), train.targets)
        train_fields = {"train_loss": train_result.loss, "train_map": train_result.mean_ap}
    else:
        result = probe_metrics(head, val_features, run.val.targets)
        train_result = probe_metrics(head, train_features, train.targets)
        train_fields = {"train_loss": train_result.loss, "train_acc": train_result.top1}
    row = history_row(run, "probe", 0, result, train_fields)
    row["time_s"] = time.perf_counter() - started
    run.studio["forward_s_per_image"] = forward_s_per_image
    record(run, row, improved=True, epochs=0)
    return False


def _probe_training_images(run: TrainingRun) -> torch.Tensor | None:
    """None (all training images), or a random sample whose features fit PROBE_SHARE of the budget left.

    At 224 px on 60,000 images extracting every feature alone takes longer than a 5-minute budget; a probe
    on a few thousand random images is nearly as good, and leaves the rest of the budget to fine-tuning.
    The forward time is measured on a first batch of the sample (its features are thrown away).
    """
    count = len(run.train)
    if not _budgeted(run.config) or count <= PROBE_CALIBRATION_IMAGES:
        return None
    order = torch.randperm(count, generator=torch.Generator().manual_seed(run.config.seed))
    probe_batch = run.train.subset(order[:PROBE_CALIBRATION_IMAGES].sort().values)
    started = time.perf_counter()
    extract_features(run.model, probe_batch, run.mean, run.std, run.precision)
    per_image = (time.perf_counter() - started) / PROBE_CALIBRATION_IMAGES / run.dist.world_size
    seconds = PROBE_SHARE * _remaining_s(run) - per_image * len(run.val)
    fits = max(MIN_PROBE_IMAGES, int(seconds / per_image))
    fits = run.dist.broadcast_int(fits)
    if fits >= count:
        return None
    logger.info(
        "The time budget affords features of %d of %d training images: the probe fits a random sample.",
        fits, count,
    )  # fmt: skip
    run.studio["probe_images"] = fits
    return order[:fits].sort().values


def _fine_tune_epochs(run: TrainingRun, state: dict[str, Any] | None) -> bool:
    """Full fine-tuning with early stopping; returns True when stopped by a request.

    Under `auto` the run makes the updates the time budget affords (finetune/budget.py), possibly ending
    inside an epoch; the schedule decays over exactly those updates.
    """
    config = run.config
    model = run.model
    _freeze_early_layers(model, run.plan.frozen_groups if run.plan else config.frozen_groups)
    lr = config.lr * config.batch_size / 32  # linear scaling rule for the global batch
    optimizer = create_optimizer(model, config, lr, run.dist.device)
    rank_batch = config.batch_size // run.dist.world_size
    steps_per_epoch, wanted = _update_plan(run)
    jitter, jitter_reason = _jitter_plan(run, cached_trunk=run.trunk is not None)
    trunk_shift = shifts_cached_activations(
        config.augment, run.multilabel is not None and run.trunk is not None
    )
    run.studio["plan"]["augment"] = {
        "jitter": jitter, "hflip": config.hflip, "trunk_shift": trunk_shift, "reason": jitter_reason,
    }  # fmt: skip
    if state and _budgeted(config):  # the budget's plan (a state saved before budgets counts epochs)
        total = state.get("max_updates") or state["epochs"] * steps_per_epoch
    elif state:  # --epochs: whole epochs of this world size (a resume may run on fewer processes)
        total = wanted
    else:
        total = _plan_steps(run, steps_per_epoch, wanted)
    if total <= 0:
        return False
    schedule = UpdateSchedule(optimizer, lr, steps_per_epoch, config.warmup_epochs)
    scheduler = schedule.build(total)
    ddp_model = _wrap_distributed(model, run.dist)
    ema = (
        ModelEmaV3(model, decay=config.ema_decay, use_warmup=True, warmup_power=EMA_WARMUP_POWER)
        if config.ema
        else None
    )
    loss_fn = torch.nn.CrossEntropyLoss(  # the probe's loss too (fit_linear_probe)
        weight=None if run.class_weights is None else run.class_weights.to(run.dist.device),
        label_smoothing=config.label_smoothing,
    )
    if run.multilabel is not None:
        loss_fn = run.multilabel.loss_fn(run.dist.device)
    scaler = torch.amp.GradScaler("cuda") if run.precision.needs_grad_scaler else None
    opt = Optimization(optimizer, scheduler, loss_fn, ema=ema, grad_scaler=scaler, max_updates=total)
    settings = EpochSettings(
        precision=run.train_precision, dist=run.dist, mean=run.mean, std=run.std, batch_size=rank_batch,
        seed=config.seed, clip_grad=config.clip_grad, hflip=config.hflip, jitter=jitter,
        freeze_bn=config.freeze_bn, sample_weights=run.sample_weights,
        trunk=None if run.trunk is None else run.trunk.train, trunk_shift=trunk_shift,
    )  # fmt: skip
    start_epoch, num_updates, stale = 1, 0, 0
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and "ema" in state:
            ema.module.load_state_dict(state["ema"])
        start_epoch, num_updates, stale = state["epoch"] + 1, state["num_updates"], state["stale"]
    clock = None
    if _budgeted(config):
        clock = StepClock(
            opt, schedule, wanted, num_updates, lambda: _remaining_s(run),
            lambda step_s: _step_costs(run, step_s), run.dist.broadcast_int,
        )  # fmt: skip
    epoch = start_epoch
    while num_updates < opt.max_updates:
        started = time.perf_counter()

        def on_step(step: int, steps: int, metrics: dict[str, float], epoch: int = epoch) -> None:
            if clock is not None:
                clock.tick()
            epochs = -(-opt.max_updates // steps_per_epoch)
            run.emit(TrainEvent("step", "finetune", epoch, epochs, step, steps, metrics))

        train_metrics, num_updates, stopped = train_one_epoch(
            ddp_model, run.train, settings, opt, epoch, num_updates, on_step, run.should_stop
        )
        if stopped:
            return True
        epochs = -(-opt.max_updates // steps_per_epoch)
        eval_model = ema.module if ema is not None else model
        # With --train-bn each process updated its BatchNorm statistics on its own images: evaluate (and
        # keep) rank 0's, the ones it saves.
        run.dist.broadcast_(list(eval_model.buffers()))
        evaluating = time.perf_counter()
        val_trunk = None if run.trunk is None else run.trunk.val
        if run.multilabel is not None:
            result = multilabel_train.evaluate(
                eval_model, run.val, run.mean, run.std, run.precision, run.dist, trunk=val_trunk
            )
        else:
            result = evaluate(
                eval_model, run.val, run.mean, run.std, run.precision, run.dist, trunk=val_trunk
            )
        row = history_row(run, "finetune", epoch, result, train_metrics)
        row["time_s"] = time.perf_counter() - started
        row["updates"] = num_updates
        improved = is_better(row, run.best)
        stale = 0 if improved else stale + 1
        record(run, row, improved, epochs, eval_model)
        state_extra = {
            "optimizer": optimizer.state_dict(),
            "scheduler": opt.scheduler.state_dict(),
            "max_updates": opt.max_updates,
        }
        if ema is not None:
            state_extra["ema"] = ema.module.state_dict()
        save_state(run, "finetune", epoch, epochs, num_updates=num_updates, stale=stale, **state_extra)
        if clock is not None:
            clock.evaluated(time.perf_counter() - evaluating, num_updates)
        if run.dist.any_true(stale >= config.patience):
            run.emit(
                TrainEvent("status", message=f"Early stopping: no better validation score for {stale} epochs")
            )
            break
        epoch += 1
    return False


def _update_plan(run: TrainingRun) -> tuple[int, int]:
    """(updates an epoch, updates the run wants before the time budget has its say)."""
    config = run.config
    rank_batch = config.batch_size // run.dist.world_size
    # the updates train_one_epoch really makes (about len(train) / batch_size whatever the world size)
    steps_per_epoch = sum(
        1 for _ in batches(len(run.train), rank_batch, False, world_size=run.dist.world_size, drop_last=True)
    )
    wanted = _wanted_steps(config, steps_per_epoch)
    if run.multilabel is not None and not config.epochs:
        wanted = multilabel_train.wanted_steps(wanted, steps_per_epoch)
    return steps_per_epoch, wanted


def _jitter_plan(run: TrainingRun, cached_trunk: bool) -> tuple[bool, str]:
    """Whether fine-tuning jitters its training images, and why (finetune/recipe.py `plan_jitter`);
    `cached_trunk`: whether the frozen layers' activations are (or would be) cached."""
    steps_per_epoch, wanted = _update_plan(run)
    epochs = -(-wanted // steps_per_epoch)
    return plan_jitter(
        run.config.augment, len(run.train), epochs, run.multilabel is not None and cached_trunk
    )


def _cache_trunk(run: TrainingRun) -> None:
    """Run the frozen first layers once over the training and validation images when fine-tuning will see
    the images as they are (finetune/trunk_cache.py).

    Before the probe, whose features then reuse them; again on a resume (the activations are not kept).
    """
    config = run.config
    frozen_groups = run.plan.frozen_groups if run.plan else config.frozen_groups
    if (
        not config.trunk_cache
        or frozen_groups == 0
        or config.hflip
        or _jitter_plan(run, cached_trunk=True)[0]
    ):
        return
    _freeze_early_layers(run.model, frozen_groups)
    sample = run.val if len(run.val) else run.train
    trunk = find_trunk(run.model, sample.pixels[torch.arange(min(4, len(sample)))], run.mean, run.std)
    if trunk is None:  # a multi-label run then keeps its jitter (`_jitter_plan` without a cached trunk)
        return
    run.emit(TrainEvent("status", phase="probe", message="Frozen layers: computing their activations once"))
    started = time.perf_counter()
    settings = ActivationSettings(run.mean, run.std, run.train_precision, run.dist)

    def progress(step: int, steps: int) -> None:
        run.emit(TrainEvent("step", phase="probe", step=step, steps=steps))
        if run.dist.world_size == 1 and run.should_stop():
            raise StoppedError("stopped while computing the frozen layers' activations; nothing was saved.")

    folder = config.out / TRUNK_CACHE_DIR
    train = compute_activations(run.model, trunk, run.train, folder / TRUNK_FILES[0], settings, progress)
    val = compute_activations(run.model, trunk, run.val, folder / TRUNK_FILES[1], settings, progress)
    if train is None or val is None:
        return
    share = -(-(len(run.train) + len(run.val)) // run.dist.world_size)
    run.trunk = TrunkCache(train, val, (time.perf_counter() - started) / share)
    run.studio["plan"]["trunk_cache"] = {"boundary": trunk.boundary, "shape": list(train.array.shape[1:])}


def _drop_trunk(run: TrainingRun) -> None:
    """Fine-tuning is over: its cached activations go (a resume computes them again)."""
    run.trunk = None
    if run.dist.is_local_main:
        for name in TRUNK_FILES:
            (run.config.out / TRUNK_CACHE_DIR / name).unlink(missing_ok=True)


def _budgeted(config: TrainConfig) -> bool:
    """Only `auto` without an explicit --epochs fits its fine-tuning into --time-budget-s."""
    return config.strategy == "auto" and not config.epochs


def _wanted_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """Updates the run would make without a budget: --epochs, or about TARGET_STEPS in whole epochs."""
    if config.epochs:
        return config.epochs * steps_per_epoch
    epochs = int(min(MAX_AUTO_EPOCHS, max(MIN_AUTO_EPOCHS, math.ceil(TARGET_STEPS / steps_per_epoch))))
    return epochs * steps_per_epoch


def _step_costs(run: TrainingRun, step_s: float) -> StepCosts:
    """Validation after each epoch and the closing fp32 passes, priced with the probe's measured forward
    time per image."""
    per_image = run.studio.get("forward_s_per_image") or 0.0
    return StepCosts(
        step_s=step_s,
        eval_s=_past_trunk_s_per_image(run) * len(run.val) / run.dist.world_size,
        final_s=per_image * FP32_COST * _closing_images(run),  # whole forward passes, from the pixels
    )


def _past_trunk_s_per_image(run: TrainingRun) -> float:
    """A forward pass's seconds an image, less the frozen layers' share when their activations are cached."""
    per_image = run.studio.get("forward_s_per_image") or 0.0
    if run.trunk is None:
        return per_image
    return max(per_image - run.trunk.seconds_per_image, 0.1 * per_image)


def _closing_images(run: TrainingRun) -> int:
    """Images the kept model's closing passes (`finish`) classify: validation (reports, calibration, or a
    multi-label run's thresholds), then a sample of training images (the "none of these" class means) and
    test/."""
    if run.multilabel is not None:
        return len(run.val)
    num_test = len(run.test) if run.test is not None else 0
    return len(run.val) + min(len(run.train), MAX_TRAIN_IMAGES) + num_test


def _remaining_s(run: TrainingRun) -> float:
    return run.config.time_budget_s - (time.perf_counter() - run.started)


def _plan_steps(run: TrainingRun, steps_per_epoch: int, wanted: int) -> int:
    """The updates to plan for before any is timed: the probe's forward time x BACKWARD_COST a step.

    Timings differ between processes, so rank 0 decides for all of them.
    """
    per_image = _past_trunk_s_per_image(run)
    total = wanted
    if _budgeted(run.config) and per_image:
        step_s = per_image * BACKWARD_COST * run.config.batch_size / run.dist.world_size
        total = affordable_steps(_remaining_s(run), _step_costs(run, step_s), steps_per_epoch, wanted)
        if total < MIN_FINETUNE_STEPS:
            total = 0
        elif total < wanted:
            logger.info(
                "The time budget affords ~%d of %d updates (%.2f s each); the schedule decays over them.",
                total, wanted, step_s,
            )  # fmt: skip
    total = run.dist.broadcast_int(total)
    if total == 0:
        logger.info("Fine-tuning would not fit the time budget: keeping the probe.")
        run.emit(
            TrainEvent("status", message="Time budget too small for fine-tuning; keeping the linear probe")
        )
    return total


def _freeze_early_layers(model: torch.nn.Module, count: int) -> None:
    """Freeze the first `count` layer groups of timm's coarse grouping (-1: the first half, rounded up).

    Early layers hold generic edge and texture detectors that small datasets cannot improve, and at high
    resolution they are the costliest to backpropagate through: measured on lite0 at 224 px (bf16, 2 CPU
    cores), training runs at 22 img/s with the stem and first stage frozen and 42 img/s with the first half.
    """
    from timm.models import group_parameters

    groups = list(group_parameters(model, model.group_matcher(coarse=True)).values())
    count = math.ceil(len(groups) / 2) if count < 0 else count
    frozen = {name for group in groups[: min(count, len(groups) - 1)] for name in group}
    for name, parameter in model.named_parameters():
        if name in frozen:
            parameter.requires_grad_(False)


def _wrap_distributed(model: torch.nn.Module, dist: DistContext) -> torch.nn.Module:
    if not dist.is_distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def _restore(run: TrainingRun, state: dict[str, Any]) -> None:
    run.model.load_state_dict(state["model"])
    run.best = state["best"]
    run.history = state["history"]
    run.studio.update({k: v for k, v in state["studio"].items() if k in ("forward_s_per_image",)})
    run.started -= run.history[-1]["elapsed_s"] if run.history else 0.0
    run.emit(TrainEvent("status", message=f"Resuming after {state['phase']} epoch {state['epoch']}"))
