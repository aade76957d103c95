"""The data report: `data_report.json` for scripts, `data_report.html` for people, `data_issues.txt` to edit.

The HTML page is drawn by finetune/data_report_html.py (one self-contained file, every name escaped).
`data_issues.txt` lists the files the findings suggest leaving out
(one relative path a line, a tab, then why); `python -m finetune --exclude-issues FILE` reads it or the
JSON, after the user deleted the lines they disagree with. Nothing here moves or deletes a dataset file.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.checkpoint import atomic_write, write_json
from finetune.data_health import CHECKS, HealthReport
from finetune.data_report_html import THUMBNAIL_PX, TITLES, render_html
from finetune.errors import ConfigError, ImageError
from finetune.safe_text import plain_line

REPORT_JSON = "data_report.json"
REPORT_HTML = "data_report.html"
ISSUES_FILE = "data_issues.txt"
TOP_LOSSES_PNG = "top_losses.png"
LOCAL_FILES = (REPORT_JSON, REPORT_HTML, ISSUES_FILE, TOP_LOSSES_PNG)  # never published: they show the data
SCHEMA_VERSION = 1
TOP_LOSSES = 24


def build_report(
    health: HealthReport, data_dir: Path, model: str, image_size: int, classes: Sequence[str]
) -> dict[str, Any]:
    """The JSON document (schema `SCHEMA_VERSION`) for a health report."""
    return {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data_dir": str(data_dir),
        "model": model,
        "image_size": int(image_size),
        "classes": list(classes),
        "num_files": health.num_files,
        "class_counts": health.class_counts,
        "counts": health.counts(),
        "kinds": _kind_counts(health),
        "exclude": health.excluded_paths(),
        "findings": [finding.to_dict() for finding in health.findings],
        "timings_s": health.timings_s,
        "after_training": None,
    }


def write_report(out_dir: Path, report: dict[str, Any]) -> Path:
    """data_report.json, data_report.html and data_issues.txt in `out_dir`; returns the HTML's path."""
    out_dir = Path(out_dir)
    write_json(out_dir / REPORT_JSON, report)
    lines = ["# Files the data report suggests leaving out of training (python -m finetune --exclude-issues "
             "THIS_FILE). Delete the lines you disagree with; a line is PATH<TAB># why.\n"]  # fmt: skip
    reasons = _exclusion_reasons(report)
    lines += [f"{path}\t# {reasons[path]}\n" for path in report["exclude"]]
    atomic_write(out_dir / ISSUES_FILE, lambda tmp: tmp.write_text("".join(lines), encoding="utf-8"))
    html = render_html(report, REPORT_JSON, ISSUES_FILE)
    atomic_write(out_dir / REPORT_HTML, lambda tmp: tmp.write_text(html, encoding="utf-8"))
    return out_dir / REPORT_HTML


def read_report(run_dir: Path) -> dict[str, Any] | None:
    """A run's data_report.json, or None when it has none (older runs, strategies without a probe)."""
    import json

    path = Path(run_dir) / REPORT_JSON
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return report if isinstance(report, dict) and report.get("schema_version") == SCHEMA_VERSION else None


def read_exclusions(path: Path) -> set[str]:
    """Relative paths to leave out, from a data_report.json ("exclude") or a list file (one a line)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"--exclude-issues file '{path}' does not exist; pass the data_report.json or data_issues.txt "
            "that python -m finetune.inspect (or a training) wrote."
        )
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json":
        try:
            exclude = json.loads(text)["exclude"]
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"'{path}' is not a data report ({error}); pass data_report.json.") from error
        return {str(item) for item in exclude}
    paths = (line.split("\t", 1)[0].strip() for line in text.splitlines())
    return {p for p in paths if p and not p.startswith("#")}


def summary_line(report: dict[str, Any], html_path: Path | None = None) -> str:
    """'Data check: 2 exact duplicates (1 leakage), 5 likely label issues, ...; report: PATH'."""
    counts, kinds = report["counts"], report.get("kinds", {})
    parts = []
    for check in CHECKS:
        if counts.get(check):
            extra = ", ".join(
                f"{n} {kind}" for kind, n in kinds.get(check, {}).items() if kind != "within_class"
            )
            parts.append(f"{counts[check]} {TITLES[check].lower()}" + (f" ({extra})" if extra else ""))
    found = "; ".join(parts) if parts else "no issue found"
    where = f"; report: {html_path}" if html_path else ""
    return f"Data check of {report['num_files']} images: {found}{where}"


def add_training_results(
    report: dict[str, Any],
    paths: Sequence[str],
    subsets: Sequence[str],
    targets: np.ndarray,
    probabilities: np.ndarray,
    classes: Sequence[str],
) -> dict[str, Any]:
    """The model's worst validation mistakes (top losses) and most-confused class pairs, into `report`."""
    targets = np.asarray(targets, dtype=np.int64)
    picked = probabilities[np.arange(len(targets)), targets]
    losses = -np.log(np.clip(picked, 1e-12, 1.0))
    predictions = probabilities.argmax(axis=1)
    worst = [i for i in np.argsort(-losses) if predictions[i] != targets[i]][:TOP_LOSSES]
    top_losses = [
        {
            "path": paths[i],
            "subset": subsets[i],
            "label": classes[targets[i]],
            "predicted": classes[predictions[i]],
            "confidence": round(float(probabilities[i].max()), 4),
            "loss": round(float(losses[i]), 4),
        }  # fmt: skip
        for i in worst
    ]
    pairs: dict[tuple[int, int], int] = {}
    for target, prediction in zip(targets.tolist(), predictions.tolist(), strict=True):
        if target != prediction:
            pairs[(target, prediction)] = pairs.get((target, prediction), 0) + 1
    confused = sorted(pairs.items(), key=lambda item: -item[1])[:10]
    report["after_training"] = {
        "num_images": len(targets),
        "top_losses": top_losses,
        "most_confused": [
            {"true": classes[t], "predicted": classes[p], "count": n} for (t, p), n in confused
        ],
    }
    return report


