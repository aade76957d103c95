"""The README's picture of a multi-label answer: the real app, a trained multi-label run, a real browser.

The app is started on 127.0.0.1 with RUN_DIR (as `python app.py --checkpoint RUN_DIR` would serve it, through
tests/app_server.py), Debian's chromium is driven by playwright to upload IMAGE in the Classify tab, and the
page is saved once the answer (every label above its threshold) is shown. Use a run trained by
`bench/multilabel.py --work DIR` (DIR/run_bce) and one of its test mosaics (DIR/test/images/*.png): the test
images were never trained on.

    python bench/multilabel_screenshot.py RUN_DIR IMAGE [--out test-artifacts/multilabel.png]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from app_server import serve  # noqa: E402

from demo.service import InferenceService  # noqa: E402

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]  # fmt: skip
VIEWPORT = {"width": 1280, "height": 900}
TIMEOUT_MS = 120_000  # a loaded 2-core machine


def take_screenshot(run_dir: Path, image: Path, out: Path) -> str:
    """Classify `image` with `run_dir` in the Classify tab; save the page to `out`; return the answer."""
    from playwright.sync_api import expect, sync_playwright

    service = InferenceService.from_checkpoint(run_dir)
    try:
        with serve(service) as url, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_context(viewport=VIEWPORT).new_page()
                expect.set_options(timeout=TIMEOUT_MS)
                page.goto(url)
                page.locator("#classify-image input[type=file]").set_input_files(image)
                page.locator("#classify-button").click()
                expect(page.locator("#classify-latency")).to_contain_text("Answered in")
                expect(page.locator("#classify-label")).to_contain_text("independent probabilities")
                page.wait_for_timeout(500)  # the label bars animate in
                out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(out), full_page=True)
                return page.locator("#classify-label").inner_text()
            finally:
                browser.close()
    finally:
        service.close()


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("run_dir", type=Path, help="a multi-label run folder")
    parser.add_argument("image", type=Path, help="the image to classify")
    parser.add_argument("--out", type=Path, default=ROOT / "test-artifacts" / "multilabel.png")
    args = parser.parse_args()
    answer = take_screenshot(args.run_dir, args.image, args.out)
    print(f"wrote {args.out}; the app answered:\n{answer}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
