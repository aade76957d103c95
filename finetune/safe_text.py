"""Text a visitor controls (class names, file names, error details) made safe where it meets markup or a CSV.

A class name comes from a folder in a stranger's zip, so it is data, never markup: `<a href=…>`, `<form>`,
`<img src=…>`, `<style>` or `![x](http://…)` must show as those characters, not become a link, a form, a
tracking image or a blank page. Gradio's sanitizer only removes scripts, so escaping is ours to do, here, in
one place, for the three places such text lands:

- `escape_markdown` for Markdown (gr.Markdown, the Hub model card): HTML's special characters become
  entities and Markdown's syntax characters get CommonMark's backslash escape, so no emphasis, link, image,
  table pipe, heading, LaTeX `$` or autolink (`http\\://`, `a\\@b`, `www\\.`) can start inside a name; the
  rest (`/ . , ; ?`) stays as typed so the Markdown source still reads well.
- `escape_html` for HTML (gr.HTML, and the error modal, which Gradio renders as sanitized HTML).
- `markdown_code` for an inline code span (the content of a code span is shown literally; only the
  backtick and a table's pipe need care).

`csv_safe_cell` neutralises spreadsheet formulas the way OWASP recommends ("CSV Injection"): a text cell
that starts with `=`, `+`, `-`, `@`, a tab or a carriage return gets a leading `'`, which spreadsheets show
as text. Numbers stay numbers. Every CSV the project writes passes its cells through it.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet may read as the start of a formula
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}
# Markdown syntax a name could start: emphasis, code, links and images, tables, headings and lists, LaTeX
# (`$`), and autolinks (`http:`, `user@host`); CommonMark lets a backslash escape any ASCII punctuation.
_MARKDOWN_SYNTAX = "\\`*_{}[]()#+-=!|~$:@"
_MARKDOWN = {char: "\\" + char for char in _MARKDOWN_SYNTAX} | _ENTITIES
_WWW = re.compile(r"(?i)\b(www)\.")  # GFM links a bare "www.host" too
_SPACES = re.compile(r"\s+")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def plain_line(text: Any, max_chars: int | None = None) -> str:
    """`text` as one line: whitespace runs (newlines, tabs) folded to a space, other invisible characters
    (controls, bidi overrides) shown as U+FFFD, optionally cut to `max_chars` with an ellipsis."""
    line = _SPACES.sub(" ", str(text))
    line = "".join(char if char.isprintable() else "\ufffd" for char in line)
    if max_chars is not None and len(line) > max_chars:
        line = line[: max(max_chars - 1, 0)] + "…"
    return line


def escape_markdown(text: Any, max_chars: int | None = None) -> str:
    """`text` as literal characters in Markdown: no formatting, link, image, HTML, table cell or newline."""
    escaped = "".join(_MARKDOWN.get(char, char) for char in plain_line(text, max_chars))
    return _WWW.sub(r"\1\\.", escaped)


def escape_html(text: Any, *, quote: bool = True) -> str:
    """`text` as literal characters in HTML (element content, or an attribute value when `quote`)."""
    return html.escape(str(text), quote=quote)


def markdown_code(text: Any) -> str:
    """An inline code span of `text` on one line; backticks become `'`, pipes are escaped for GFM tables."""
    return "`" + plain_line(text).replace("`", "'").replace("|", "\\|") + "`"


def csv_safe_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: a string starting like a formula gets a leading `'`.

    Numbers (and strings that are plain numbers, such as "-0.5") are left alone: a spreadsheet reads them
    as numbers, never as formulas, and a negative confidence must stay a number.
    """
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_safe_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """`csv_safe_cell` on every value of a `csv.DictWriter` row."""
    return {key: csv_safe_cell(value) for key, value in row.items()}
