"""Upload memory benchmark: what a burst of concurrent large-image uploads adds to the server's peak RSS.

    python bench/upload_memory.py                          # 8 x a ~200 KB 8000x8000 PNG, then 8 x 4900x4900
    python bench/upload_memory.py --clients 4 --sizes 8000 --unbounded   # the same without the upload limits

The real app (`app.build_app` + `app.launch`) runs in this process on 127.0.0.1; `--clients` gradio_client
clients, connected and warmed up first, send `/classify` at the same moment from threads. A sampler thread
reads this process's VmRSS every 5 ms; the figure is the peak during the burst minus the RSS just before
it (after warm-up bursts of a small image, so the model's batched forward passes are already counted).
Each answer is printed: a top-1 label, or the refusal message (a clear answer too).

Target (issue 13): 8 concurrent 8000x8000 PNGs add < 300 MB and each gets a clear answer. 8000x8000 is
refused from its header by `UPLOAD_LIMITS` (25 MP decoded at most); 4900x4900 (24 MP) is decoded, and the
process-wide `DECODE_BUDGET` (128 MiB) lets one such decode run at a time. `--unbounded` swaps in
`LOCAL_LIMITS` and an unlimited budget to show what the same burst cost before (needs several GB: careful).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import hostile_files  # noqa: E402
from app_server import free_port  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

import app  # noqa: E402
import demo.service  # noqa: E402
import finetune.images  # noqa: E402
from demo.service import InferenceService  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PeakSampler:
    """Samples this process's RSS every `interval_s` in a thread; `peak_mb` is the largest seen."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak_mb = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb())
            time.sleep(self.interval_s)


def classify(client: Client, path: Path, answers: list[str], index: int, barrier: threading.Barrier) -> None:
    barrier.wait()
    start = time.perf_counter()
    try:
        result = client.predict(handle_file(path), 3, api_name="/classify")
        answer = f"ok: {result.get('label') if isinstance(result, dict) else result}"
    except Exception as error:  # the app's refusal arrives as gradio_client's AppError with the message
        answer = f"refused: {type(error).__name__}: {error}"
    answers[index] = f"{time.perf_counter() - start:5.2f} s  {answer}"


def burst(clients: list[Client], path: Path) -> tuple[float, float, list[str]]:
    """All clients send `path` at once; returns (RSS before, peak RSS during, answers)."""
    answers = [""] * len(clients)
    barrier = threading.Barrier(len(clients))
    threads = [
        threading.Thread(target=classify, args=(client, path, answers, index, barrier))
        for index, client in enumerate(clients)
    ]
    before = rss_mb()
    with PeakSampler() as sampler:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return before, sampler.peak_mb, answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent uploads per burst (default 8)")
    parser.add_argument(
        "--sizes", default="8000,4900", help="square PNG sides, one burst each (default 8000,4900)"
    )
    parser.add_argument("--checkpoint", default=None, help="run to serve (default: the embedded model)")
    parser.add_argument(
        "--unbounded", action="store_true", help="LOCAL_LIMITS and no decode budget (the old behaviour)"
    )
    args = parser.parse_args(argv)
    if args.unbounded:
        demo.service.UPLOAD_LIMITS = finetune.images.LOCAL_LIMITS
        finetune.images.DECODE_BUDGET.budget_bytes = 1 << 62

    service = InferenceService.from_checkpoint(args.checkpoint)
    blocks = app.build_app(service)
    app.launch(blocks, host="127.0.0.1", port=free_port(), prevent_thread_lock=True)
    failed = False
    try:
        with tempfile.TemporaryDirectory() as tmp:
            small = Path(tmp) / "small.png"
            small.write_bytes(hostile_files.png((320, 240)))
            clients = [Client(blocks.local_url, verbose=False) for _ in range(args.clients)]
            for client in clients:  # connect and warm up: a new session's first call costs extra
                client.predict(handle_file(small), 3, api_name="/classify")
            for _ in range(2):  # and a burst of small images, so batched forward passes are in the baseline
                burst(clients, small)
            for side in (int(value) for value in args.sizes.split(",")):
                path = Path(tmp) / f"big_{side}.png"
                path.write_bytes(hostile_files.big_png(side, side))
                before, peak, answers = burst(clients, path)
                added = peak - before
                print(
                    f"\n{args.clients} concurrent /classify of a {path.stat().st_size / 1e3:,.0f} KB "
                    f"{side}x{side} PNG: RSS before {before:,.0f} MB, peak {peak:,.0f} MB, "
                    f"added {added:,.0f} MB (target < 300 MB), after {rss_mb():,.0f} MB"
                )
                for answer in answers:
                    print(f"  {answer}")
                failed |= added >= 300 or any(not answer for answer in answers)
    finally:
        blocks.close()
        service.close()
    return 1 if failed and not args.unbounded else 0


if __name__ == "__main__":
    raise SystemExit(main())
