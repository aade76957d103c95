"""The data report: `data_report.json` for scripts, `data_report.html` for people, `data_issues.txt` to edit.

The HTML is one self-contained file (thumbnails inline as PNG data URLs, no script, no external request), so
it opens from a run folder, a zip or an e-mail. Every file and class name in it came from a stranger's folder
and goes through `safe_text.escape_html`. `data_issues.txt` lists the files the findings suggest leaving out
(one relative path a line, a tab, then why); `python -m finetune --exclude-issues FILE` reads it or the
JSON, after the user deleted the lines they disagree with. Nothing here moves or deletes a dataset file.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.checkpoint import atomic_write, write_json
from finetune.data_health import CHECKS, HealthReport
from finetune.errors import ConfigError, ImageError
from finetune.safe_text import escape_html, plain_line

REPORT_JSON = "data_report.json"
REPORT_HTML = "data_report.html"
ISSUES_FILE = "data_issues.txt"
TOP_LOSSES_PNG = "top_losses.png"
LOCAL_FILES = (REPORT_JSON, REPORT_HTML, ISSUES_FILE, TOP_LOSSES_PNG)  # never published: they show the data
SCHEMA_VERSION = 1
THUMBNAIL_PX = 96
SHOWN_PER_CHECK = 40  # findings per check drawn in the HTML (all of them are in the JSON)
TOP_LOSSES = 24
TITLES = {
    "exact_duplicate": "Exact duplicates",
    "near_duplicate": "Near duplicates",
    "label_issue": "Likely label issues",
    "outlier": "Outliers",
    "tiny_image": "Tiny images",
    "extreme_aspect": "Extreme aspect ratios",
    "class_imbalance": "Class imbalance",
}
MEANINGS = {
    "exact_duplicate": "The same bytes more than once. Across train and val/test (leakage) they inflate the "
    "validation score; under two classes (conflict) one label is wrong.",
    "near_duplicate": "Resized or re-encoded copies: neighbours in the backbone's feature space whose "
    "decoded pixels match; leakage and conflicts as above.",
    "label_issue": "Images whose class disagrees with what models that never saw them predict (a k-fold "
    "probe and a k-NN vote), ranked by cleanlab's confident learning; the suggested class is theirs.",
    "outlier": "Images far from every class in feature space: screenshots, blank frames, another subject.",
    "tiny_image": "Images much smaller than the rest: upscaling cannot add the detail they lack.",
    "extreme_aspect": "Very wide or tall images: the centre crop drops most of them.",
    "class_imbalance": "Classes of very different sizes: training weights the loss, but small classes stay "
    "weaker; add images to them.",
}


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
    html = render_html(report)
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


def render_html(report: dict[str, Any]) -> str:
    """The self-contained HTML page of `report`."""
    data_dir = Path(report["data_dir"])
    counts = report["counts"]
    rows = "".join(
        f"<tr><td><a href='#{check}'>{TITLES[check]}</a></td><td>{counts.get(check, 0)}</td>"
        f"<td>{escape_html(MEANINGS[check])}</td></tr>"
        for check in CHECKS
    )
    class_rows = "".join(
        f"<tr><td>{escape_html(name)}</td>"
        + "".join(f"<td>{report['class_counts'].get(s, {}).get(name, 0)}</td>" for s in _subsets(report))
        + "</tr>"
        for name in report["classes"]
    )
    sections = [_after_training_html(report, data_dir)] if report.get("after_training") else []
    for check in CHECKS:
        findings = [f for f in report["findings"] if f["check"] == check]
        sections.append(_section_html(check, findings, data_dir))
    subsets_head = "".join(f"<th>{s}</th>" for s in _subsets(report))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_POLICY}">
<title>Data report</title><style>{_CSS}</style></head><body>
<h1>Data report</h1>
<p class="meta">{report["num_files"]} images in {escape_html(data_dir.name)},
{len(report["classes"])} classes;
features from {escape_html(report["model"])} at {report["image_size"]} px; created {report["created"]}.
Nothing was moved or deleted. <code>{ISSUES_FILE}</code> lists the {len(report["exclude"])} file(s) the
findings suggest leaving out: edit it, then train with <code>--exclude-issues {ISSUES_FILE}</code>.</p>
<table class="summary"><tr><th>Check</th><th>Findings</th><th>What it means</th></tr>{rows}</table>
<details><summary>Images per class</summary><table><tr><th>class</th>{subsets_head}</tr>{class_rows}</table>
</details>
{"".join(sections)}
</body></html>
"""


