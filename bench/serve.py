"""Serving benchmark: model latency, end-to-end latency, HTTP throughput, cold start and a soak, in one run.

    python bench/serve.py                                  # all five parts (starts `python app.py` itself)
    python bench/serve.py --only model,e2e                 # no server needed
    python bench/serve.py --only http,cold,soak --soak-s 20 --soak-clients 20

1. model: p50/p95 of the model call at batch 1, PyTorch eager against the default runtime (`--runtime`,
   auto = ONNX Runtime FP32 when available) and the opt-in INT8 export (`--runtime onnx-int8`), measured
   interleaved in rounds so all of them see the same machine load.
2. e2e: file -> top-k for a 4000x3000 JPEG and a 224 px PNG made from a real photo, the default path
   (draft decoding, fast preprocessing, default runtime) against the naive one (full decode, timm transform,
   PyTorch).
3. http: requests/s of the running app's `classify` endpoint with 8 concurrent gradio_client clients against
   one client at a time, on the same server.
4. cold: `python app.py` launched -> first successful classify answer, first with an empty export cache (the
   ONNX export happens) and then again with the cache it left (every later start).
5. soak: N concurrent clients for S seconds on 127.0.0.1 with good and bad images mixed; unexpected errors
   (a good image not answered, a bad image answered, timeouts) and server RSS growth.

Parts 3-5 talk to `python app.py --port P [--checkpoint RUN] [--runtime R]` on 127.0.0.1 (its public
contract); every server started here is stopped before the script exits. The machine's other load shows up
in every figure: read the ratios measured within one run rather than absolute milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("model", "e2e", "http", "cold", "soak")
TARGETS = {"model_ratio": 0.25, "http_speedup": 2.0, "cold_start_s": 10.0, "soak_rss_growth": 0.10}
SERVER_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def percentiles(samples_s: list[float]) -> tuple[float, float]:
    """(p50, p95) in milliseconds."""
    return float(np.percentile(samples_s, 50) * 1e3), float(np.percentile(samples_s, 95) * 1e3)


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, per_round: int) -> dict[str, list[float]]:
    """Time several functions in alternating blocks so machine load drifts hit all of them alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        timed(fn, 5)  # warm-up: first calls allocate and pick kernels
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name] += timed(fn, per_round)
    return samples


def sample_photo() -> Any:
    """A real photo from a runtime dependency (matplotlib's portrait of Grace Hopper)."""
    from finetune.export import sample_images

    return sample_images()[0]


