"""RunStore: the app's folder of trained runs on disk: which exist, their downloads, and keeping it bounded.

Each run is a normal run folder (`finetune.checkpoint`) at `runs/<run_id>/`. The app cannot resume a run (its
uploaded dataset is gone once training ends), so the decoded-image cache and the resumable state are deleted
as soon as a run ends, and a run that died before its first checkpoint is garbage. Past `max_runs` runs or
`max_bytes` bytes, the oldest runs go. Callers pass the ids of runs in progress, which are never touched.
"""

from __future__ import annotations

import logging
import re
import shutil
import zipfile
from collections.abc import Collection
from pathlib import Path

from finetune.checkpoint import CONFIG_FILE, STATE_META_FILE, STATE_TENSORS_FILE, WEIGHTS_FILE, atomic_write
from finetune.errors import ConfigError
from finetune.split import SPLIT_FILE

logger = logging.getLogger(__name__)

CACHE_DIR = ".cache"
OWNER_FILE = "owner.txt"  # the owner key of the visitor who trained the run (`demo.lanes`)
# never in a download: machine-local state, the owner, and the split (server paths of a deleted upload)
NOT_EXPORTED = (CACHE_DIR, STATE_META_FILE, STATE_TENSORS_FILE, OWNER_FILE, SPLIT_FILE)


class RunStore:
    """The `runs/` folder: list finished runs oldest first, zip one, strip and prune them."""

    def __init__(self, runs_dir: Path, max_runs: int = 20, max_bytes: int = 5 * 1024**3) -> None:
        if max_runs < 1 or max_bytes < 1:
            raise ConfigError(
                f"keep at least 1 run and 1 byte (got max_runs={max_runs}, max_bytes={max_bytes})."
            )
        self.runs_dir = Path(runs_dir)
        self.max_runs = max_runs
        self.max_bytes = max_bytes
        self.runs_dir.mkdir(parents=True, exist_ok=True)

    def finished_runs(self, in_progress: Collection[str] = ()) -> list[Path]:
        """Run folders with a model and a config, oldest first (by when their config was last written)."""
        return [path for path in self._folders(in_progress) if has_model(path)]

    def zip_run(self, run_id: str, out_dir: Path, in_progress: Collection[str] = ()) -> Path:
        """`out_dir/<run_id>.zip` of a finished run, without its cache, state and owner; written once and
        reused while it is newer than the run's config (a download costs no disk or CPU after the first)."""
        run_dir = self.runs_dir / run_id
        if run_id in in_progress or not _is_plain_name(run_id) or not has_model(run_dir):
            raise ConfigError(f"no finished run '{run_id}'; train one first or pick one from the list.")
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / f"{run_id}.zip"
        if target.is_file() and target.stat().st_mtime >= _written_at(run_dir):
            return target

        def write(tmp: Path) -> None:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
                for path in sorted(run_dir.rglob("*")):
                    relative = path.relative_to(run_dir)
                    if path.is_symlink() or not path.is_file() or relative.parts[0] in NOT_EXPORTED:
                        continue
                    archive.write(path, f"{run_id}/{relative.as_posix()}")

        atomic_write(target, write)
        return target

    def prune(self, in_progress: Collection[str] = ()) -> list[str]:
        """Delete the oldest runs until at most `max_runs` remain within `max_bytes`; returns their ids."""
        runs = self._folders(in_progress)
        sizes = {path: _folder_bytes(path) for path in runs}
        total = sum(sizes.values())
        removed: list[str] = []
        for path in runs:  # oldest first
            if len(runs) - len(removed) <= self.max_runs and total <= self.max_bytes:
                break
            shutil.rmtree(path, ignore_errors=True)
            total -= sizes[path]
            removed.append(path.name)
            logger.info(
                "Pruned run %s to stay within %d runs and %d bytes.", path.name, self.max_runs, self.max_bytes
            )
        return removed

    def set_owner(self, run_id: str, owner: str) -> None:
        """Record who trained `run_id`, so the run stays theirs after a restart."""
        (self.runs_dir / run_id / OWNER_FILE).write_text(owner, encoding="utf-8")

    def owner(self, run_id: str) -> str | None:
        """The owner key recorded for `run_id`, or None (a run the operator put there, or an older one)."""
        path = self.runs_dir / run_id / OWNER_FILE
        if not _is_plain_name(run_id) or not path.is_file():
            return None
        return path.read_text(encoding="utf-8").strip() or None

    def finish(self, run_id: str, keep: bool) -> None:
        """A run ended: keep its model and reports only, or remove it entirely."""
        run_dir = self.runs_dir / run_id
        if keep:
            _strip(run_dir)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)

    def clean_leftovers(self) -> None:
        """After a crash or a restart: strip every run, remove those that never saved a checkpoint."""
        for path in self._folders():
            self.finish(path.name, keep=has_model(path))

    def _folders(self, in_progress: Collection[str] = ()) -> list[Path]:
        folders = [
            path
            for path in self.runs_dir.iterdir()
            if path.is_dir() and not path.is_symlink() and path.name not in in_progress
        ]
        return sorted(folders, key=lambda path: (_written_at(path), path.name))


def has_model(run_dir: Path) -> bool:
    """True when `run_dir` holds weights and a config (a run `load_run` can try)."""
    return (run_dir / CONFIG_FILE).is_file() and (run_dir / WEIGHTS_FILE).is_file()


def _strip(run_dir: Path) -> None:
    shutil.rmtree(run_dir / CACHE_DIR, ignore_errors=True)
    for name in (STATE_META_FILE, STATE_TENSORS_FILE):
        (run_dir / name).unlink(missing_ok=True)


def _written_at(run_dir: Path) -> float:
    config = run_dir / CONFIG_FILE
    return (config if config.is_file() else run_dir).stat().st_mtime


def _folder_bytes(path: Path) -> int:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file() and not item.is_symlink())


def _is_plain_name(run_id: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", run_id)) and ".." not in run_id