def thumbnail_data_url(path: Path, size: int = THUMBNAIL_PX) -> str | None:
    """A small PNG of the image as a data: URL (None when it cannot be read any more)."""
    from finetune.images import open_image

    try:
        image = open_image(path, draft_size=(size * 2, size * 2))
    except (ImageError, OSError):
        return None
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _section_html(check: str, findings: list[dict[str, Any]], data_dir: Path) -> str:
    shown = findings[:SHOWN_PER_CHECK]
    more = len(findings) - len(shown)
    cards = "".join(_finding_html(f, data_dir) for f in shown) or "<p class='ok'>Nothing found.</p>"
    tail = f"<p>{more} more in {REPORT_JSON}.</p>" if more > 0 else ""
    return (
        f"<section id='{check}'><h2>{TITLES[check]} ({len(findings)})</h2>"
        f"<p class='meaning'>{escape_html(MEANINGS[check])}</p>"
        f"<div class='cards'>{cards}</div>{tail}</section>"
    )


def _finding_html(finding: dict[str, Any], data_dir: Path) -> str:
    kind = f"<span class='kind {finding['kind']}'>{finding['kind'].replace('_', ' ')}</span>" if finding.get(
        "kind") else ""  # fmt: skip
    suggested = (
        f"<div>suggested class: <b>{escape_html(finding['suggested_class'])}</b></div>"
        if finding.get("suggested_class")
        else ""
    )
    figures = "".join(
        _figure_html(data_dir, f["path"], f"{f['label']} · {f['subset']}", f["path"] in finding["exclude"])
        for f in finding["files"]
    )
    return (
        f"<div class='card'>{kind}<div class='files'>{figures}</div>"
        f"<div>score {finding['score']:.3f}</div>{suggested}"
        f"<div class='detail'>{escape_html(plain_line(finding['detail'], 300))}</div></div>"
    )


def _figure_html(data_dir: Path, path: str, caption: str, excluded: bool = False) -> str:
    url = thumbnail_data_url(data_dir / path)
    image = f"<img src='{url}' alt='{escape_html(path)}'>" if url else "<div class='missing'>unreadable</div>"
    mark = " class='excluded' title='suggested to leave out'" if excluded else ""
    return (
        f"<figure{mark}>{image}<figcaption title='{escape_html(path)}'>{escape_html(plain_line(path, 60))}"
        f"<br>{escape_html(plain_line(caption, 60))}</figcaption></figure>"
    )


def _after_training_html(report: dict[str, Any], data_dir: Path) -> str:
    after = report["after_training"]
    cards = (
        "".join(
            "<div class='card'>"
            + _figure_html(data_dir, row["path"], f"{row['label']} → {row['predicted']}")
            + f"<div>true <b>{escape_html(row['label'])}</b>, "
            f"predicted <b>{escape_html(row['predicted'])}</b> "
            f"({row['confidence']:.0%})</div><div>loss {row['loss']:.2f}</div></div>"
            for row in after["top_losses"]
        )
        or "<p class='ok'>No validation mistake.</p>"
    )
    pairs = "".join(
        f"<tr><td>{escape_html(p['true'])}</td><td>{escape_html(p['predicted'])}</td><td>{p['count']}</td></tr>"
        for p in after["most_confused"]
    )
    table = (
        f"<table><tr><th>true class</th><th>predicted as</th><th>images</th></tr>{pairs}</table>"
        if pairs
        else ""
    )
    return (
        f"<section id='after_training'><h2>After training: top losses ({len(after['top_losses'])} of "
        f"{after['num_images']} validation images)</h2><p class='meaning'>The validation images the kept "
        "model got most wrong, with their true and predicted class; often a label issue or a hard case."
        f"</p><div class='cards'>{cards}</div><h3>Most confused pairs</h3>{table}</section>"
    )


def _subsets(report: dict[str, Any]) -> list[str]:
    return [s for s in ("train", "val", "test") if s in report["class_counts"]]


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


_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"  # no script, no request
_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
h1{margin-bottom:.2em} .meta,.meaning{color:#555} table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
.cards{display:flex;flex-wrap:wrap;gap:.6em} .card{border:1px solid #ccc;border-radius:6px;padding:.5em;
font-size:.85em;max-width:360px} .files{display:flex;gap:.4em} figure{margin:0;text-align:center}
figure img{width:96px;height:96px;object-fit:contain;background:#f4f4f4;border-radius:4px}
figure.excluded img{outline:3px solid #d33} figcaption{font-size:.8em;max-width:110px;overflow-wrap:anywhere}
.kind{display:inline-block;padding:0 .4em;border-radius:3px;background:#eee;margin-bottom:.3em}
.kind.leakage{background:#fdd} .kind.conflict{background:#ffe3b3} .ok{color:#3a3}
.detail{color:#555} .missing{width:96px;height:96px;background:#eee}
"""


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
