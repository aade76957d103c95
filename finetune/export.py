"""Export a run to ONNX (`model.onnx`, dynamic batch), checked against PyTorch, and find it again to serve.

    python -m finetune.export RUN_DIR --onnx            # writes RUN_DIR/model.onnx
    python -m finetune.export default --onnx            # the embedded ImageNet model, into the export cache
    python -m finetune.export RUN_DIR --out DIR --images PHOTOS/
    python -m finetune.export RUN_DIR --int8            # also model.int8.onnx (see finetune.quantize)

The export uses PyTorch's `torch.export`-based ONNX exporter (`dynamo=True`; the TorchScript one is
deprecated) with ONNX-level optimisation, so the graph is plain Conv/Gemm nodes that ONNX Runtime fuses well;
the same weights always give the same bytes. Each file carries a fingerprint of the weights and input size in
its metadata, so `create_classifier(run, "auto")` serves an export only while it still matches the run, and
exports once more (into the run folder, or a cache folder when that is read-only or came from the Hub)
when it does not.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from finetune.checkpoint import LoadedRun, atomic_write, load_default_run, load_run, unwrap_model
from finetune.cpu_features import NO_INT8_DOT_PRODUCT, has_int8_dot_product
from finetune.errors import CheckpointError, ImageError, RuntimeUnavailableError, StudioError
from finetune.export_cache import (
    CACHE_ENV,
    ONNX_FILE,
    mark_used,
    onnx_locations,
    prune_if_cached,
)
from finetune.images import is_image_file, open_image
from finetune.inference import (
    DEFAULT_RUN,
    ONNX_INSTALL_HINT,
    Classifier,
    OnnxClassifier,
    ParityReport,
    compare_runtimes,
    has_module,
)
from finetune.quantize import INT8_FILE, Int8Report, quantization_images, quantize_export
from finetune.trust import FEATURES_OUTPUT, LogitsAndFeatures

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "2"  # bump when the export changes in a way that makes older files unfit to serve
# (2: a second output, the penultimate features, for the "none of these" score; see finetune.trust)
OPSET = 20  # supported by every onnxruntime >= 1.17
PARITY_TOLERANCE = 1e-3  # max |p_onnx - p_torch| over all classes and check images
MAX_CHECK_IMAGES = 32
META_FINGERPRINT = "studio.fingerprint"


@dataclass
class ExportResult:
    """What `export_onnx` wrote and how it was checked."""

    path: Path
    parity: ParityReport
    seconds: float
    classifier: OnnxClassifier


def weights_fingerprint(run: LoadedRun) -> str:
    """SHA-256 of everything an export depends on: architecture, input size, classes and every weight byte."""
    digest = hashlib.sha256()
    header = {
        "export_format": EXPORT_FORMAT,
        "architecture": run.architecture,
        "input_size": list(run.data_config["input_size"]),
        "num_classes": len(run.labels),
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for key, tensor in unwrap_model(run.model).state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def load_onnx_classifier(run: LoadedRun, batch_size: int = 32, int8: bool = False) -> OnnxClassifier:
    """An `OnnxClassifier` on a matching export of `run`; exports (and checks) one first if there is none.

    `int8=True` serves the quantized `model.int8.onnx` instead, quantizing the FP32 export first when there
    is no matching one (see `finetune.quantize`).
    """
    fingerprint = weights_fingerprint(run)
    candidates, target = onnx_locations(run, fingerprint, INT8_FILE if int8 else ONNX_FILE)
    for path in candidates:
        classifier = _open_if_matching(run, path, fingerprint, batch_size, "int8" if int8 else "fp32")
        if classifier is not None:
            logger.info("Serving with ONNX Runtime from %s", path)
            if int8 and has_int8_dot_product() is False:
                logger.warning(
                    "Serving %s although %s; --runtime onnx serves the exact FP32", path, NO_INT8_DOT_PRODUCT
                )
            mark_used(path)
            return classifier
    if int8:
        fp32 = load_onnx_classifier(run, batch_size)
        logger.info("Quantizing %s to INT8 at %s (once; later starts reuse it)", run.architecture, target)
        with _writable(target):
            classifier, report = export_int8(fp32, target, sample_images(), fingerprint)
        logger.info("Quantized: %s", report.summary())
        prune_if_cached(target)
        return classifier
    logger.info("Exporting %s to ONNX at %s (once; later starts reuse it)", run.architecture, target)
    with _writable(target):
        result = export_onnx(run, target, sample_images(), batch_size=batch_size, fingerprint=fingerprint)
    logger.info(
        "Exported in %.1f s; max probability difference to PyTorch %.1e on %d images",
        result.seconds,
        result.parity.max_prob_diff,
        result.parity.n_images,
    )
    prune_if_cached(target)
    return result.classifier


@contextlib.contextmanager
def _writable(target: Path) -> Iterator[None]:
    """Turn a read-only or full disk into a message that says where, and how to choose another place."""
    try:
        yield
    except OSError as error:
        raise RuntimeUnavailableError(
            f"cannot write the ONNX export to {target.parent} ({error.strerror or error}); set {CACHE_ENV} "
            "to a writable folder, or choose --runtime torch."
        ) from error


def export_int8(
    fp32: OnnxClassifier, path: Path, photos: Sequence[Image.Image], fingerprint: str
) -> tuple[OnnxClassifier, Int8Report]:
    """Quantize the FP32 export `fp32` into `path`, calibrated and checked on the run's own images when they
    are on disk (else views of `photos`); nothing is written when the check fails."""
    images = quantization_images(fp32.run, photos)
    metadata = {**fp32.metadata, META_FINGERPRINT: fingerprint}
    reports: list[Int8Report] = []
    atomic_write(Path(path), lambda tmp: reports.append(quantize_export(fp32, tmp, images, metadata)))
    # opened again because the check's result went into the file's metadata after the check ran on it
    return OnnxClassifier(fp32.run, Path(path), batch_size=fp32.batch_size), reports[0]


def export_onnx(
    run: LoadedRun,
    path: Path,
    images: Sequence[Image.Image],
    batch_size: int = 32,
    tolerance: float = PARITY_TOLERANCE,
    fingerprint: str | None = None,
) -> ExportResult:
    """Export `run` to `path`, checked against PyTorch on `images`; nothing is written if they disagree."""
    if not has_module("onnxruntime"):
        raise RuntimeUnavailableError(f"checking an ONNX export needs onnxruntime: {ONNX_INSTALL_HINT}.")
    if not images:
        raise ImageError("no images to check the export with; pass --images with at least one image.")
    fingerprint = fingerprint or weights_fingerprint(run)
    reference = Classifier(run, batch_size=batch_size)
    start = time.perf_counter()
    checked: list[tuple[OnnxClassifier, ParityReport]] = []

    def write_and_check(tmp: Path) -> None:
        _export_program(run, fingerprint).save(str(tmp))
        classifier = OnnxClassifier(run, tmp, batch_size=batch_size)
        parity = compare_runtimes(reference, classifier, images)
        if not parity.max_prob_diff <= tolerance:
            raise CheckpointError(
                f"the ONNX export of {run.architecture} disagrees with PyTorch: max probability difference "
                f"{parity.max_prob_diff:.2e} > {tolerance:.0e} on {parity.n_images} images, so it was not "
                "written; serve this run with --runtime torch."
            )
        checked.append((classifier, parity))

    atomic_write(Path(path), write_and_check)  # renamed into place only after the check passed
    classifier, parity = checked[0]
    classifier.onnx_path = Path(path)
    return ExportResult(Path(path), parity, time.perf_counter() - start, classifier)


def sample_images() -> list[Image.Image]:
    """Real photos to check exports with when the user gives none: matplotlib's sample images, plus mirrors.

    matplotlib is a runtime dependency and ships a portrait photo and two PNG drawings; when a packager strips
    them, fixed random-noise images stand in (they still exercise every layer).
    """
    images = []
    try:
        from matplotlib import cbook

        for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
            images.append(open_image(cbook.get_sample_data(name, asfileobj=False)))
    except (ImportError, OSError, ValueError, ImageError) as error:
        logger.info("matplotlib sample images unavailable (%s); checking with noise images", error)
    if not images:
        noise = np.random.default_rng(0).integers(0, 256, size=(3, 240, 320, 3), dtype=np.uint8)
        images = [Image.fromarray(array) for array in noise]
    return images + [ImageOps.mirror(image) for image in images]


def images_from_paths(paths: Sequence[Path]) -> list[Image.Image]:
    """Open check images from files and folders (up to MAX_CHECK_IMAGES, sorted); bad files are errors."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p)))
        else:
            files.append(path)
    if not files:
        raise ImageError(f"no images found in {', '.join(map(str, paths))}.")
    return [open_image(path) for path in files[:MAX_CHECK_IMAGES]]


