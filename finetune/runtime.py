"""`create_classifier(run, runtime)`: the one door from a loaded run to a `Classifier` on a runtime.

It sits above both `finetune.inference` (how a batch is classified) and `finetune.export` (how a run becomes
an ONNX file, checked and cached), so inference never needs to know how a file is exported and the imports
run one way: runtime -> export -> quantize -> inference.
"""

from __future__ import annotations

import logging

from finetune.checkpoint import LoadedRun
from finetune.errors import ConfigError, RuntimeUnavailableError
from finetune.export import load_onnx_classifier
from finetune.inference import ONNX_INSTALL_HINT, RUNTIMES, Classifier, has_module

logger = logging.getLogger(__name__)


def create_classifier(run: LoadedRun, runtime: str = "auto", batch_size: int = 32) -> Classifier:
    """The classifier for `run` on the requested runtime; every inference caller goes through here.

    "torch" runs PyTorch. "onnx" runs ONNX Runtime on the run's `model.onnx`, exporting it first (into the run
    folder, or a cache folder when that is read-only) if it is missing or stale; failures are errors. "auto"
    does the same but falls back to PyTorch with a warning when onnxruntime is missing or export fails.
    "onnx-int8" serves the quantized `model.int8.onnx` (opt-in: faster, probabilities not exactly FP32's),
    quantizing and checking it first if needed (see `finetune.quantize`); failures are errors.
    """
    if runtime not in RUNTIMES:
        raise ConfigError(f"invalid runtime '{runtime}'; choose one of {', '.join(RUNTIMES)}.")
    if runtime == "torch":
        return Classifier(run, batch_size=batch_size)
    if runtime in ("onnx", "onnx-int8"):
        if not has_module("onnxruntime"):
            raise RuntimeUnavailableError(f"--runtime {runtime} needs onnxruntime: {ONNX_INSTALL_HINT}.")
        return load_onnx_classifier(run, batch_size=batch_size, int8=runtime == "onnx-int8")
    if not has_module("onnxruntime"):
        logger.info("onnxruntime is not installed; serving with PyTorch (pip install onnxruntime for speed).")
        return Classifier(run, batch_size=batch_size)
    try:
        return load_onnx_classifier(run, batch_size=batch_size)
    except Exception as error:  # any export or load failure: PyTorch still gives the same answers
        logger.warning(
            "ONNX Runtime is not available for this run (%s: %s); using PyTorch instead.",
            type(error).__name__,
            str(error).splitlines()[0][:300] if str(error) else "",
        )
        return Classifier(run, batch_size=batch_size)
