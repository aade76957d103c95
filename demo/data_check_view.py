"""The Train tab's data findings: counts and a gallery of the top findings once the checks ran, and the
top-losses gallery once the run ended, read from the run's data_report.json (finetune/data_report.py).

Every file and class name came from a visitor's zip: it is escaped (safe_text.escape_html), and thumbnails
are inline PNG data URLs, so the panel never names a server path or fetches anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.data_health import CHECKS
from finetune.data_report import read_report
from finetune.data_report_html import TITLES, thumbnail_data_url
from finetune.safe_text import escape_html, plain_line

GALLERY_SIZE = 12  # thumbnails per gallery
SHOWN_CHECKS = ("exact_duplicate", "near_duplicate", "label_issue", "outlier")  # ranked, with files
THUMB_PX = 72


def render_data_check(run_dir: Path | None) -> str:
    """The panel's HTML: '' until the checks wrote their report."""
    report = read_report(run_dir) if run_dir is not None else None
    if report is None:
        return ""
    data_dir = Path(report["data_dir"])
    counts = report["counts"]
    found = [f"{counts[c]} {TITLES[c].lower()}" for c in CHECKS if counts.get(c)]
    summary = "; ".join(found) if found else "no issue found"
    parts = [
        f"<div class='data-check'><p><b>Data check of {report['num_files']} images:</b> "
        f"{escape_html(summary)}. The run folder's data_report.html has every finding; nothing was moved "
        "or deleted.</p>"
    ]
    top = [f for f in report["findings"] if f["check"] in SHOWN_CHECKS]
    top.sort(key=lambda f: (SHOWN_CHECKS.index(f["check"]), -f["score"]))
    tiles = [
        _tile(data_dir, f["files"][-1]["path"], _finding_caption(f)) for f in _spread(top)[:GALLERY_SIZE]
    ]
    if tiles:
        parts.append(f"<div class='data-check-findings' style='{_ROW}'>{''.join(tiles)}</div>")
    after = report.get("after_training")
    if after and after["top_losses"]:
        losses = [
            _tile(
                data_dir,
                row["path"],
                f"true {row['label']}, predicted {row['predicted']} ({row['confidence']:.0%})",
            )  # fmt: skip
            for row in after["top_losses"][:GALLERY_SIZE]
        ]
        confused = ", ".join(
            f"{p['true']} → {p['predicted']} ({p['count']})" for p in after["most_confused"][:5]
        )
        parts.append(
            "<p><b>Top losses</b>: the validation images the model got most wrong."
            + (f" Most confused: {escape_html(confused)}." if confused else "")
            + f"</p><div class='data-check-losses' style='{_ROW}'>{''.join(losses)}</div>"
        )
    return "".join(parts) + "</div>"


def _spread(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The best few of each check, in turn, so one check with many findings does not fill the gallery."""
    by_check: dict[str, list[dict[str, Any]]] = {}
    for finding in findings:
        by_check.setdefault(finding["check"], []).append(finding)
    spread = []
    for rank in range(GALLERY_SIZE):
        spread += [group[rank] for group in by_check.values() if rank < len(group)]
    return spread


def _finding_caption(finding: dict[str, Any]) -> str:
    name = TITLES[finding["check"]].rstrip("s").lower()
    kind = f" ({finding['kind'].replace('_', ' ')})" if finding.get("kind") else ""
    suggested = f", looks like {finding['suggested_class']}" if finding.get("suggested_class") else ""
    return f"{name}{kind}: {finding['files'][-1]['label']}{suggested}"


def _tile(data_dir: Path, path: str, caption: str) -> str:
    url = thumbnail_data_url(data_dir / path, THUMB_PX)
    image = (
        f"<img src='{url}' alt='' style='width:{THUMB_PX}px;height:{THUMB_PX}px;object-fit:contain'>"
        if url
        else ""
    )
    return (
        f"<figure style='margin:0;width:{THUMB_PX + 40}px;font-size:11px;overflow-wrap:anywhere'>{image}"
        f"<figcaption>{escape_html(plain_line(caption, 80))}<br><span style='color:#666'>"
        f"{escape_html(plain_line(Path(path).name, 40))}</span></figcaption></figure>"
    )


_ROW = "display:flex;flex-wrap:wrap;gap:8px"
