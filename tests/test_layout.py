"""The tree's own rules: every citation of the specification resolves to a section of docs/spec.md, and
the image-validity rule stands alone (tl_fast.dataset builds on it, never the other way round)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
CITED_FOLDERS = ("tl_fast", "tests", "benchmarks", "tools", "experiments", "examples", "scripts", "docs")


def _sources():
    for folder in CITED_FOLDERS:
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix in (".py", ".sh", ".md") and "__pycache__" not in path.parts and path != THIS:
                yield path
    for doc in ("README.md", "BENCHMARKS.md", "CONTRIBUTING.md"):
        yield REPO / doc


def test_spec_citations_name_existing_sections():
    spec = (REPO / "docs" / "spec.md").read_text()
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", spec, flags=re.M)}
    assert sections == set(range(1, len(sections) + 1)), f"docs/spec.md sections are not numbered 1..N: {sections}"
    cited, stale = [], []
    for path in _sources():
        text = path.read_text(errors="replace")
        rel = path.relative_to(REPO)
        cited += [(rel, int(n)) for n in re.findall(r"docs/spec\.md section (\d+)", text)]
        stale += [rel for _ in re.findall(r"\bSPEC\b", text)]
    assert cited, "no file cites docs/spec.md: the pattern above no longer matches how the code cites it"
    assert not [c for c in cited if c[1] not in sections], f"citations of missing sections: {cited}"
    assert not stale, f"cite the spec as 'docs/spec.md section N', not 'SPEC': {sorted(set(stale))}"


def test_imagecheck_imports_nothing_from_tl_fast():
    """Also not lazily inside a function: the whole module's syntax tree is searched."""
    tree = ast.parse((REPO / "tl_fast" / "imagecheck.py").read_text())
    found = [ast.unparse(node) for node in ast.walk(tree)
             if (isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("tl_fast")))
             or (isinstance(node, ast.Import) and any(a.name.startswith("tl_fast") for a in node.names))]
    assert not found, f"tl_fast/imagecheck.py must not import from tl_fast: {found}"
