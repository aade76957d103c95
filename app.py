"""The web app, also the Hugging Face Spaces entry point: parse options, build the service, wire tabs, launch.

python app.py                                  # embedded ImageNet tf_efficientnet_lite0
python app.py --checkpoint runs/my-run         # a fine-tuned run folder
CHECKPOINT=hf-hub:USER/NAME python app.py      # a run published on the Hugging Face Hub
python app.py --public                         # public mode (on by itself on Spaces, where SPACE_ID is set)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import gradio as gr

from demo import (
    batch_tab,
    classify_tab,
    detect_tab,
    explain_tab,
    model_picker,
    segment_tab,
    teach_tab,
    train_tab,
)
from demo.admission import install_admission
from demo.disk_limits import start_sweeper
from demo.model_picker import ModelView
from demo.service import InferenceService
from demo.training_jobs import TrainingManager
from demo.training_status import PUBLIC_MAX_QUEUED, TrainLimits
from demo.vision_tasks import VisionService
from demo.vision_weights import VisionConfig
from finetune.errors import StudioError
from finetune.inference import RUNTIMES

# One line per tab: (title, build function). The build function creates its components and wires events on
# the session's model (a gr.State); it may return the components that show that model, which the Model menu
# redraws on a change.
TABS: list[tuple[str, Callable[[InferenceService, gr.State], list[ModelView] | None]]] = [
    ("Classify", classify_tab.build),
    ("Explain", explain_tab.build),
    ("Batch", batch_tab.build),
]
# Optional torchvision tabs, built on the VisionService (turned off by --no-vision or VISION_TABS=off).
VISION_TABS: list[tuple[str, Callable[[VisionService], None]]] = [
    ("Detect", detect_tab.build),
    ("Segment", segment_tab.build),
]
MAX_FILE_SIZE = "20mb"  # uploads above this are refused by Gradio before they reach the app
QUEUE_MAX_SIZE = 64  # waiting requests beyond this get "queue full" instead of an ever longer wait
DELETE_CACHE = (3600, 3600)  # every hour, delete uploads and outputs older than an hour
THEME = gr.themes.Soft()
INTRO = (
    "# Image Recognition Studio\n"
    "Classify a photo, see where the model looks, or label a whole folder at once."
)


def build_app(
    service: InferenceService, vision: VisionService | None = None, trainer: TrainingManager | None = None
) -> gr.Blocks:
    """The whole app as a `gr.Blocks`, with its queue configured; tests launch it on 127.0.0.1.

    With a `trainer` the Train tab is added; `create_trainer` also makes the service serve its runs.
    """
    with gr.Blocks(title="Image Recognition Studio", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(INTRO)
        model_menu, model_state = model_picker.build(service)
        views: list[ModelView] = []
        for title, build in TABS:
            with gr.Tab(title):
                views += build(service, model_state) or []
        if trainer is not None:
            with gr.Tab("Train"):
                train_tab.build(service, trainer, model_menu, model_state)
            with gr.Tab("Teach"):  # capture classes from the webcam, train in seconds, live preview
                demo.unload(teach_tab.build(service, trainer, model_menu, model_state))
        if vision is not None and vision.is_enabled:
            for title, build_vision in VISION_TABS:
                with gr.Tab(title):
                    build_vision(vision)
        model_picker.connect(demo, service, model_menu, model_state, views)
    demo.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=1)
    install_admission(demo)  # per-session and per-endpoint caps, bad input refused before it takes a slot
    return demo


def launch(
    demo: gr.Blocks,
    host: str | None = None,
    port: int | None = None,
    share: bool = False,
    prevent_thread_lock: bool = False,
    max_file_size: str | int = MAX_FILE_SIZE,
) -> None:
    """Launch with the app's limits. Host and port None mean Gradio's defaults (GRADIO_SERVER_NAME or
    127.0.0.1, GRADIO_SERVER_PORT or 7860); Spaces sets those variables. Only uploads, outputs and
    examples are served: no `allowed_paths`, so no other file of the machine is reachable."""
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=prevent_thread_lock,
        max_file_size=max_file_size,
        theme=THEME,
    )
    start_sweeper(demo)  # uploads and outputs pruned to a size limit (delete_cache above goes by age only)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Serve a classifier as a Gradio app.")
    model = parser.add_argument_group("model")
    model.add_argument(
        "--checkpoint",
        default=os.environ.get("CHECKPOINT") or None,
        help="run folder or hf-hub:USER/NAME to serve (default: env CHECKPOINT, else the embedded "
        "ImageNet tf_efficientnet_lite0)",
    )
    model.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=os.environ.get("STUDIO_RUNTIME") or "auto",
        help="inference runtime: auto (ONNX Runtime FP32 when available, else PyTorch), onnx, onnx-int8 "
        "(quantized: faster, checked against FP32 first) or torch (default: env STUDIO_RUNTIME, else auto)",
    )
    model.add_argument(
        "--reject", action=argparse.BooleanOptionalAction, default=None,
        help="flag images that are none of the model's classes (default: on for runs with a fitted "
        "threshold, off for the embedded ImageNet model, which then uses a 50%% confidence floor)",
    )  # fmt: skip
    training = parser.add_argument_group("training (the Train tab)")
    training.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("STUDIO_DATA_DIR") or "studio-data"),
        help="folder for uploaded datasets and trained runs, one server per folder "
        "(default: env STUDIO_DATA_DIR, else ./studio-data)",
    )
    training.add_argument(
        "--max-runs",
        type=int,
        default=20,
        help="keep at most this many runs, deleting the oldest (default: 20)",
    )
    training.add_argument(
        "--max-runs-gb", type=float, default=5.0, help="keep runs within this size (default: 5)"
    )
    training.add_argument(
        "--no-train",
        action="store_true",
        default=os.environ.get("TRAIN_TAB", "").lower() == "off",
        help="leave out the Train tab (default: on; env TRAIN_TAB=off leaves it out)",
    )
    training.add_argument(
        "--share-runs",
        action="store_true",
        default=_env_flag("STUDIO_SHARE_RUNS"),
        help="show every trained run to every visitor (default: off, each run only to the visitor who "
        "trained it; env STUDIO_SHARE_RUNS=1)",
    )
    training.add_argument(
        "--train-models",
        default=os.environ.get("STUDIO_TRAIN_MODELS") or "",
        help="comma-separated timm names the Train tab offers beside the embedded model (default: env "
        "STUDIO_TRAIN_MODELS; empty: public mode offers the embedded model only, private mode any name)",
    )
    training.add_argument(
        "--train-max-minutes",
        type=float,
        default=_env_number("STUDIO_TRAIN_MAX_MINUTES"),
        help="longest time budget a training may ask for (default: env STUDIO_TRAIN_MAX_MINUTES, else 15 "
        "in public mode, 360 in private mode)",
    )
    training.add_argument(
        "--train-queue",
        type=int,
        default=_env_number("STUDIO_TRAIN_QUEUE", int),
        help=f"trainings that may wait behind the running one (default: env STUDIO_TRAIN_QUEUE, else "
        f"{PUBLIC_MAX_QUEUED} in public mode, 8 in private mode)",
    )
    training.add_argument(
        "--train-jobs-per-visitor",
        type=int,
        default=_env_number("STUDIO_TRAIN_JOBS_PER_VISITOR", int),
        help="queued or running trainings one visitor may have (default: env STUDIO_TRAIN_JOBS_PER_VISITOR, "
        "else 1 in public mode, no limit in private mode)",
    )
    training.add_argument(
        "--train-threads",
        type=int,
        default=_env_number("STUDIO_TRAIN_THREADS", int),
        help="CPU threads for training (default: env STUDIO_TRAIN_THREADS, else all cores but one in public "
        "mode, all in private mode)",
    )
    server = parser.add_argument_group("server")
    mode = server.add_mutually_exclusive_group()
    mode.add_argument(
        "--public",
        dest="public",
        action="store_true",
        default=None,
        help="public mode: the Train tab's limits for a server open to strangers (default: on when SPACE_ID "
        "is set, as on Hugging Face Spaces, or STUDIO_PUBLIC=1)",
    )
    mode.add_argument(
        "--private", dest="public", action="store_false", help="personal studio: public mode off"
    )
    server.add_argument("--host", default=None, help="address to bind (default: Gradio's, 127.0.0.1)")
    server.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860)")
    server.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    vision = parser.add_argument_group("detection and segmentation tabs")
    vision.add_argument(
        "--no-vision", action="store_true", help="leave out the Detect and Segment tabs (env VISION_TABS=off)"
    )
    vision.add_argument(
        "--vision-weights-dir",
        type=Path,
        help="folder with torchvision weight files under their official names (env VISION_WEIGHTS_DIR; "
        "default: the torch hub cache)",
    )
    vision.add_argument(
        "--detector-weights", type=Path, help="detector .pth/.safetensors file (env VISION_DETECTOR_WEIGHTS)"
    )
    vision.add_argument(
        "--segmenter-weights",
        type=Path,
        help="segmenter .pth/.safetensors file (env VISION_SEGMENTER_WEIGHTS)",
    )
    return parser


def is_public(args: argparse.Namespace) -> bool:
    """Public mode: `--public`, or on Hugging Face Spaces (SPACE_ID) or STUDIO_PUBLIC=1 unless `--private`."""
    if args.public is not None:
        return bool(args.public)
    return bool(os.environ.get("SPACE_ID")) or _env_flag("STUDIO_PUBLIC")


def train_limits(args: argparse.Namespace) -> tuple[TrainLimits, int]:
    """What one visitor may ask of the trainer, and the queue length, from public mode and the flags."""
    models = tuple(name.strip() for name in args.train_models.split(",") if name.strip())
    if is_public(args):
        limits = TrainLimits.public(models)
        queue = PUBLIC_MAX_QUEUED
    else:
        limits = TrainLimits(models=TrainLimits.public(models).models if models else None)
        queue = 8
    changes: dict[str, object] = {}
    if args.train_max_minutes is not None:
        changes["max_budget_s"] = float(args.train_max_minutes) * 60
    if args.train_jobs_per_visitor is not None:
        changes["jobs_per_owner"] = args.train_jobs_per_visitor or None  # 0: no limit
    if args.train_threads is not None:
        changes["threads"] = args.train_threads
    return replace(limits, **changes), queue if args.train_queue is None else args.train_queue


def create_trainer(args: argparse.Namespace, service: InferenceService) -> TrainingManager:
    """The training manager for `--data-dir`; `service` serves its finished runs (each to its owner, or
    to all with `--share-runs`) and every new one."""
    limits, max_queued = train_limits(args)
    service.lanes.share_runs = args.share_runs
    logging.getLogger(__name__).info(
        "%s mode: training offers %s; %s per visitor, %d waiting, up to %.0f min, %s threads; runs %s.",
        "Public" if is_public(args) else "Private",
        ", ".join(limits.models) if limits.models else "any timm model",
        limits.jobs_per_owner or "no limit of jobs",
        max_queued,
        limits.max_budget_s / 60,
        limits.threads or "all",
        "shared with every visitor" if args.share_runs else "each visible to its trainer only",
    )
    trainer = TrainingManager(
        args.data_dir,
        max_runs=args.max_runs,
        max_run_bytes=int(args.max_runs_gb * 1024**3),
        max_queued=max_queued,
        allow_test_models=os.environ.get("STUDIO_ALLOW_TEST_MODELS") == "1",  # tests and demos only
        limits=limits,
    )
    train_tab.serve_trained_runs(trainer, service)
    return trainer


def create_vision_service(args: argparse.Namespace) -> VisionService:
    """The Detect/Segment service from flags, which win over the VISION_* environment variables."""
    config = VisionConfig.from_env(
        is_enabled=False if args.no_vision else None,
        weights_dir=args.vision_weights_dir,
        detector_weights=args.detector_weights,
        segmenter_weights=args.segmenter_weights,
    )
    return VisionService(config)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _env_number(name: str, kind: type = float) -> float | int | None:
    value = os.environ.get(name, "").strip()
    return kind(value) if value else None


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own health checks, one line each
    try:
        service = InferenceService.from_checkpoint(args.checkpoint, runtime=args.runtime, reject=args.reject)
        trainer = None if args.no_train else create_trainer(args, service)
    except StudioError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    launch(
        build_app(service, create_vision_service(args), trainer),
        host=args.host,
        port=args.port,
        share=args.share,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
