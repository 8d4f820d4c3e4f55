"""Every documentation file the code, configs, notebooks and README cite ships in the repository,
and every cited section of docs/algorithms.md exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for folder in ("lightning_diffusion", "configs", "benchmarks", "notebooks", "tests", "examples", "docs")
           for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".yaml", ".ipynb", ".md")] + [ROOT / "README.md"]
CITATION = re.compile(r"docs/([a-z_]+\.md)(?:[ ,]+(?:section )?(\d+(?:\.\d+)?))?")


def _citations() -> list[tuple[Path, str, str | None]]:
    return [(path, m.group(1), m.group(2)) for path in SOURCES for m in CITATION.finditer(path.read_text())]


def test_cited_documents_exist():
    citations = _citations()
    assert len(citations) > 50  # the scan sees the code's citations (it must not pass vacuously)
    missing = sorted({f"{path.relative_to(ROOT)} cites docs/{name}" for path, name, _ in citations
                      if not (ROOT / "docs" / name).is_file()})
    assert not missing, missing


def test_cited_sections_of_the_algorithms_exist():
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", (ROOT / "docs" / "algorithms.md").read_text(), re.M))
    assert {"0", "1", "2", "3.4", "4.1", "5"} <= headings
    missing = sorted({f"{path.relative_to(ROOT)}: {section}" for path, name, section in _citations()
                      if name == "algorithms.md" and section and section not in headings})
    assert not missing, missing


def test_no_citation_of_the_unshipped_team_notes():
    stale = [str(p.relative_to(ROOT)) for p in SOURCES if re.search(r"(?<![/\w])(ALGORITHMS|DESIGN)\.md", p.read_text())]
    assert not stale, stale