def _export_program(run: LoadedRun, fingerprint: str) -> Any:
    """The dynamo ONNX export (a `torch.onnx.ONNXProgram`) with a dynamic batch axis and our metadata."""
    missing = [name for name in ("onnx", "onnxscript") if not has_module(name)]
    if missing:
        raise RuntimeUnavailableError(
            f"exporting to ONNX needs {' and '.join(missing)}: `pip install onnx onnxscript`, "
            "or choose --runtime torch."
        )
    model = unwrap_model(run.model)
    if any(parameter.device.type != "cpu" for parameter in model.parameters()):
        import copy

        model = copy.deepcopy(model).cpu()
    example = torch.zeros(2, *run.data_config["input_size"])  # batch 2: a batch of 1 would be specialised
    try:
        with warnings.catch_warnings(), _quiet_loggers("onnx_ir", "onnxscript"):
            warnings.simplefilter("ignore")  # exporter internals warn about things users cannot act on
            program = torch.onnx.export(
                LogitsAndFeatures(model).eval(),
                (example,),
                dynamo=True,
                input_names=["input"],
                output_names=["logits", FEATURES_OUTPUT],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                opset_version=OPSET,
                optimize=True,
                external_data=False,
                verbose=False,
            )
    except Exception as error:  # torch.export raises many types for unsupported code paths
        raise RuntimeUnavailableError(
            f"{run.architecture} cannot be exported to ONNX ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:300] if str(error) else ''}); serve it with --runtime torch."
        ) from error
    multi_label = (run.studio.get("multilabel") or {}).get("thresholds")
    if multi_label:  # sigmoid outputs: each label's threshold travels with the file (finetune/multilabel.py)
        program.model.metadata_props["studio.multilabel_thresholds"] = json.dumps(multi_label)
    program.model.metadata_props.update(
        {
            META_FINGERPRINT: fingerprint,
            "studio.export_format": EXPORT_FORMAT,
            "studio.architecture": run.architecture,
            "studio.labels": json.dumps(run.labels),
            "studio.data_config": json.dumps(run.data_config, sort_keys=True),
        }
    )
    return program


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """The optimiser logs every rewrite at INFO; users only need its warnings."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [item.level for item in loggers]
    for item in loggers:
        item.setLevel(max(item.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for item, level in zip(loggers, levels, strict=True):
            item.setLevel(level)


def _open_if_matching(
    run: LoadedRun, path: Path, fingerprint: str, batch_size: int, precision: str = "fp32"
) -> OnnxClassifier | None:
    if not path.is_file():
        return None
    try:
        classifier = OnnxClassifier(run, path, batch_size=batch_size)
    except CheckpointError as error:
        logger.warning("Ignoring %s: %s", path, error)
        return None
    if classifier.metadata.get(META_FINGERPRINT) != fingerprint or classifier.precision != precision:
        logger.warning("%s was exported from other weights or another version; exporting again", path)
        return None
    return classifier


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune.export",
        description="Export a run to ONNX (model.onnx, dynamic batch) and check it against PyTorch.",
    )
    parser.add_argument(
        "run_dir",
        help=f"run folder, hf-hub:USER/NAME, or '{DEFAULT_RUN}' for the embedded ImageNet model",
    )
    parser.add_argument("--onnx", action="store_true", help="export to ONNX (the only format; the default)")
    parser.add_argument(
        "--out",
        type=Path,
        help="folder to write model.onnx into (default: the run folder; the export cache for "
        f"'{DEFAULT_RUN}' or a read-only run, where the app finds it)",
    )
    parser.add_argument(
        "--images",
        type=Path,
        nargs="+",
        help=f"image files or folders to check the export on (up to {MAX_CHECK_IMAGES}; "
        "default: matplotlib's sample photos)",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help=f"also write {INT8_FILE}: quantized, about 2x faster on VNNI CPUs; calibrated and checked "
        "on the run's own images when its dataset is on disk; served with --runtime onnx-int8",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--quiet", action="store_true", help="warnings only on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s: %(message)s"
    )
    try:
        return _export_command(args)
    except StudioError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _export_command(args: argparse.Namespace) -> int:
    images = images_from_paths(args.images) if args.images else sample_images()
    run = load_default_run() if args.run_dir == DEFAULT_RUN else load_run(args.run_dir)
    fingerprint = weights_fingerprint(run)
    target = args.out / ONNX_FILE if args.out else onnx_locations(run, fingerprint)[1]
    result = export_onnx(run, target, images, batch_size=args.batch_size, fingerprint=fingerprint)
    shape = result.classifier.session.get_inputs()[0].shape
    size_mb = result.path.stat().st_size / 1e6
    print(f"wrote {result.path} ({size_mb:.1f} MB, input {shape}, opset {OPSET}) in {result.seconds:.1f} s")
    parity = result.parity
    print(
        f"checked on {parity.n_images} images: max probability difference {parity.max_prob_diff:.1e} "
        f"(limit {PARITY_TOLERANCE:.0e}), same top-1 on {parity.top1_agree}/{parity.n_images}"
    )
    if args.int8:
        int8_target = result.path.with_name(INT8_FILE)
        start = time.perf_counter()
        with _writable(int8_target):
            int8, report = export_int8(result.classifier, int8_target, images, fingerprint)
        size_mb = int8.onnx_path.stat().st_size / 1e6
        print(f"wrote {int8.onnx_path} ({size_mb:.1f} MB, INT8) in {time.perf_counter() - start:.1f} s")
        print(f"calibrated on {report.n_calibration} images; {report.summary()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
