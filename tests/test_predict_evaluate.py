"""`finetune.predict` and `finetune.evaluate` end to end, on a trained tiny run and the embedded model."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import TINY_MODEL, write_digits_folder

from finetune.config import TrainConfig
from finetune.trainer import fine_tune

ROOT = Path(__file__).resolve().parents[1]


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model trained on train/ and validated on val/ of three digit classes: (run_dir, val_dir)."""
    root = tmp_path_factory.mktemp("digits_split")
    write_digits_folder(root / "data" / "train", classes=(0, 1, 2), per_class=20)
    full = write_digits_folder(root / "all", classes=(0, 1, 2), per_class=26)
    for folder in full.iterdir():  # the last 6 of each class, not in train/, become val/
        target = root / "data" / "val" / folder.name
        target.mkdir(parents=True)
        for path in sorted(folder.iterdir())[20:]:
            shutil.copy(path, target / path.name)
    config = TrainConfig(
        data_dir=root / "data", out=root / "run", model=TINY_MODEL, weights="none", img_size=48, epochs=3,
        batch_size=8, quiet=True,
    )  # fmt: skip
    fine_tune(config)
    return root / "run", root / "data" / "val"


def test_evaluate_json_matches_the_training_validation_score(trained: tuple[Path, Path]) -> None:
    run_dir, val_dir = trained
    result = run_module("finetune.evaluate", str(val_dir), "--checkpoint", str(run_dir), "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    stored = json.loads((run_dir / "config.json").read_text())["studio"]["metrics"]
    assert metrics["n"] == 18
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
    assert metrics["top1"] == pytest.approx(stored["val_top1"], abs=1e-9)
    assert set(metrics["per_class"]) >= {"digit_0", "digit_1", "digit_2", "macro avg"}


def test_evaluate_tables_and_unknown_class_folder(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, val_dir = trained
    result = run_module(
        "finetune.evaluate", str(val_dir), "--checkpoint", str(run_dir), "--out-dir", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    assert "top-1" in result.stdout and "confusion matrix" in result.stdout
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 0
    strange = tmp_path / "strange"
    shutil.copytree(val_dir, strange)
    (strange / "digit_0").rename(strange / "giraffe")
    result = run_module("finetune.evaluate", str(strange), "--checkpoint", str(run_dir))
    assert result.returncode == 2
    assert "giraffe" in result.stderr and "Traceback" not in result.stderr


def test_predict_writes_one_row_per_file_with_errors_in_their_rows(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    run_dir, val_dir = trained
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    out = tmp_path / "preds.csv"
    result = run_module(
        "finetune.predict", str(val_dir), str(tmp_path / "empty.jpg"), str(tmp_path / "notes.png"),
        "--checkpoint", str(run_dir), "--top-k", "2", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 18 + 2
    assert list(rows[0]) == [
        "path",
        "label",
        "prob",
        "error",
        "top1_label",
        "top1_prob",
        "top2_label",
        "top2_prob",
        "ood_score",
        "unknown",
    ]
    good = [row for row in rows if not row["error"]]
    assert len(good) == 18
    assert all(
        row["label"] in {"digit_0", "digit_1", "digit_2"} and 0 < float(row["prob"]) <= 1 for row in good
    )
    assert all(row["label"] == row["top1_label"] for row in good)
    bad = {Path(row["path"]).name: row["error"] for row in rows if row["error"]}
    assert "empty" in bad["empty.jpg"] and "not an image" in bad["notes.png"]
    assert "2 of 20 file(s) could not be classified" in result.stderr


def test_predict_without_checkpoint_uses_readable_imagenet_names(photo_dir: Path) -> None:
    result = run_module("finetune.predict", str(photo_dir / "chelsea.jpg"), str(photo_dir / "coffee.jpg"))
    assert result.returncode == 0, result.stderr
    rows = {Path(row["path"]).stem: row for row in csv.DictReader(io.StringIO(result.stdout))}
    assert rows["chelsea"]["label"] in {"tiger cat", "Egyptian cat", "tabby"}
    assert rows["coffee"]["label"] == "espresso"


def test_predict_bad_checkpoint_is_a_one_line_error(tmp_path: Path, photo_dir: Path) -> None:
    result = run_module("finetune.predict", str(photo_dir / "chelsea.jpg"), "--checkpoint", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "config.json" in result.stderr


def one_file_at_a_time(classifier, files: list[Path]) -> list[str]:  # noqa: ANN001
    """The old loop's answers: each file opened and classified alone."""
    return [classifier.predict([classifier.open(path)], k=1)[0].label for path in files]


def test_streamed_csv_keeps_the_rows_of_chunks_done_before_a_crash(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    """A classifier that fails on its third chunk: the first two chunks are on disk, complete, in order."""
    from finetune.checkpoint import load_run
    from finetune.inference import Classifier
    from finetune.predict import _write_csv, expand_paths

    run_dir, val_dir = trained

    class FailsOnThirdChunk(Classifier):
        chunks = 0

        def score_views(self, views):  # noqa: ANN001, ANN202
            FailsOnThirdChunk.chunks += 1
            if FailsOnThirdChunk.chunks == 3:
                raise RuntimeError("simulated crash")
            return super().score_views(views)

    classifier = FailsOnThirdChunk(load_run(run_dir), batch_size=4)
    files = expand_paths([val_dir])
    out = tmp_path / "preds.csv"
    stream = out.open("w", newline="", encoding="utf-8")
    with pytest.raises(RuntimeError, match="simulated"):
        _write_csv(stream, classifier, files, 1, 4, None, quiet=True)
    rows = list(csv.DictReader(out.open()))  # read before closing: only the per-chunk flushes put rows there
    stream.close()
    assert [row["path"] for row in rows] == [str(path) for path in files[:8]]
    assert [row["label"] for row in rows] == one_file_at_a_time(Classifier(load_run(run_dir)), files[:8])


def test_predict_and_evaluate_give_the_one_file_at_a_time_labels(trained: tuple[Path, Path]) -> None:
    from finetune.checkpoint import load_run
    from finetune.evaluate import evaluate_folder
    from finetune.inference import Classifier
    from finetune.predict import expand_paths, predict_rows

    run_dir, val_dir = trained
    classifier = Classifier(load_run(run_dir), batch_size=5)
    files = expand_paths([val_dir])
    rows = [row for chunk in predict_rows(classifier, files, 1, 5) for row in chunk]
    expected = one_file_at_a_time(classifier, files)
    assert [row["label"] for row in rows] == expected
    metrics, _, labels = evaluate_folder(val_dir, str(run_dir), batch_size=5, runtime="torch")
    truth = [Path(path).parent.name for path in files]
    assert metrics["n"] == len(files)
    assert metrics["top1"] == pytest.approx(sum(map(str.__eq__, expected, truth)) / len(files))


def _torchrun_standalone(args: list[str], env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """One machine, two processes."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    command = [*launcher, "-m", "finetune.predict", *args]
    return [subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)]


def _torchrun_two_nodes(args: list[str], env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """Two "machines": two torchrun agents meeting at a c10d rendezvous, as `--nnodes=2` runs on two hosts
    (here both on 127.0.0.1, sharing the output folder as machines would share a filesystem)."""
    from app_server import free_port

    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "--rdzv-id=predict-test",
    ]
    command = [*launcher, "-m", "finetune.predict", *args]
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env=env) for _ in range(2)]  # fmt: skip
    finished = []
    for node in nodes:
        out, err = node.communicate(timeout=300)
        finished.append(subprocess.CompletedProcess(command, node.returncode, out, err))
    return finished


@pytest.mark.distributed
@pytest.mark.parametrize(
    "launch", [_torchrun_standalone, _torchrun_two_nodes], ids=["2-processes", "2-nodes"]
)
def test_torchrun_predict_writes_the_one_process_csv(
    trained: tuple[Path, Path], tmp_path: Path, launch: Callable
) -> None:
    """Processes (one machine, or two nodes) shard the files and join their parts: the one-process CSV."""
    import os

    run_dir, val_dir = trained
    (tmp_path / "broken.png").write_text("not an image")  # an error row sorts last: in the second shard
    args = [str(val_dir), str(tmp_path / "broken.png"), "--checkpoint", str(run_dir), "--runtime", "torch",
            "--top-k", "2", "--batch-size", "4", "--quiet"]  # fmt: skip
    single = run_module("finetune.predict", *args, "--out", str(tmp_path / "one.csv"))
    assert single.returncode == 0, single.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for finished in launch([*args, "--out", str(tmp_path / "two.csv")], env):
        assert finished.returncode == 0, finished.stderr[-3000:]
    one, two = (list(csv.DictReader((tmp_path / name).open())) for name in ("one.csv", "two.csv"))
    # float sums differ by ~1e-7 between thread counts (1 per process here, 2 in the single process), and the
    # temperature (< 1) scales logit differences up: numbers agree to 1e-5, everything else exactly
    numeric = [name for name in one[0] if name == "ood_score" or name.endswith("prob")]
    # the "none of these" threshold is a quantile of these very validation images' scores: the image that sets
    # it scores the threshold itself, and 1e-7 decides its side, so only there may `unknown` differ
    threshold = json.loads((run_dir / "config.json").read_text())["studio"]["ood"]["threshold"]
    for a, b in zip(one, two, strict=True):
        if a["ood_score"] and abs(float(a["ood_score"]) - threshold) < 1e-5:
            assert a.pop("unknown") in ("true", "false") and b.pop("unknown") in ("true", "false")
        for name in numeric:
            assert abs(float(a.pop(name) or 0) - float(b.pop(name) or 0)) < 1e-5
    assert one == two
    assert len((tmp_path / "one.csv").read_text().splitlines()) == 1 + 18 + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.png", "one.csv", "two.csv"]  # parts gone
