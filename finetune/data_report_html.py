"""`data_report.html`: the data report as one self-contained page for people, and the checks' titles and
meanings that every view of the report (this page, the model card, the app's data check) shows.

One file, thumbnails inline as PNG data URLs, no script and no external request (its Content-Security-Policy
forbids both), so it opens from a run folder, a zip or an e-mail. Every file and class name in it came from a
stranger's folder and goes through `safe_text.escape_html`. finetune/data_report.py builds the report and
writes this page beside the JSON.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from finetune.data_health import CHECKS
from finetune.errors import ImageError
from finetune.safe_text import escape_html, plain_line

THUMBNAIL_PX = 96
SHOWN_PER_CHECK = 40  # findings per check drawn in the HTML (all of them are in the JSON)
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


def render_html(report: dict[str, Any], json_file: str, issues_file: str) -> str:
    """The self-contained HTML page of `report`, which points to its `json_file` (every finding) and its
    `issues_file` (the files to leave out)."""
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
        sections.append(_section_html(check, findings, data_dir, json_file))
    subsets_head = "".join(f"<th>{s}</th>" for s in _subsets(report))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_POLICY}">
<title>Data report</title><style>{_CSS}</style></head><body>
<h1>Data report</h1>
<p class="meta">{report["num_files"]} images in {escape_html(data_dir.name)},
{len(report["classes"])} classes;
features from {escape_html(report["model"])} at {report["image_size"]} px; created {report["created"]}.
Nothing was moved or deleted. <code>{issues_file}</code> lists the {len(report["exclude"])} file(s) the
findings suggest leaving out: edit it, then train with <code>--exclude-issues {issues_file}</code>.</p>
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


def _section_html(check: str, findings: list[dict[str, Any]], data_dir: Path, json_file: str) -> str:
    shown = findings[:SHOWN_PER_CHECK]
    more = len(findings) - len(shown)
    cards = "".join(_finding_html(f, data_dir) for f in shown) or "<p class='ok'>Nothing found.</p>"
    tail = f"<p>{more} more in {json_file}.</p>" if more > 0 else ""
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