def _kind_counts(health: HealthReport) -> dict[str, dict[str, int]]:
    kinds: dict[str, dict[str, int]] = {}
    for finding in health.findings:
        if finding.kind:
            per_check = kinds.setdefault(finding.check, {})
            per_check[finding.kind] = per_check.get(finding.kind, 0) + 1
    return kinds


def _exclusion_reasons(report: dict[str, Any]) -> dict[str, str]:
    reasons: dict[str, str] = {}
    for finding in report["findings"]:
        why = finding["check"].replace("_", " ") + (f" ({finding['kind']})" if finding.get("kind") else "")
        if finding.get("suggested_class"):
            why += f", suggested class {plain_line(finding['suggested_class'], 60)}"
        for path in finding["exclude"]:
            reasons.setdefault(path, why)
    return reasons


def card_section(run_dir: Path, for_hub: bool = False) -> str:
    """The model card's "Data check" section (Markdown, every name escaped), or "" without a report.

    `for_hub`: the published card keeps the counts and the most-confused class pairs, but no file name or
    training image (the report files are not uploaded: `LOCAL_FILES`).
    """
    from finetune.safe_text import escape_markdown, markdown_code

    report = read_report(run_dir)
    if report is None:
        return ""
    counts = report["counts"]
    rows = "".join(f"| {TITLES[check]} | {counts.get(check, 0)} |\n" for check in CHECKS)
    where = (
        "the full report stays in the local run folder"
        if for_hub
        else f"the full report with thumbnails is [{REPORT_HTML}]({REPORT_HTML})"
    )
    lines = [
        "## Data check\n\nRun on the training data before training (frozen-backbone features, file hashes "
        f"and sizes); {where}.\n\n| Check | Findings |\n|---|---|\n{rows}"
    ]
    after = report.get("after_training")
    if after and after["top_losses"] and not for_hub:
        losses = "".join(
            f"| {markdown_code(row['path'])} | {escape_markdown(row['label'], 60)} | "
            f"{escape_markdown(row['predicted'], 60)} | {row['confidence']:.0%} |\n"
            for row in after["top_losses"][:10]
        )
        gallery = f"![Top losses]({TOP_LOSSES_PNG})\n\n" if (Path(run_dir) / TOP_LOSSES_PNG).is_file() else ""
        lines.append(
            f"### Top losses\n\nThe validation images the kept model got most wrong.\n\n{gallery}"
            f"| File | True class | Predicted | Confidence |\n|---|---|---|---|\n{losses}"
        )
    if after and after["most_confused"]:
        pairs = "".join(
            f"| {escape_markdown(p['true'], 60)} | {escape_markdown(p['predicted'], 60)} | {p['count']} |\n"
            for p in after["most_confused"]
        )
        lines.append(
            f"### Most confused pairs\n\n| True class | Predicted as | Images |\n|---|---|---|\n{pairs}"
        )
    return "\n\n".join(line.rstrip() for line in lines)


def write_top_losses_png(run_dir: Path, report: dict[str, Any], columns: int = 6) -> Path | None:
    """A gallery image of the top losses (thumbnail, true -> predicted, confidence) for the model card."""
    from PIL import Image, ImageDraw

    from finetune.images import open_image

    rows_ = (report.get("after_training") or {}).get("top_losses", [])[:18]
    if not rows_:
        return None
    cell_w, cell_h = THUMBNAIL_PX + 24, THUMBNAIL_PX + 30
    count_rows = -(-len(rows_) // columns)
    sheet = Image.new("RGB", (cell_w * min(columns, len(rows_)), cell_h * count_rows), "white")
    draw = ImageDraw.Draw(sheet)
    for n, row in enumerate(rows_):
        x, y = (n % columns) * cell_w + 12, (n // columns) * cell_h + 4
        try:
            image = open_image(Path(report["data_dir"]) / row["path"])
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            sheet.paste(image, (x, y))
        except (ImageError, OSError):
            draw.rectangle((x, y, x + THUMBNAIL_PX, y + THUMBNAIL_PX), fill="#eee")
        text = f"{plain_line(row['label'], 8)}>{plain_line(row['predicted'], 8)} {row['confidence']:.0%}"
        draw.text((x - 8, y + THUMBNAIL_PX + 4), text, fill="black")
    path = Path(run_dir) / TOP_LOSSES_PNG
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return path
