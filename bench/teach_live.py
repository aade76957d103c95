"""Teach-and-test benchmark: 2 classes x 30 camera frames to a usable model, then the live preview's rate.

    python bench/teach_live.py                   # starts `python app.py` itself, on 127.0.0.1
    python bench/teach_live.py --frames 30 --stream-s 10 --budget-s 30

Everything goes through the real server (`python app.py --port P --data-dir TMP --no-vision`, a separate
process, so server and client share the machine's cores as a visitor's browser would not):
1. teach: two classes, each filled with `--frames` "camera frames" (320x240 crops of two real scikit-image
   photos, chelsea and coffee, each shifted, scaled and brightened differently, as a hand-held object moves),
   uploaded with `teach_add_images`; then `teach_train` with the embedded tf_efficientnet_lite0 and the
   Teach tab's recipe (`auto`: the linear probe, then a short fine-tune only if it fits `--budget-s`). Timed
   from the train call to its answer (import, queue, decoding, training, saving and serving the run), with the
   validation accuracy the run reports and the accuracy on 20 held-out frames per class (through `live`).
2. live: the page's webcam stream driven as the browser drives it (join the stream event, post each next
   frame to `/gradio_api/stream/<event_id>` as soon as the previous answer arrives) for `--stream-s`
   seconds, in the session that trained, so its new model answers: frames classified per second, once
   right after training (the run answers on PyTorch while its ONNX export runs in a child process) and
   once the ONNX classifier is in. The same frames through the `live` API one call at a time (gradio_client)
   are printed beside it.
The figures depend on the machine's load (2 shared CPU cores here); the script prints, never asserts.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageEnhance

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {"cat": "chelsea", "coffee": "coffee"}
FRAME_SIZE = (320, 240)
SERVER_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "TRAIN_TAB": "on"}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=30, help="frames per class (default: 30)")
    parser.add_argument("--budget-s", type=float, default=20, help="the training time budget (default: 20)")
    parser.add_argument("--stream-s", type=float, default=10, help="seconds of live streaming (default: 10)")
    parser.add_argument("--held-out", type=int, default=20, help="held-out frames per class (default: 20)")
    return parser


def camera_frames(photo: str, count: int, seed: int) -> list[Image.Image]:
    """`count` 320x240 frames of a real photo: random crops (50-90% of it), moved, scaled and relit."""
    from skimage import data

    source = Image.fromarray(getattr(data, photo)())
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        width = int(source.width * rng.uniform(0.5, 0.9))
        height = int(width * FRAME_SIZE[1] / FRAME_SIZE[0])
        left = int(rng.integers(0, source.width - width + 1))
        top = int(rng.integers(0, max(1, source.height - height + 1)))
        frame = source.crop((left, top, left + width, top + height)).resize(FRAME_SIZE, Image.BILINEAR)
        frames.append(ImageEnhance.Brightness(frame).enhance(float(rng.uniform(0.75, 1.25))))
    return frames


def save_frames(frames: list[Image.Image], folder: Path, stem: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, frame in enumerate(frames):
        paths.append(folder / f"{stem}-{n:03d}.jpg")
        frame.save(paths[-1], quality=85)
    return paths


def data_url(path: Path) -> dict[str, Any]:
    return {"url": "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode(), "meta": {}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--data-dir", str(work / "data")]
    log = (work / "app.log").open("w")
    process = subprocess.Popen(
        [*command, "--no-vision", "--private"],
        cwd=ROOT,
        env={**os.environ, **SERVER_ENV},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}; see {log.name}")
        try:
            if httpx.get(f"{url}config", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("app.py did not start within 180 s")


def stream_rate(url: str, session_hash: str, frames: list[Path], seconds: float) -> tuple[int, float]:
    """(frames answered, seconds) of the page's live stream, each next frame sent when an answer arrives."""
    config = httpx.get(f"{url}config", timeout=30).json()
    camera = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "live-camera")
    fn_index = next(d["id"] for d in config["dependencies"] if d["targets"] == [[camera, "stream"]])
    payloads = [data_url(path) for path in frames]
    body = {"data": [payloads[0], None, None], "fn_index": fn_index, "session_hash": session_hash}
    answered, start = 0, 0.0
    with httpx.Client(base_url=url, timeout=60) as http:
        event_id = http.post("/gradio_api/queue/join", json={**body, "event_data": None}).json()["event_id"]
        with http.stream("GET", "/gradio_api/queue/data", params={"session_hash": session_hash}) as stream:
            for line in stream.iter_lines():
                message = json.loads(line[5:]) if line.startswith("data:") else {}
                if message.get("msg") == "process_streaming":
                    if answered == 0:
                        start = time.perf_counter()  # the stream's set-up is not the preview's rate
                    answered += 1
                    if time.perf_counter() - start >= seconds:
                        http.post(f"/gradio_api/stream/{event_id}/close")
                        break
                    frame = {**body, "data": [payloads[answered % len(payloads)], None, None]}
                    http.post(f"/gradio_api/stream/{event_id}", json=frame)
                elif message.get("msg") == "process_completed":
                    raise RuntimeError(f"the stream ended early: {str(message)[:300]}")
    return answered - 1, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    from gradio_client import Client, handle_file

    work = Path(tempfile.mkdtemp(prefix="teach-live-"))
    train = {
        name: save_frames(camera_frames(photo, args.frames, 1 + n), work / "train", name)
        for n, (name, photo) in enumerate(CLASSES.items())
    }
    held = {
        name: save_frames(camera_frames(photo, args.held_out, 100 + n), work / "held", name)
        for n, (name, photo) in enumerate(CLASSES.items())
    }
    process, url = start_server(work)
    try:
        client = Client(url, verbose=False, download_files=False, ssl_verify=False)
        for name, paths in train.items():
            client.predict(name, api_name="/teach_add_class")
            client.predict(name, [handle_file(path) for path in paths], api_name="/teach_add_images")
        start = time.perf_counter()
        run_id, _, metrics = client.predict("tf_efficientnet_lite0", args.budget_s, api_name="/teach_train")
        teach_s = time.perf_counter() - start

        cold = stream_rate(url, client.session_hash, held["cat"] + held["coffee"], args.stream_s / 2)
        onnx = work / "data" / "runs" / run_id / "model.onnx"  # written by the serving export's child
        deadline = time.monotonic() + 300
        while not onnx.is_file() and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3)  # the child process exits and the ONNX classifier is swapped in
        correct, start = 0, time.perf_counter()
        for name, paths in held.items():
            for path in paths:
                correct += client.predict(handle_file(path), api_name="/live")["label"] == name
        api_fps = sum(map(len, held.values())) / (time.perf_counter() - start)
        held_out_acc = correct / sum(map(len, held.values()))
        frames, seconds = stream_rate(url, client.session_hash, held["cat"] + held["coffee"], args.stream_s)
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)
    result = {
        "teach_s": round(teach_s, 1),
        "engine_wall_s": round(metrics.get("wall_s", float("nan")), 1),
        "val_top1": metrics.get("val_top1"),
        "held_out_top1": round(held_out_acc, 4),
        "strategy_used": metrics.get("strategy_used"),
        "epochs_run": metrics.get("epochs_run"),
        "live_stream_fps": round(frames / seconds, 1),
        "live_stream_fps_during_export": round(cold[0] / cold[1], 1),
        "live_api_fps": round(api_fps, 1),
        "frames_per_class": args.frames,
        "budget_s": args.budget_s,
        "cpus": os.cpu_count(),
        "run_id": run_id,
    }
    print(
        f"teach: 2 classes x {args.frames} frames -> model in {teach_s:.1f} s "
        f"(engine {result['engine_wall_s']} s, {result['strategy_used']}, {result['epochs_run']} epochs), "
        f"validation top-1 {result['val_top1']:.1%}, held-out top-1 {held_out_acc:.1%}"
    )
    print(
        f"live: {result['live_stream_fps']} frames/s through the page's stream ({frames} frames in "
        f"{seconds:.1f} s, ONNX Runtime), {result['live_api_fps']} frames/s through the live API one call at "
        f"a time; right after training (PyTorch, while the ONNX export runs in a child process): "
        f"{result['live_stream_fps_during_export']} frames/s"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
