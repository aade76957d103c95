"""`torchrun -m finetune` on CPU with gloo: the same engine, one run folder, honest metrics, clean failures.

Each test launches real processes (`python -m torch.distributed.run --standalone`) on real digit images with
timm's tiny `test_efficientnet`, one thread per process so two processes fit on two cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, write_digits_folder

from finetune.checkpoint import STATE_META_FILE, load_run, load_train_state
from finetune.data import batches

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", TINY_MODEL, "--weights", "none", "--img-size", "48", "--batch-size", "16"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
JOB_TIMEOUT_S = 150


def split_digits(root: Path, per_class: int = 30, val_per_class: int = 10) -> Path:
    """Real digits in train/ and val/ class folders, so the validation set is exactly val/."""
    write_digits_folder(root / "train", classes=(0, 1, 2), per_class=per_class + val_per_class)
    for folder in sorted((root / "train").iterdir()):
        (root / "val" / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[per_class:]:
            image.rename(root / "val" / folder.name / image.name)
    return root


def torchrun(nproc: int, *args: str) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    return [*launcher, "--monitor-interval=0.1", "-m", "finetune", *args]


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, cwd=REPO, env=ENV, check=False
    )


def test_two_process_run_writes_one_run_folder_that_evaluate_reproduces(tmp_path: Path) -> None:
    data = split_digits(tmp_path / "data")
    out = tmp_path / "run"
    result = run(torchrun(2, str(data), "--out", str(out), "--epochs", "2", *TINY))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run"]  # one run folder, nothing else
    assert not list(out.glob(".*.tmp"))
    # only rank 0 logs, shows progress and prints the summary
    assert result.stderr.count("Joined process group") == 1
    assert result.stderr.count("Linear probe: extracting features") == 1
    assert result.stdout.count("Run folder:") == 1

    config = json.loads((out / "config.json").read_text())
    studio = config["studio"]
    assert studio["world_size"] == 2
    assert studio["dataset"]["num_val"] == 30
    epochs = json.loads((out / "metrics.json").read_text())["epochs"]
    assert [row["phase"] for row in epochs] == ["probe", "finetune", "finetune"]
    assert epochs[0]["val_top1"] > 0.6  # probe features gathered from both processes line up with targets
    loaded = load_run(out)
    assert loaded.labels == ["digit_0", "digit_1", "digit_2"]

    evaluated = subprocess.run(
        [sys.executable, "-m", "finetune.evaluate", str(data / "val"), "--checkpoint", str(out), "--json"],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=ENV, check=False,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)
    assert metrics["n"] == 30
    assert metrics["top1"] == pytest.approx(studio["metrics"]["val_top1"], abs=1e-6)
    assert metrics["top5"] == pytest.approx(studio["metrics"]["val_top5"], abs=1e-6)


def test_two_processes_cache_the_frozen_layers_once_and_train_as_through_them(tmp_path: Path) -> None:
    data = split_digits(tmp_path / "data")
    flags = ["--epochs", "2", "--augment", "off", "--frozen-groups", "2", "--quiet", *TINY]
    cached = run(torchrun(2, str(data), "--out", str(tmp_path / "cached"), *flags))
    assert cached.returncode == 0, cached.stderr[-3000:]
    plain = run(torchrun(2, str(data), "--out", str(tmp_path / "plain"), *flags, "--no-trunk-cache"))
    assert plain.returncode == 0, plain.stderr[-3000:]
    plan = json.loads((tmp_path / "cached" / "config.json").read_text())["studio"]["plan"]
    assert plan["trunk_cache"]["boundary"].startswith("blocks.")  # each process computed half, both got all
    assert not list((tmp_path / "cached" / ".cache").glob("trunk_*"))
    rows = [
        json.loads((tmp_path / name / "metrics.json").read_text())["epochs"] for name in ("cached", "plain")
    ]
    assert [row["phase"] for row in rows[0]] == ["probe", "finetune", "finetune"]
    for a, b in zip(*rows, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)
        assert a["val_top1"] == b["val_top1"]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers in /proc")
def test_killed_worker_ends_the_job_and_a_one_process_resume_finishes_it(tmp_path: Path) -> None:
    data = split_digits(tmp_path / "data", per_class=24, val_per_class=6)
    out = tmp_path / "run"
    args = [str(data), "--out", str(out), "--epochs", "8", "--patience", "20", "--quiet", *TINY]
    job = subprocess.Popen(
        torchrun(2, *args), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for_epoch(out, job, epoch=1)
        os.kill(_worker_pid(job.pid, rank=1), signal.SIGKILL)
        started = time.monotonic()
        stdout, stderr = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert time.monotonic() - started < 45  # torchrun ended the survivor; nobody waited for a timeout
    assert "Signal 9 (SIGKILL)" in stderr  # torchrun's summary names the killed worker as the root cause
    assert f"the last checkpoint in {out} is intact" in stderr, stderr[-3000:]
    assert f"--resume {out}" in stderr
    assert not list(out.glob(".*.tmp"))
    saved_epoch = load_train_state(out)["epoch"]
    assert 1 <= saved_epoch < 8
    load_run(out)  # the best checkpoint so far loads

    resumed = subprocess.run(
        [sys.executable, "-m", "finetune", "--resume", str(out), "--quiet"],
        capture_output=True, text=True, timeout=JOB_TIMEOUT_S, cwd=REPO, env=ENV, check=False,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = json.loads((out / "metrics.json").read_text())["epochs"]
    assert [row["epoch"] for row in history] == list(range(9))  # probe, then epochs 1..8 once each
    config = json.loads((out / "config.json").read_text())
    assert config["studio"]["world_size"] == 1
    assert load_train_state(out)["finished"]
    load_run(out)


def test_ctrl_c_stops_every_process_at_the_same_step_and_keeps_the_run(tmp_path: Path) -> None:
    data = split_digits(tmp_path / "data", per_class=24, val_per_class=6)
    out = tmp_path / "run"
    args = [str(data), "--out", str(out), "--epochs", "8", "--patience", "20", *TINY]
    job = subprocess.Popen(
        torchrun(2, *args), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for_epoch(out, job, epoch=1)
        job.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal does: torchrun passes it to every worker
        stdout, stderr = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert stderr.count("Stopping after this batch") == 1  # rank 0 speaks for both
    assert stderr.count("Interrupted: best so far") == 1, stderr[-3000:]
    assert stderr.count("Traceback") <= 1  # torchrun's own SignalException at most: no worker crashed
    config = json.loads((out / "config.json").read_text())
    assert config["studio"]["metrics"]["interrupted"] is True  # rank 0 wrote the final reports
    assert (out / "classification_report.json").exists()
    state = load_train_state(out)
    assert 1 <= state["epoch"] < 8 and not state.get("finished")
    load_run(out)


def test_batch_that_does_not_split_over_the_processes_stops_every_process(tmp_path: Path) -> None:
    data = split_digits(tmp_path / "data", per_class=4, val_per_class=2)
    out = tmp_path / "run"
    result = run(torchrun(2, str(data), "--out", str(out), "--quiet", *TINY, "--batch-size", "15"))
    assert result.returncode != 0
    assert result.stderr.count("error: --batch-size 15 (the global batch) does not split evenly") == 2
    assert "multiple of 2" in result.stderr
    assert not (out / STATE_META_FILE).exists()


def test_collectives_agree_across_two_processes(tmp_path: Path) -> None:
    port = _free_port()
    torch.multiprocessing.spawn(_collectives_worker, args=(str(tmp_path), port), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in results:
        assert result["gathered"] == list(range(5))  # shares of 3 + 3 (one repeat) gathered back in order
        assert result["broadcast"] == [0.0, 0.0]
        assert result["any_true"] is True
        assert result["sum"] == [1.0, 2.0]


def test_global_batches_do_not_depend_on_the_number_of_processes() -> None:
    """Resuming with another number of processes continues the same sequence of global batches."""
    count, global_batch = 50, 8

    def global_batches(world_size: int) -> list[list[int]]:
        shards = [
            list(batches(count, global_batch // world_size, True, 3, 2, rank, world_size, drop_last=True))
            for rank in range(world_size)
        ]
        return [sorted(torch.cat(step).tolist()) for step in zip(*shards, strict=True)]

    single = global_batches(1)
    assert len(single) == count // global_batch
    assert global_batches(2) == single
    assert global_batches(4) == single


def _collectives_worker(rank: int, folder: str, port: int) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from finetune.distributed import init_distributed, shutdown_distributed

    dist = init_distributed("cpu", timeout_s=60)
    try:
        rows = dist.share(5).float().unsqueeze(1)
        gathered = dist.all_gather_rows(rows, 5).squeeze(1).long().tolist()
        value = torch.full((2,), float(rank))
        dist.broadcast_([value])
        result = {
            "gathered": gathered,
            "broadcast": value.tolist(),
            "any_true": dist.any_true(rank == 1),
            "sum": dist.all_reduce_sum([0.5, float(rank + 0.5)]),
        }
    finally:
        shutdown_distributed()
    Path(folder, f"rank{rank}.json").write_text(json.dumps(result))


def _wait_for_epoch(out: Path, job: subprocess.Popen, epoch: int, timeout_s: float = 90) -> None:
    """Poll the resumable state until fine-tuning epoch `epoch` is saved."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert job.poll() is None, job.communicate()[1][-3000:]
        try:
            if json.loads((out / STATE_META_FILE).read_text())["state"]["epoch"] >= epoch:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    pytest.fail(f"no epoch {epoch} saved in {timeout_s} s")


def _worker_pid(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank, from /proc (children of the launcher)."""
    for task in Path(f"/proc/{launcher_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ:
                return int(child)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher_pid}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
