"""Serving a freshly trained run at once: PyTorch now, its ONNX export from a separate process later.

A run trained in the app used to be exported to ONNX before it answered (up to half a minute on 2 cores),
which doubles Teach's "a model in seconds". Exporting in a background *thread* is not an option:
`torch.export` traces by patching `torch.nn.Module.__call__` for the whole process, so any PyTorch forward
pass running meanwhile (the new run answering the live preview, Explain's Grad-CAM) fails with
"fake_mode.in_kernel_invocation must be False" (measured). So the run answers on PyTorch at once and
`python -m finetune.export RUN --onnx` runs as a child process; once it has written the run's `model.onnx`
(checked against PyTorch, with its fingerprint), `InferenceService.upgrade_runtime` swaps in the ONNX
classifier, which now finds that file and exports nothing in-process. If the export fails the run keeps
answering on PyTorch. `export_lock` makes exports one at a time (and lets the Teach tab's ONNX download wait
for this one instead of starting its own).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path

from demo.service import InferenceService
from finetune.checkpoint import load_run
from finetune.export import ONNX_FILE

logger = logging.getLogger(__name__)

EXPORT_TIMEOUT_S = 600
RUNTIME_FLAGS = {"auto": ["--onnx"], "onnx": ["--onnx"], "onnx-int8": ["--onnx", "--int8"]}


def serve_new_run(service: InferenceService, run_id: str, run_dir: Path) -> None:
    """Serve `run_dir` as `run_id` on PyTorch now; export and switch to the service's runtime in the
    background when that runtime is an ONNX one."""
    service.add_run(run_id, load_run(run_dir), make_default=False, runtime="torch")
    if service.runtime in RUNTIME_FLAGS:
        threading.Thread(
            target=_export_then_upgrade,
            args=(service, run_id, run_dir),
            name=f"export[{run_id}]",
            daemon=True,
        ).start()


def export_in_child(run_dir: Path, runtime: str = "auto") -> Path | None:
    """`run_dir/model.onnx` written by `python -m finetune.export` in a child process (callers hold
    `service.export_lock`); None when the export failed (the log says why)."""
    command = [sys.executable, "-m", "finetune.export", str(run_dir), *RUNTIME_FLAGS.get(runtime, ["--onnx"])]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        logger.warning("Exporting %s to ONNX failed: %s", run_dir.name, error)
        return None
    if done.returncode != 0 or not (run_dir / ONNX_FILE).is_file():
        logger.warning("Exporting %s to ONNX failed: %s", run_dir.name, done.stderr.strip()[-500:])
        return None
    return run_dir / ONNX_FILE


def _export_then_upgrade(service: InferenceService, run_id: str, run_dir: Path) -> None:
    with service.export_lock:
        exported = export_in_child(run_dir, service.runtime)
    if exported is not None:
        service.upgrade_runtime(run_id)  # finds the export: no tracing in this process
