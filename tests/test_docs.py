"""The documentation (README.md and docs/*.md) is checked like code.

- Every relative markdown link `[text](target)` names a file or folder of the repository that exists;
  http(s) and mailto links are skipped. Where a link has a `#anchor` into a markdown page, the page has
  a heading with that GitHub anchor.
- Every fenced ```python block runs. The blocks of one page run in order, in one fresh namespace, in a
  temporary folder, so a page may set up `model` and `calibration` in its first block and use them later,
  and files the examples write land in that folder. Each page is one test case.
- Fences of other kinds are not run: ```py marks illustrative Python that cannot run in a test (it needs
  the MobileNetV2 weights package, several processes or minutes of work), ```bash marks shell commands,
  ```text marks printed output.
- README.md stays a front page: at most 12,000 characters, with the two set-up commands that CI calls,
  and a link to every docs page. No page names notes outside the repository.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
IDS = [str(p.relative_to(ROOT)) for p in PAGES]

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[(?P<text>[^\]\n]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(?P<title>.+?)[ \t]*#*[ \t]*$", re.MULTILINE)

QUICK_START = "python -m venv .venv && . .venv/bin/activate && pip install . && fxabstract compile"
TEST_COMMAND = ("python -m venv .venv && . .venv/bin/activate && pip install '.[test]' && "
                "python -m pytest -q -m \"not slow\"")
OUTSIDE_NOTES = ("THEORY.md", "DESIGN.md", "STYLE.md", "THEORY §")


def blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, line number of the opening fence, dedented body) of every fenced block."""
    out = []
    for m in FENCE.finditer(text):
        indent = len(m.group("indent"))
        body = "".join(line[indent:] if line[:indent].strip() == "" else line
                       for line in m.group("body").splitlines(keepends=True))
        out.append((m.group("lang"), text.count("\n", 0, m.start()) + 1, body))
    return out


def prose(text: str) -> str:
    """The text without fenced blocks and inline code, where link syntax is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def anchor(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).replace("`", "")
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(FENCE.sub("", page.read_text())):
        a = anchor(m.group("title"))
        out.add(a if a not in seen else f"{a}-{seen[a]}")
        seen[a] = seen.get(a, 0) + 1
    return out


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_relative_links_resolve(page: Path):
    broken = []
    for m in LINK.finditer(prose(page.read_text())):
        target = m.group("target")
        if re.match(r"^(https?|mailto):", target):
            continue
        path, _, fragment = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            broken.append(f"{target} (no such file or folder)")
        elif fragment and where.suffix == ".md" and fragment not in anchors(where):
            broken.append(f"{target} (no heading with anchor #{fragment} in {where.name})")
    assert not broken, f"{page.relative_to(ROOT)} links to what does not exist: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_python_examples_run(page: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page.stem}"}
    start = time.perf_counter()
    for lang, line, body in blocks(page.read_text()):
        if lang != "python":
            continue
        code = compile(body, f"{page.relative_to(ROOT)}:{line}", "exec")
        exec(code, namespace)  # noqa: S102 - the documentation's own examples
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"the examples of {page.relative_to(ROOT)} took {elapsed:.0f} s; keep them small"


def test_fences_are_known_kinds():
    known = {"python", "py", "bash", "text", "json"}
    odd = [(str(p.relative_to(ROOT)), line, lang) for p in PAGES for lang, line, _ in blocks(p.read_text())
           if lang not in known]
    assert not odd, f"fenced blocks must be one of {sorted(known)} (python runs, the others do not): {odd}"


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text) <= 12_000, f"README.md has {len(text)} characters; move detail into docs/ (limit 12,000)"
    assert QUICK_START in text, "README.md must keep the Quick start command verbatim (CI calls it)"
    assert TEST_COMMAND in text, "README.md must keep the test command verbatim (CI calls it)"


def test_every_docs_page_is_linked():
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    for index in (ROOT / "README.md", ROOT / "docs" / "index.md"):
        linked = {Path(m.group("target").partition("#")[0]).name for m in LINK.finditer(prose(index.read_text()))}
        missing = sorted(pages - linked - {index.name})
        assert not missing, f"{index.relative_to(ROOT)} must link every docs page; missing {missing}"


def test_no_notes_outside_the_repository():
    texts = [*PAGES, ROOT / "benchmarks" / "README.md", *sorted((ROOT / "benchmarks" / "results").glob("*.md"))]
    found = [(str(p.relative_to(ROOT)), name) for p in texts for name in OUTSIDE_NOTES if name in p.read_text()]
    assert not found, f"the docs must not point at notes outside the repository: {found}"