def bench_model(run: Any, runtime: str, rounds: int, per_round: int, threads: int) -> dict[str, Any]:
    """Batch-1 latency of PyTorch eager, the default runtime and the opt-in INT8 export, interleaved."""
    from finetune.errors import StudioError
    from finetune.inference import Classifier, OnnxClassifier
    from finetune.runtime import create_classifier

    def same_threads(classifier: Any) -> Any:  # the thread count PyTorch has (main() sets it)
        if isinstance(classifier, OnnxClassifier):
            return OnnxClassifier(run, classifier.onnx_path, threads=threads)
        return classifier

    contenders = {
        "torch": Classifier(run, batch_size=1),
        "default": same_threads(create_classifier(run, runtime)),
    }
    try:
        contenders["int8"] = same_threads(create_classifier(run, "onnx-int8"))
    except StudioError as error:  # onnxruntime missing, or quantization refused for this model
        print(f"(INT8 not measured: {error})", file=sys.stderr)
    batch = contenders["default"].preprocess([sample_photo()])
    batch8 = contenders["default"].preprocess([sample_photo()] * 8)
    samples = interleaved(
        {name: lambda c=classifier: c.predict_logits(batch) for name, classifier in contenders.items()},
        rounds,
        per_round,
    )
    gflop = model_gflop(run.model, batch)
    result: dict[str, Any] = {"gflop_per_image": gflop, "threads": threads}
    torch_p50 = percentiles(samples["torch"])[0]
    for name, classifier in contenders.items():
        p50, p95 = percentiles(samples[name])
        result[name] = {
            "runtime": classifier.runtime,
            "p50_ms": p50,
            "p95_ms": p95,
            "ratio_p50": p50 / torch_p50,
        }
        if name != "torch":
            per_batch8 = timed(lambda c=classifier: c.predict_logits(batch8), max(10, per_round // 4))
            result[name]["batch8_ms_per_image"] = percentiles(per_batch8)[0] / 8
            result[name]["gflop_per_s"] = gflop / (p50 / 1e3)
    return result


def model_gflop(model: Any, batch: Any) -> float:
    """FLOPs of one forward pass (a multiply-add counts 2), to compare latency with the CPU's peak."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(batch)
    return counter.get_total_flops() / 1e9


def bench_e2e(run: Any, runtime: str, work: Path, repeats: int) -> dict[str, Any]:
    import torch
    from PIL import Image

    from finetune.images import open_image
    from finetune.inference import Classifier, softmax, top_k
    from finetune.runtime import create_classifier

    photo = sample_photo()
    large, small = work / "large_4000x3000.jpg", work / "small_224.png"
    photo.resize((4000, 3000), Image.LANCZOS).save(large, quality=90)
    photo.resize((224, 224), Image.BICUBIC).save(small)
    fast = create_classifier(run, runtime)
    eager = Classifier(run)

    def default_path(path: Path) -> Any:
        return fast.predict([fast.open(path)], k=5)

    def naive_path(path: Path) -> Any:  # full-size decode, per-image timm transform, PyTorch
        with torch.inference_mode():
            logits = eager.run.model(eager.run.transform(open_image(path))[None]).numpy()
        return top_k(softmax(logits), eager.labels, 5)

    result: dict[str, Any] = {"runtime": fast.runtime}
    for label, path in (("jpeg_4000x3000", large), ("png_224", small)):
        result[f"{label}_same_top1"] = default_path(path)[0].label == naive_path(path)[0].label
        samples = interleaved(
            {"default": lambda p=path: default_path(p), "naive": lambda p=path: naive_path(p)},
            rounds=3,
            per_round=max(3, repeats // 3),
        )
        for name, values in samples.items():
            p50, p95 = percentiles(values)
            result[f"{label}_{name}_p50_ms"], result[f"{label}_{name}_p95_ms"] = p50, p95
    return result


class AppServer:
    """`python app.py` on a free 127.0.0.1 port, stopped (with its children) when the context exits."""

    def __init__(self, args: argparse.Namespace, cache_dir: Path | None, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        command = [sys.executable, str(args.app), "--port", str(self.port), "--runtime", args.runtime]
        if args.checkpoint != "default":
            command += ["--checkpoint", args.checkpoint]
        env = {**os.environ, **SERVER_ENV, **({"STUDIO_CACHE_DIR": str(cache_dir)} if cache_dir else {})}
        self.log = log_path.open("w")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def first_answer(self, image: Path, timeout_s: float) -> float:
        """Seconds from launch to the first successful classify answer (polling every 0.1 s)."""
        deadline = self.started + timeout_s
        last_error: Exception | None = None
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app exited with {self.process.returncode}; see {self.log.name}")
            try:
                answer = classify(connect(self.url), image)
                if isinstance(answer, dict) and answer.get("label") is not None:
                    return time.perf_counter() - self.started
            except Exception as error:  # not up yet: connection refused, 502, config not served
                last_error = error
            time.sleep(0.1)
        raise TimeoutError(f"no classify answer within {timeout_s} s (last error: {last_error!r})")

    def rss_mb(self) -> float:
        """Resident memory of the server process, from /proc (Linux)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)  # the session we started: the app and anything it spawned
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(timeout=15)
        self.log.close()


@contextmanager
def app_server(
    args: argparse.Namespace, cache_dir: Path | None, work: Path, name: str
) -> Iterator[AppServer]:
    server = AppServer(args, cache_dir, work / f"app-{name}.log")
    try:
        yield server
    finally:
        server.stop()


def connect(url: str, ssl_verify: bool = False) -> Any:
    """A gradio_client for the app on loopback.

    `ssl_verify=False` because gradio_client builds a new httpx client for every upload and every request,
    and with verification on each one loads the system's CA bundle: measured 126 ms of client CPU per
    classify call against 10 ms without it. On plain http://127.0.0.1 there is no TLS to verify, and that
    client-side cost, paid on the same two cores as the server, would otherwise be most of what part 3
    measures (real visitors pay it on their own machines).
    """
    from gradio_client import Client

    return Client(url, verbose=False, analytics_enabled=False, download_files=False, ssl_verify=ssl_verify)


def classify(client: Any, image: Path, k: int = 5) -> Any:
    from gradio_client import handle_file

    return client.predict(handle_file(str(image)), k, api_name="/classify")


def _visitor_process(
    url: str, image: str, ssl_verify: bool, warmup: int, commands: Any, results: Any
) -> None:
    """One visitor in its own process (real visitors do not share a Python interpreter).

    It connects and warms up once (its first request makes the server build the session's state), then runs
    `count` requests each time the parent sends a count, reporting the latencies; None ends it.
    """
    client = connect(url, ssl_verify)
    for _ in range(warmup):
        classify(client, Path(image))
    results.put([])
    while (count := commands.get()) is not None:
        latencies = []
        for _ in range(count):
            start = time.perf_counter()
            classify(client, Path(image))
            latencies.append(time.perf_counter() - start)
        results.put(latencies)


def bench_http(
    server: AppServer, image: Path, requests: int, clients: int, ssl_verify: bool = False
) -> dict[str, Any]:
    """Requests per second for one visitor at a time, then `clients` visitors at once.

    Every visitor is a separate process, connected and warmed up before any clock starts, so both figures
    measure the server in steady state: client threads in one process would share its GIL (the benchmark
    would measure its own client), and a visitor's first request also pays for its new session.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    commands = [context.Queue() for _ in range(clients)]
    results = [context.Queue() for _ in range(clients)]
    visitors = [
        context.Process(
            target=_visitor_process, args=(server.url, str(image), ssl_verify, 2, commands[n], results[n])
        )
        for n in range(clients)
    ]
    for visitor in visitors:
        visitor.start()
    try:
        for queue in results:
            queue.get(timeout=120)  # connected and warmed up

        def run(active: int, count: int) -> tuple[float, list[float]]:
            start = time.perf_counter()
            for queue in commands[:active]:
                queue.put(count)
            latencies = [value for queue in results[:active] for value in queue.get(timeout=600)]
            return active * count / (time.perf_counter() - start), latencies

        sequential_rps, sequential = run(1, requests)
        concurrent_rps, concurrent = run(clients, max(1, requests // clients))
    finally:
        for queue in commands:
            queue.put(None)
        for visitor in visitors:
            visitor.join(timeout=30)
            if visitor.is_alive():
                visitor.kill()
    return {
        "sequential_rps": sequential_rps,
        "sequential_p50_ms": percentiles(sequential)[0],
        "concurrent_clients": clients,
        "concurrent_rps": concurrent_rps,
        "concurrent_p50_ms": percentiles(concurrent)[0],
        "speedup": concurrent_rps / sequential_rps,
        "client_ssl_verify": ssl_verify,
    }


def bench_cold(args: argparse.Namespace, image: Path, work: Path) -> dict[str, Any]:
    cache = work / "cold-cache"  # empty: the first start pays for the ONNX export, the second reuses it
    result = {}
    for name in ("first_start", "cached_start"):
        with app_server(args, cache, work, name) as server:
            result[f"{name}_s"] = server.first_answer(image, timeout_s=args.start_timeout_s)
    return result


def bench_soak(
    server: AppServer, images: dict[str, list[Path]], clients: int, seconds: float
) -> dict[str, Any]:
    from gradio_client.exceptions import AppError

    counts = {"good_ok": 0, "bad_refused": 0, "unexpected": 0}
    examples: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()
    rss = [server.rss_mb()]

    def visitor(seed: int, deadline: float) -> None:
        rng = random.Random(seed)
        client = connect(server.url)
        while time.perf_counter() < deadline:
            is_bad = rng.random() < 0.2
            image = rng.choice(images["bad" if is_bad else "good"])
            start = time.perf_counter()
            try:
                answer = classify(client, image)
                outcome = "unexpected" if is_bad or not answer.get("label") else "good_ok"
                detail = f"{image.name} answered: {str(answer)[:80]}"
            except AppError as error:
                outcome = "bad_refused" if is_bad else "unexpected"
                detail = f"{image.name}: {str(error)[:120]}"
            except Exception as error:  # timeouts, dropped connections, server errors
                outcome, detail = "unexpected", f"{image.name}: {type(error).__name__}: {str(error)[:120]}"
            with lock:
                counts[outcome] += 1
                latencies.append(time.perf_counter() - start)
                if outcome == "unexpected" and len(examples) < 5:
                    examples.append(detail)

    # a short warm-up burst fills allocator pools and Gradio's caches, so growth measures leaks, not warm-up
    warm = [threading.Thread(target=visitor, args=(-n, time.perf_counter() + 5)) for n in range(clients)]
    for thread in warm:
        thread.start()
    for thread in warm:
        thread.join()
    counts = {key: 0 for key in counts}
    examples.clear()
    latencies.clear()
    rss = [server.rss_mb()]
    deadline = time.perf_counter() + seconds
    threads = [threading.Thread(target=visitor, args=(n, deadline)) for n in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        time.sleep(1.0)
        rss.append(server.rss_mb())
    elapsed = time.perf_counter() - start
    total = sum(counts.values())
    return {
        **counts,
        "requests": total,
        "rps": total / elapsed,
        "p50_ms": percentiles(latencies)[0] if latencies else float("nan"),
        "p95_ms": percentiles(latencies)[1] if latencies else float("nan"),
        "rss_start_mb": rss[0],
        "rss_peak_mb": max(rss),
        "rss_end_mb": rss[-1],
        "rss_growth": rss[-1] / rss[0] - 1.0,
        "unexpected_examples": examples,
    }


def soak_images(work: Path) -> dict[str, list[Path]]:
    """Good images (a JPEG photo, a PNG) and bad ones (text named .jpg, a truncated JPEG, an empty file)."""
    from PIL import Image

    photo = sample_photo()
    good = [work / "photo.jpg", work / "photo.png"]
    photo.save(good[0], quality=90)
    photo.resize((224, 224), Image.BICUBIC).save(good[1])
    bad = [work / "text.jpg", work / "truncated.jpg", work / "empty.png"]
    bad[0].write_text("this is not an image\n")
    bad[1].write_bytes(good[0].read_bytes()[:2000])
    bad[2].write_bytes(b"")
    return {"good": good, "bad": bad}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def report(results: dict[str, dict[str, Any]]) -> None:
    """Human-readable lines, each with its target where the issue set one."""
    lines = []
    if "model" in results:
        m = results["model"]
        eager = f"PyTorch eager p50 {m['torch']['p50_ms']:.2f} ms (p95 {m['torch']['p95_ms']:.2f})"
        lines.append(
            f"1. model latency, batch 1, {m['threads']} threads, {m['gflop_per_image']:.2f} GFLOP: {eager}"
        )
        for name in ("default", "int8"):
            if name in m:
                r = m[name]
                lines.append(
                    f"   {name} ({r['runtime']}): p50 {r['p50_ms']:.2f} ms (p95 {r['p95_ms']:.2f}) -> "
                    f"{r['ratio_p50']:.2f}x eager [target <= {TARGETS['model_ratio']}x]; batch 8: "
                    f"{r['batch8_ms_per_image']:.2f} ms/image; {r['gflop_per_s']:.0f} GFLOP/s at batch 1"
                )
    if "e2e" in results:
        e = results["e2e"]
        for label in ("jpeg_4000x3000", "png_224"):
            fast = f"p50 {e[f'{label}_default_p50_ms']:.1f} ms (p95 {e[f'{label}_default_p95_ms']:.1f})"
            naive = f"p50 {e[f'{label}_naive_p50_ms']:.1f} ms (p95 {e[f'{label}_naive_p95_ms']:.1f})"
            lines.append(
                f"2. file -> top-5, {label}: default ({e['runtime']}, draft decode) {fast}; naive (full "
                f"decode, timm transform, PyTorch) {naive}; same top-1: {e[f'{label}_same_top1']}"
            )
    if "http" in results:
        h = results["http"]
        one = f"{h['sequential_rps']:.1f} req/s (p50 {h['sequential_p50_ms']:.0f} ms)"
        many = f"{h['concurrent_rps']:.1f} req/s (p50 {h['concurrent_p50_ms']:.0f} ms)"
        lines.append(
            f"3. HTTP classify: 1 client at a time {one}; {h['concurrent_clients']} clients {many} -> "
            f"{h['speedup']:.2f}x [target >= {TARGETS['http_speedup']}x]"
        )
    if "cold" in results:
        c = results["cold"]
        lines.append(
            f"4. cold start to first answer: {c['cached_start_s']:.1f} s with the export cached "
            f"[target <= {TARGETS['cold_start_s']} s]; {c['first_start_s']:.1f} s on the very first start "
            "(includes the one-time ONNX export)"
        )
    if "soak" in results:
        s = results["soak"]
        traffic = (
            f"{s['requests']} requests ({s['rps']:.1f}/s, p50 {s['p50_ms']:.0f} ms, p95 {s['p95_ms']:.0f} ms)"
        )
        outcomes = (
            f"{s['good_ok']} good answered, {s['bad_refused']} bad refused, {s['unexpected']} unexpected"
        )
        memory = f"RSS {s['rss_start_mb']:.0f} -> {s['rss_end_mb']:.0f} MB (peak {s['rss_peak_mb']:.0f})"
        growth_target = TARGETS["soak_rss_growth"] * 100
        lines.append(
            f"5. soak {s['clients']} clients x {s['seconds']:.0f} s: {traffic}, {outcomes} [target 0]; "
            f"{memory}, growth {s['rss_growth'] * 100:+.1f}% [target < {growth_target:.0f}%]"
        )
        lines += [f"   unexpected: {example}" for example in s["unexpected_examples"]]
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    lines.append(f"machine: {os.cpu_count()} cores, load average {load} (1, 5, 15 min) at the end of the run")
    print("\n".join(lines))


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--checkpoint", default="default", help="run folder, or 'default' (embedded model)")
    parser.add_argument("--runtime", default="auto", help="runtime under test: auto, onnx or torch")
    parser.add_argument("--app", type=Path, default=ROOT / "app.py", help="the app script (default: app.py)")
    parser.add_argument(
        "--threads", type=int, help="threads for both runtimes in part 1 (default: all cores)"
    )
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds for model latency")
    parser.add_argument("--per-round", type=int, default=40, help="calls per runtime per round")
    parser.add_argument("--e2e-repeats", type=int, default=15, help="calls per path for end-to-end latency")
    parser.add_argument("--http-requests", type=int, default=96, help="requests per HTTP measurement")
    parser.add_argument("--http-clients", type=int, default=8, help="concurrent clients for HTTP throughput")
    parser.add_argument(
        "--client-ssl-verify",
        action="store_true",
        help="part 3: keep gradio_client's CA loading on every request (see `connect`): mostly client CPU",
    )
    parser.add_argument("--soak-s", type=float, default=60.0, help="soak duration in seconds")
    parser.add_argument("--soak-clients", type=int, default=50, help="concurrent soak clients")
    parser.add_argument("--start-timeout-s", type=float, default=180.0, help="limit for one server start")
    parser.add_argument("--json", type=Path, help="also write all figures to this JSON file")
    parser.add_argument(
        "--work", type=Path, help="keep test images and server logs here (default: temporary)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    parts = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"error: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if {"model", "e2e"} & set(parts):
            import torch

            from finetune.checkpoint import load_default_run, load_run
            from finetune.inference import available_cores

            torch.set_num_threads(args.threads or available_cores())

            run = load_default_run() if args.checkpoint == "default" else load_run(args.checkpoint)
            if "model" in parts:
                threads = args.threads or available_cores()
                results["model"] = bench_model(run, args.runtime, args.rounds, args.per_round, threads)
            if "e2e" in parts:
                results["e2e"] = bench_e2e(run, args.runtime, work, args.e2e_repeats)
        images = soak_images(work)
        if "cold" in parts:
            results["cold"] = bench_cold(args, images["good"][1], work)
        if {"http", "soak"} & set(parts):
            with app_server(args, None, work, "serve") as server:  # the user's export cache
                server.first_answer(images["good"][1], timeout_s=args.start_timeout_s)
                if "http" in parts:
                    image, requests, clients = images["good"][1], args.http_requests, args.http_clients
                    results["http"] = bench_http(server, image, requests, clients, args.client_ssl_verify)
                if "soak" in parts:
                    soak = bench_soak(server, images, args.soak_clients, args.soak_s)
                    results["soak"] = {**soak, "clients": args.soak_clients, "seconds": args.soak_s}
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
