"""`python -m finetune.publish RUN_DIR --repo-id USER/NAME`: share a run folder on the Hugging Face Hub.

The upload is the run folder as it is (it already is a timm folder: `model.safetensors` + `config.json`),
plus its metrics, report and plots, plus a model card generated for the Hub repository; the resumable
training state and hidden files stay home. `--dry-run` writes that exact folder locally instead (default
`RUN_DIR-hub` next to the run), so the card can be read before anything leaves the machine. Uploading uses
huggingface_hub (`HfApi.create_repo` + `upload_folder`) with the usual token (`HF_TOKEN` or `hf auth login`).
Offline, or without a token, it stops before creating anything, with a message that says what to do.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from finetune.checkpoint import HUB_FILES, HUB_PREFIX, STATE_META_FILE, load_run
from finetune.data_report import LOCAL_FILES as DATA_REPORT_FILES
from finetune.errors import ConfigError, StudioError
from finetune.model_card import CARD_FILE, is_repo_id, write_model_card
from finetune.split import SPLIT_FILE

logger = logging.getLogger(__name__)

DRY_RUN_SUFFIX = "-hub"
DRY_RUN_MARKER = ".hub-upload"  # marks a folder we wrote (a dry run's), so a later dry run may replace it
# Files of a run folder that never go to the Hub: resumable state (optimizer moments: large, private to
# training), the local card, which is rewritten for the repository, and the split (the local dataset's paths).
# the data report shows training images and file names: it stays local (the card keeps its counts)
EXCLUDED_FILES = (STATE_META_FILE, CARD_FILE, SPLIT_FILE, *DATA_REPORT_FILES)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune.publish",
        description="Upload a run folder to the Hugging Face Hub as a timm model, with a model card.",
    )
    parser.add_argument("run_dir", type=Path, help="run folder written by `python -m finetune`")
    hub = parser.add_argument_group("Hub repository")
    hub.add_argument("--repo-id", required=True, help="USER/NAME (or ORG/NAME) of the model repository")
    hub.add_argument(
        "--private", action="store_true", help="create the repository as private (default: public)"
    )
    hub.add_argument(
        "--license", dest="license_id", default=None,
        help="Hub license id for the card (default: the base model's license from config.json, else 'other')",
    )  # fmt: skip
    hub.add_argument("--commit-message", default=None, help="default: 'Upload a model fine-tuned with ...'")
    local = parser.add_argument_group("Checking before uploading")
    local.add_argument(
        "--dry-run", action="store_true",
        help=f"write the folder that would be uploaded, then stop; nothing goes online "
        f"(default folder: RUN_DIR{DRY_RUN_SUFFIX} next to the run)",
    )  # fmt: skip
    local.add_argument(
        "--output-dir", type=Path, default=None, help="folder for --dry-run (implies --dry-run)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("finetune").setLevel(logging.INFO)  # our progress lines, not every HTTP request
    try:
        if args.dry_run or args.output_dir is not None:
            folder = args.output_dir or default_dry_run_dir(args.run_dir)
            written = write_upload_folder(args.run_dir, args.repo_id, folder, args.license_id)
            logger.info("Dry run: %d files in %s; read %s, then run again without --dry-run.",
                        len(written), folder, folder / CARD_FILE)  # fmt: skip
            print(folder)
        else:
            print(publish(args.run_dir, args.repo_id, args.private, args.license_id, args.commit_message))
    except StudioError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def publish(
    run_dir: Path,
    repo_id: str,
    private: bool = False,
    license_id: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload the run to `repo_id` (created when missing) in one commit and return the repository URL."""
    check_repo_id(repo_id)
    check_hub_reachable_settings()
    from huggingface_hub import HfApi, get_token

    if get_token() is None:
        raise StudioError(
            "not logged in to the Hugging Face Hub; run `hf auth login` or set HF_TOKEN to a token with "
            "write access (https://huggingface.co/settings/tokens). Nothing was uploaded."
        )
    api = HfApi()
    with tempfile.TemporaryDirectory(prefix="hub-upload-") as staging:
        folder = Path(staging) / "upload"
        files = write_upload_folder(run_dir, repo_id, folder, license_id)
        logger.info("Uploading %d files to %s ...", len(files), repo_id)
        with _hub_errors(repo_id, is_repo_created=False):
            url = api.create_repo(repo_id, private=private, exist_ok=True)
        with _hub_errors(repo_id, is_repo_created=True):
            api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                ignore_patterns=[DRY_RUN_MARKER],
                commit_message=commit_message or "Upload a model fine-tuned with Image Recognition Studio",
            )
    logger.info("Published %s to %s", run_dir, url)
    return str(url)


