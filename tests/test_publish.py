"""`python -m finetune.publish`: the dry-run folder, clear failures offline, the real upload, hf-hub: loading.

The only stand-in is at the network boundary: a small Hub API server on 127.0.0.1 that speaks the few
endpoints huggingface_hub uses to create a repository and commit a folder, so the real client code runs.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import photo
from huggingface_hub import constants
from run_factory import LABELS, shared_trained_run

from finetune.checkpoint import load_run
from finetune.model_card import CARD_FILE
from finetune.publish import DRY_RUN_MARKER, default_dry_run_dir, main

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPECTED_FILES = {
    "README.md",
    "config.json",
    "model.safetensors",
    "metrics.json",
    "classification_report.json",
    "curves.png",
    "confusion_matrix.png",
}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_trained_run(tmp_path_factory)


@pytest.fixture
def run_dir(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy with the files a real run also holds but must not upload (state, local card)."""
    run = tmp_path / "runs" / "digits"
    shutil.copytree(trained_run, run)
    (run / "train_state.json").write_text('{"state_id": "x", "state": {}}')
    (run / "train_state.safetensors").write_bytes(b"\0" * 16)
    (run / CARD_FILE).write_text("# local card\n")
    return run


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_dry_run_writes_the_upload_folder_with_a_hub_card(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(run_dir)
    assert main([str(run_dir), "--repo-id", "alice/digits", "--dry-run"]) == 0
    folder = default_dry_run_dir(run_dir)
    assert folder == run_dir.parent / "digits-hub"
    assert capsys.readouterr().out.strip() == str(folder)
    assert {path.name for path in folder.iterdir() if path.name != DRY_RUN_MARKER} == EXPECTED_FILES
    for name in EXPECTED_FILES - {CARD_FILE}:
        assert (folder / name).read_bytes() == (run_dir / name).read_bytes()
    card = (folder / CARD_FILE).read_text(encoding="utf-8")
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["library_name"] == "timm" and metadata["model-index"][0]["name"] == "alice/digits"
    top1 = json.loads((run_dir / "config.json").read_text())["studio"]["metrics"]["val_top1"]
    assert f"| Top-1 accuracy | {top1:.1%} |" in card
    assert 'timm.create_model("hf-hub:alice/digits", pretrained=True)' in card
    assert snapshot(run_dir) == before  # the run folder itself is untouched


def test_dry_run_replaces_its_own_folder_but_never_another(run_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "upload"
    assert main([str(run_dir), "--repo-id", "alice/digits", "--output-dir", str(target)]) == 0
    (target / "stale.onnx").write_text("from an older dry run")
    assert main([str(run_dir), "--repo-id", "alice/digits", "--output-dir", str(target)]) == 0
    assert not (target / "stale.onnx").exists()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    assert main([str(run_dir), "--repo-id", "alice/digits", "--output-dir", str(precious)]) == 2
    assert main([str(run_dir), "--repo-id", "alice/digits", "--output-dir", str(run_dir / "sub")]) == 2
    assert (precious / "notes.txt").read_text() == "mine" and not (run_dir / "sub").exists()


@pytest.mark.parametrize("repo_id", ["digits", "alice/", "alice/di gits", "a/b/c"])
def test_invalid_repo_id_is_a_clear_error(
    run_dir: Path, repo_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(run_dir), "--repo-id", repo_id, "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith(f"error: invalid --repo-id '{repo_id}'")
    assert not default_dry_run_dir(run_dir).exists()


def test_a_damaged_run_is_never_staged(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run_dir / "model.safetensors").write_bytes(b"not safetensors")
    assert main([str(run_dir), "--repo-id", "alice/digits", "--dry-run"]) == 2
    assert "is not a valid safetensors file" in capsys.readouterr().err
    assert not default_dry_run_dir(run_dir).exists()


def test_publish_offline_fails_clearly_and_changes_nothing(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert constants.HF_HUB_OFFLINE  # set by conftest before huggingface_hub was imported
    before = snapshot(run_dir)
    assert main([str(run_dir), "--repo-id", "alice/digits"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot publish while offline (HF_HUB_OFFLINE is set)")
    assert "--dry-run" in err and "Traceback" not in err
    assert snapshot(run_dir) == before and sorted(p.name for p in run_dir.parent.iterdir()) == ["digits"]


def publish_in_subprocess(
    run_dir: Path, endpoint: str, tmp_path: Path, *extra: str, token: str | None = "hf_test"
):
    """The CLI as a user runs it, online: the Hub endpoint and token come from the environment."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"))
    env.update(HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5")
    if token:
        env["HF_TOKEN"] = token
    command = [sys.executable, "-m", "finetune.publish", str(run_dir), "--repo-id", "alice/digits", *extra]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_publish_without_network_fails_clearly(run_dir: Path, tmp_path: Path) -> None:
    before = snapshot(run_dir)
    result = publish_in_subprocess(run_dir, f"http://127.0.0.1:{free_port()}", tmp_path)  # nothing listens
    assert result.returncode == 2, result.stderr
    assert "error: cannot reach the Hugging Face Hub at http://127.0.0.1:" in result.stderr
    assert "nothing was created or uploaded" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == "" and snapshot(run_dir) == before


def test_publish_without_a_token_says_how_to_log_in(run_dir: Path, tmp_path: Path) -> None:
    result = publish_in_subprocess(run_dir, f"http://127.0.0.1:{free_port()}", tmp_path, token=None)
    assert result.returncode == 2
    assert (
        "error: not logged in to the Hugging Face Hub; run `hf auth login` or set HF_TOKEN" in result.stderr
    )


class FakeHub(ThreadingHTTPServer):
    """The Hub endpoints used by `create_repo` and `upload_folder`, recording what the client sends."""

    def __init__(self, refuse_token: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.refuse_token = refuse_token
        self.requests: list[tuple[str, str]] = []
        self.created: dict | None = None
        self.files: dict[str, bytes] = {}
        self.commit_message = ""
        self.authorization = ""

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        hub, path = self.server, self.path.split("?")[0]
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        hub.requests.append(("POST", path))
        hub.authorization = self.headers.get("Authorization", "")
        if hub.refuse_token:
            return self.reply(401, {"error": "Invalid credentials in Authorization header"})
        if path == "/api/repos/create":
            hub.created = json.loads(body)
            return self.reply(200, {"url": f"{hub.endpoint}/alice/digits", "name": "alice/digits"})
        if path == "/api/validate-yaml":
            return self.reply(200, {"errors": [], "warnings": []})
        if path == "/api/models/alice/digits/preupload/main":
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return self.reply(200, {"files": modes})
        if path == "/api/models/alice/digits/commit/main":
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    hub.commit_message = item["value"]["summary"]
                elif item["key"] == "file":
                    hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            commit = f"{hub.endpoint}/alice/digits/commit/{'a' * 40}"
            return self.reply(200, {"commitUrl": commit, "commitOid": "a" * 40, "pullRequestUrl": None})
        return self.reply(404, {"error": f"no route {path}"})

    def do_GET(self) -> None:  # noqa: N802
        self.server.requests.append(("GET", self.path))
        self.reply(404, {"error": "not found"})

    def reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_hub(request: pytest.FixtureRequest) -> Iterator[FakeHub]:
    hub = FakeHub(refuse_token=getattr(request, "param", False))
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.shutdown()
        hub.server_close()


def test_publish_creates_the_repo_and_uploads_the_dry_run_folder_in_one_commit(
    run_dir: Path, tmp_path: Path, fake_hub: FakeHub
) -> None:
    dry = tmp_path / "dry"
    assert main([str(run_dir), "--repo-id", "alice/digits", "--output-dir", str(dry)]) == 0
    result = publish_in_subprocess(run_dir, fake_hub.endpoint, tmp_path, "--private")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{fake_hub.endpoint}/alice/digits"
    assert fake_hub.created == {"name": "digits", "organization": "alice", "visibility": "private"}
    assert fake_hub.authorization == "Bearer hf_test"
    assert [path for _, path in fake_hub.requests if "commit" in path] == [
        "/api/models/alice/digits/commit/main"
    ]
    assert fake_hub.files == {name: (dry / name).read_bytes() for name in EXPECTED_FILES}
    assert "Image Recognition Studio" in fake_hub.commit_message


@pytest.mark.parametrize("fake_hub", [True], indirect=True)
def test_publish_reports_a_refused_token(run_dir: Path, tmp_path: Path, fake_hub: FakeHub) -> None:
    result = publish_in_subprocess(run_dir, fake_hub.endpoint, tmp_path)
    assert result.returncode == 2
    assert "error: the Hugging Face Hub refused the upload" in result.stderr
    assert "write access" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert ("POST", "/api/repos/create") in fake_hub.requests
    assert not [path for _, path in fake_hub.requests if "preupload" in path or "commit" in path]


def populate_hub_cache(cache: Path, repo_id: str, files: Path) -> Path:
    """The layout huggingface_hub keeps for a downloaded repo: refs/main -> snapshots/<commit>/files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    snapshot_dir = storage / "snapshots" / commit
    shutil.copytree(files, snapshot_dir, ignore=shutil.ignore_patterns(".*"))
    return snapshot_dir


def test_hf_hub_checkpoint_loads_from_the_cache_offline(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dry = tmp_path / "dry"
    assert main([str(run_dir), "--repo-id", "alice/digits", "--output-dir", str(dry)]) == 0
    snapshot_dir = populate_hub_cache(tmp_path / "hub_cache", "alice/digits", dry)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    local, hub = load_run(run_dir), load_run("hf-hub:alice/digits")
    assert hub.run_dir == snapshot_dir and hub.labels == LABELS == local.labels
    assert hub.data_config == local.data_config
    batch = torch.stack([local.transform(photo(name)) for name in ("chelsea", "rocket")])
    timm_model = timm.create_model("hf-hub:alice/digits", pretrained=True).eval()
    with torch.no_grad():
        expected = local.model(batch)
        assert torch.allclose(hub.model(batch), expected, atol=1e-6)
        assert torch.allclose(timm_model(batch), expected, atol=1e-5)
    assert timm_model.pretrained_cfg["label_names"] == LABELS
