"""The web app, also the Hugging Face Spaces entry point: parse options, build the service, wire tabs, launch.

python app.py                                  # embedded ImageNet tf_efficientnet_lite0
python app.py --checkpoint runs/my-run         # a fine-tuned run folder
CHECKPOINT=hf-hub:USER/NAME python app.py      # a run published on the Hugging Face Hub
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

import gradio as gr

from demo import batch_tab, classify_tab, explain_tab
from demo.service import InferenceService
from finetune.errors import StudioError
from finetune.inference import RUNTIMES

# One line per tab: (title, build function). The build function creates its components and wires events.
TABS: list[tuple[str, Callable[[InferenceService], None]]] = [
    ("Classify", classify_tab.build),
    ("Explain", explain_tab.build),
    ("Batch", batch_tab.build),
]
MAX_FILE_SIZE = "20mb"  # uploads above this are refused by Gradio before they reach the app
QUEUE_MAX_SIZE = 64  # waiting requests beyond this get "queue full" instead of an ever longer wait
DELETE_CACHE = (3600, 3600)  # every hour, delete uploads and outputs older than an hour
THEME = gr.themes.Soft()
INTRO = (
    "# Image Recognition Studio\n"
    "Classify a photo, see where the model looks, or label a whole folder at once."
)


def build_app(service: InferenceService) -> gr.Blocks:
    """The whole app as a `gr.Blocks`, with its queue configured; tests launch it on 127.0.0.1."""
    with gr.Blocks(title="Image Recognition Studio", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(INTRO)
        for title, build in TABS:
            with gr.Tab(title):
                build(service)
    return demo.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=1)


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
        "--runtime", choices=RUNTIMES, default="auto", help="inference runtime (default: auto)"
    )
    server = parser.add_argument_group("server")
    server.add_argument("--host", default=None, help="address to bind (default: Gradio's, 127.0.0.1)")
    server.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860)")
    server.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own health checks, one line each
    try:
        service = InferenceService.from_checkpoint(args.checkpoint, runtime=args.runtime)
    except StudioError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    launch(build_app(service), host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
