"""The one check of class names, for folders on disk (the CLI's dataset scan), zips and typed names (the app).

A class name becomes a folder name, a label in every answer, a column of the model card and a cell of every
CSV, so a new dataset's names are held to rules that keep them plain words a person can tell apart:

- Characters: letters, combining marks, digits, spaces and `_ - . ( ) & + ' ,` only. Left out are markup
  and Markdown (`< > [ ] { } ! * # | $ %`), spreadsheet formulas (`= @`), quoting and shell characters
  (`" `` ; ~ ^ ?`), path parts (`/ \\ :`) and the characters Windows refuses in file names, so a run's zip
  unpacks everywhere. Escaping makes hostile names harmless in our own pages; this keeps them out of
  everyone else's tools too.
- Shape: at most `MAX_CLASS_NAME` characters, starting with a letter or digit (no leading dot, dash or
  space), no trailing space.
- Unicode: names with compatibility characters (fullwidth `ｃａｔ`, ligatures, superscripts, which NFKC
  folds into other letters) are refused rather than silently renamed, so a label is always exactly its
  folder's name. Canonical differences (macOS zips store `café` decomposed) are accepted: they render the
  same and duplicates are compared after NFKC.
- Scripts: letters of one script, or Latin with Chinese/Japanese/Korean (Unicode's "highly restrictive"
  profile, UTS #39), so a Cyrillic `а` inside a Latin `cat` cannot pose as it.
- Duplicates: names equal after NFKC, case folding and whitespace collapsing (`Cat`/`cat`) are refused.

Only new datasets are checked: runs trained before these rules load and serve as they are.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from finetune.errors import DatasetError

MAX_CLASS_NAME = 64  # characters; a label must fit a menu, a table cell and a folder name
ALLOWED_PUNCTUATION = " _-.()&+',"
EAST_ASIAN_SCRIPTS = {"CJK", "HIRAGANA", "KATAKANA", "HANGUL", "BOPOMOFO"}  # mix with each other, Latin
SHOWN_CHARS = 40  # how much of a refused name a message repeats
_SPACES = re.compile(r"\s+")


def class_name_problem(name: str) -> str:
    """Why `name` cannot be a new class name (the rule it breaks), or "" when it can."""
    if not isinstance(name, str) or not name:
        return "a class name cannot be empty"
    if len(name) > MAX_CLASS_NAME:
        return f"it has {len(name)} characters; use at most {MAX_CLASS_NAME}"
    if name != name.strip():
        return "it starts or ends with a space"
    if not (name[0].isalpha() or name[0].isdigit()):
        return "it must start with a letter or a digit"
    bad = sorted({char for char in name if not _is_allowed(char)})
    if bad:
        shown = " ".join(repr(char) for char in bad[:5])
        return f"it contains {shown}; use letters, digits, spaces and {ALLOWED_PUNCTUATION.strip()} only"
    if unicodedata.normalize("NFKC", name) != unicodedata.normalize("NFC", name):
        return (
            "it contains compatibility characters (fullwidth letters, ligatures, superscripts); "
            f"type it as {unicodedata.normalize('NFKC', name)!r}"
        )
    scripts = _scripts(name)
    others = scripts - EAST_ASIAN_SCRIPTS - {"LATIN"}
    if len(others) > 1 or (others and len(scripts) > len(others)):
        mixed = ", ".join(sorted(scripts)).lower()
        return f"it mixes letters of different scripts ({mixed}), so it can pose as another name"
    return ""


def check_class_names(names: Sequence[str], where: str = "") -> None:
    """Refuse the first name that breaks a rule, or two names that differ only in case or spacing.

    `where` says where the names came from in the message ("in the zip", "in '/data/pets'").
    """
    place = f" {where}" if where else ""
    seen: dict[str, str] = {}
    for name in names:
        problem = class_name_problem(name)
        if problem:
            raise DatasetError(f"class name {shown_name(name)}{place} is refused: {problem}.")
        key = duplicate_key(name)
        if key in seen:
            raise DatasetError(
                f"class names {shown_name(seen[key])} and {shown_name(name)}{place} differ only in case or "
                "spacing; give each class one name."
            )
        seen[key] = name


def duplicate_key(name: str) -> str:
    """What two names must not share: NFKC form, case-folded, whitespace runs collapsed."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", name).casefold()).strip()


def shown_name(name: str) -> str:
    """A name quoted for a message: its repr (controls visible), cut to `SHOWN_CHARS` characters."""
    text = repr(name)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 4] + "...'"


def _is_allowed(char: str) -> bool:
    category = unicodedata.category(char)
    return char in ALLOWED_PUNCTUATION or category[0] in "LM" or category == "Nd"


def _scripts(name: str) -> set[str]:
    """Scripts of the letters in `name`, from their Unicode names (LATIN SMALL LETTER A -> LATIN)."""
    scripts = set()
    for char in name:
        if not unicodedata.category(char).startswith("L"):
            continue  # digits, marks and punctuation belong to every script
        word = unicodedata.name(char, "UNKNOWN").split(" ")[0].split("-")[0]
        if word not in ("MODIFIER", "UNKNOWN"):
            scripts.add(word)
    return scripts