def write_upload_folder(
    run_dir: Path, repo_id: str, folder: Path, license_id: str | None = None
) -> list[Path]:
    """Write what would be uploaded (run files + a card for `repo_id`) into `folder`; return the paths.

    The run must load (`load_run`) first, so a damaged run is never published.
    """
    check_repo_id(repo_id)
    if str(run_dir).startswith(HUB_PREFIX):
        raise ConfigError(f"'{run_dir}' is already on the Hub; publish takes a local run folder.")
    load_run(run_dir)
    folder = Path(folder)
    prepare_upload_folder(folder, run_dir)
    for path in upload_files(run_dir):
        shutil.copy2(path, folder / path.name)
    write_model_card(run_dir, repo_id=repo_id, license_id=license_id, output_dir=folder)
    return sorted(path for path in folder.iterdir() if not path.name.startswith("."))


def upload_files(run_dir: Path) -> list[Path]:
    """The run's files for the Hub: those `load_run` fetches back (HUB_FILES), minus state and local card."""
    return sorted(
        path
        for path in Path(run_dir).iterdir()
        if path.is_file()
        and not path.name.startswith(".")
        and path.name not in EXCLUDED_FILES
        and not path.name.startswith("train_state.")
        and any(fnmatch.fnmatch(path.name, pattern) for pattern in HUB_FILES)
    )


def default_dry_run_dir(run_dir: Path) -> Path:
    """`runs/flowers` -> `runs/flowers-hub`: beside the run, never inside it (it would look like a run)."""
    run_dir = Path(run_dir)
    return run_dir.parent / f"{run_dir.resolve().name}{DRY_RUN_SUFFIX}"


def check_repo_id(repo_id: str) -> None:
    """USER/NAME, with the namespace: the card's loading examples need the full id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ConfigError(f"invalid --repo-id '{repo_id}': {error}") from error
    if not is_repo_id(repo_id):
        raise ConfigError(
            f"invalid --repo-id '{repo_id}'; use USER/NAME, such as 'alice/flowers-classifier'."
        )


def check_hub_reachable_settings() -> None:
    """Stop before any request when huggingface_hub is told to stay offline (HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "")
    if constants.HF_HUB_OFFLINE or flag.upper() in ("1", "ON", "YES", "TRUE"):
        raise StudioError(
            "cannot publish while offline (HF_HUB_OFFLINE is set); unset HF_HUB_OFFLINE and check the "
            "connection, or use --dry-run to write the upload folder locally. Nothing was uploaded."
        )


@contextmanager
def _hub_errors(repo_id: str, is_repo_created: bool) -> Iterator[None]:
    """Turn Hub refusals and network failures into a `StudioError` saying what happened and what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    state = (
        f"the repository {repo_id} exists but the upload did not finish; run the command again"
        if is_repo_created
        else "nothing was created or uploaded"
    )
    try:
        yield
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        hint = " (use a token with write access to this namespace)" if status in (401, 403) else ""
        message = str(error).splitlines()[0]
        raise StudioError(f"the Hugging Face Hub refused the upload: {message}{hint}; {state}.") from error
    except Exception as error:
        if not _is_connection_error(error):
            raise
        raise StudioError(
            f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({type(error).__name__}: {error}); "
            f"check the connection or proxy, or use --dry-run to write the folder locally; {state}."
        ) from error


def _is_connection_error(error: BaseException) -> bool:
    """huggingface_hub has used requests, httpx and httpx2 over its versions, so a connection failure is
    recognised as an OSError (requests, offline mode) or an HTTP client's TransportError (httpx, httpx2)."""
    return isinstance(error, OSError) or any(cls.__name__ == "TransportError" for cls in type(error).__mro__)


def prepare_upload_folder(folder: Path, run_dir: Path) -> None:
    """An empty folder outside the run, marked as ours; only a folder we wrote before is ever replaced."""
    resolved, run = Path(folder).resolve(), Path(run_dir).resolve()
    if resolved == run or resolved in run.parents or run in resolved.parents:
        raise ConfigError(
            f"the upload folder '{folder}' must not be the run folder '{run_dir}', lie in it or hold it."
        )
    if folder.exists() and any(folder.iterdir()):
        if not (folder / DRY_RUN_MARKER).is_file():
            raise ConfigError(
                f"'{folder}' exists and was not written by --dry-run; remove it or pass another --output-dir."
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DRY_RUN_MARKER).write_text("written by python -m finetune.publish --dry-run; safe to delete\n")


if __name__ == "__main__":
    raise SystemExit(main())
