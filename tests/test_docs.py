"""The documentation ships with the code: code cites only ``docs/`` pages, and every cited
section exists.

1. No file of the package, the baselines, the repro and bench scripts (nor the tests, README,
   noxfile or committed reports) cites a document outside the repository: the project's
   original spec files (``VAR.md``, ``MVAR.md``, ``PAPER.md``, ``EVALUATION.md``,
   ``NEIGHBORHOOD_ATTENTION.md``), ``shared/spec`` or the fixtures' README.
2. Every ``docs/<page>.md §N`` cited anywhere names an existing page with a heading numbered N
   (ranges ``§1–2`` check both ends); every ``docs/<page>.md`` cited exists.
3. Relative links between the docs pages resolve, anchors included (GitHub's heading slugs).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Where a citation of a file outside the repository is an error. The package and scripts are
# the contract of the issue; tests, README, noxfile and reports are held to the same rule.
STRICT_DIRS = ("mvar", "baselines", "repro", "bench")
OTHER_PATHS = ("tests", "README.md", "noxfile.py", "reports", "docs")
SUFFIXES = {".py", ".md", ".txt", ".toml", ".csv", ".cfg"}

# Citations of documents that users of the repository do not have.
OUTSIDE_CITATION = re.compile(
    r"(?<![\w/])(?:M?VAR|PAPER|EVALUATION|NEIGHBORHOOD_ATTENTION)\.md"  # the spec files
    r"|shared/spec|shared/fixtures/README"
    r"|(?<![\w/.])M?VAR §"  # "VAR §1" / "MVAR §2": the spec's sections, by another name
    r"|\bspec §|\bfixtures README"
)
# In the package and scripts even the shared folder's path must not appear (the tests and the
# README may name the default location of the parity fixtures, which is data, not a citation).
SHARED_PATH = re.compile(r"\.\./shared|\bshared/fixtures")

_NUM = r"\d+(?:\.\d+)*"
DOC_CITATION = re.compile(
    rf"docs/(?P<page>[\w.-]+?\.md)`*(?:\s*§\s*(?P<a>{_NUM})(?:\s*[–-]\s*(?P<b>{_NUM}))?)?"
)
HEADING = re.compile(rf"^#{{1,6}}\s+(?P<num>{_NUM})\.?\s")
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def _files(paths: tuple[str, ...]) -> list[Path]:
    out: list[Path] = []
    for name in paths:
        p = ROOT / name
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out += sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and f.suffix in SUFFIXES and "__pycache__" not in f.parts
            )
    return [f for f in out if f != Path(__file__).resolve()]


def _lines_without_code_fences(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        lines.append("" if fenced else line)
    return lines


def section_numbers(page: Path) -> set[str]:
    """The numbers of a page's headings: "## 2. Transformer" -> "2", "### 2.4 ..." -> "2.4"."""
    nums = set()
    for line in _lines_without_code_fences(page.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if m:
            nums.add(m["num"])
    return nums


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    out = set()
    for line in _lines_without_code_fences(page.read_text(encoding="utf-8")):
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            out.add(slug(m.group(1)))
    return out


def outside_citations(text: str, strict: bool) -> list[str]:
    """Each offending match, e.g. ``["MVAR.md", "../shared"]``."""
    hits = [m.group(0) for m in OUTSIDE_CITATION.finditer(text)]
    if strict:
        hits += [m.group(0) for m in SHARED_PATH.finditer(text)]
    return hits


def broken_doc_citations(text: str, docs: Path = DOCS) -> list[str]:
    """Citations ``docs/<page>.md [§N[–M]]`` whose page or section does not exist."""
    bad = []
    cache: dict[str, set[str]] = {}
    for m in DOC_CITATION.finditer(text):
        page = docs / m["page"]
        if not page.is_file():
            bad.append(f"{m.group(0)} (no page docs/{m['page']})")
            continue
        if m["page"] not in cache:
            cache[m["page"]] = section_numbers(page)
        for num in (m["a"], m["b"]):
            if num is not None and num not in cache[m["page"]]:
                bad.append(f"{m.group(0)} (docs/{m['page']} has no section {num})")
    return bad


# --- the scanners themselves can fail -------------------------------------------------------


def test_scanner_flags_outside_citations() -> None:
    assert outside_citations("see VAR.md §1 and ``shared/spec/MVAR.md``", strict=False)
    assert outside_citations("(MVAR §2, NATTEN's window)", strict=False) == ["MVAR §"]
    assert outside_citations("(spec § Semantics)", strict=False)
    assert outside_citations("default ``../shared/fixtures``", strict=True)
    assert not outside_citations("default ``../shared/fixtures``", strict=False)
    assert not outside_citations("see docs/var.md §1, docs/mvar.md §2 and MVAR's paper", True)


def test_scanner_flags_missing_sections() -> None:
    assert broken_doc_citations("docs/var.md §1.3 and ``docs/mvar.md`` §1–2") == []
    assert broken_doc_citations("docs/var.md §99")
    assert broken_doc_citations("docs/var.md §2.99")
    assert broken_doc_citations("docs/mvar.md §1-99")
    assert broken_doc_citations("docs/no_such_page.md")


def test_slug_matches_github() -> None:
    assert slug("3.4 Fine-tuning MVAR† from VAR weights") == "34-fine-tuning-mvar-from-var-weights"
    assert slug("1. Attention GFLOPs: the convention") == "1-attention-gflops-the-convention"
    assert slug("3.1 The chunk schedule (ratio_k)") == "31-the-chunk-schedule-ratio_k"


# --- the repository --------------------------------------------------------------------------


def test_docs_present() -> None:
    pages = {p.name for p in DOCS.glob("*.md")}
    expected = {"README.md", "var.md", "mvar.md", "neighbourhood_attention.md", "evaluation.md",
                "counting.md", "paper_numbers.md", "parity.md", "embedded.md"}  # fmt: skip
    assert expected <= pages, f"docs/ lacks {sorted(expected - pages)}"
    for page in DOCS.glob("*.md"):
        if page.name != "README.md":
            assert section_numbers(page), f"{page.name} has no numbered sections"


@pytest.mark.parametrize(
    "strict", [True, False], ids=["package-and-scripts", "tests-readme-reports"]
)
def test_no_citation_outside_the_repository(strict: bool) -> None:
    files = _files(STRICT_DIRS if strict else OTHER_PATHS)
    assert files
    problems = []
    for f in files:
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            for hit in outside_citations(line, strict):
                problems.append(f"{f.relative_to(ROOT)}:{i}: {hit!r} in {line.strip()!r}")
    # One line per offence; re-point the citation to docs/ (see docs/README.md for the pages).
    assert not problems, "citations of files outside the repository:\n" + "\n".join(problems)


def test_every_cited_docs_section_exists() -> None:
    files = _files(STRICT_DIRS + OTHER_PATHS)
    problems, cited = [], 0
    for f in files:
        text = f.read_text(encoding="utf-8")
        # A citation may wrap onto the next line of a comment or docstring.
        joined = re.sub(r"\n\s*#?\s*", " ", text)
        cited += len(DOC_CITATION.findall(joined))
        problems += [f"{f.relative_to(ROOT)}: {b}" for b in broken_doc_citations(joined)]
    assert cited > 50, f"only {cited} docs/ citations found: is the scanner broken?"
    assert not problems, "citations of missing docs pages or sections:\n" + "\n".join(problems)


def test_links_between_docs_resolve() -> None:
    problems = []
    for page in sorted(DOCS.glob("*.md")):
        for m in LINK.finditer(page.read_text(encoding="utf-8")):
            target = m["target"]
            if re.match(r"^[a-z]+:", target):  # http(s), mailto: not checked offline
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                problems.append(f"{page.name}: link to missing {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{page.name}: no heading for anchor {target}")
    assert not problems, "\n".join(problems)


def test_section_numbers_are_unique_per_page() -> None:
    for page in DOCS.glob("*.md"):
        nums = [
            m["num"]
            for line in _lines_without_code_fences(page.read_text(encoding="utf-8"))
            if (m := HEADING.match(line))
        ]
        dupes = {n for n in nums if nums.count(n) > 1}
        assert not dupes, f"{page.name}: section numbers used twice: {sorted(dupes)}"
