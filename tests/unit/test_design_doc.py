"""docs/DESIGN.md names only paths that exist, and names every top-level part of the package.

The convention, stated at the top of the document: a path in a code span is relative to the
repository root when its first segment is one of ``ROOT_DIRS`` (``hack/``, ``tests/``, ...), and
relative to ``operator/kubedistill/`` otherwise (``reconcile/cycle.py``, ``worker/train/``).

A code span is taken for a path when it is one plain word of path characters (no spaces, no
``<``, ``*`` or ``:``, not absolute) and it ends in ``.py``, ends in ``/`` (a directory), or starts
with one of ``ROOT_DIRS``. Fenced blocks (diagrams, formulas) are left out."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "operator" / "kubedistill"
DOC = REPO / "docs" / "DESIGN.md"
ROOT_DIRS = ("hack", "tests", "bench", "charts", "crds", "docs", "examples", "images", "operator")

_FENCE = re.compile(r"^```.*?^```[^\n]*$", re.MULTILINE | re.DOTALL)
_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
_PATHLIKE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_./-]*$")


def code_spans(markdown: str) -> list[str]:
    """The inline code spans of ``markdown``, outside fenced blocks."""
    prose = _FENCE.sub("", markdown)
    return [match.group(2).strip() for match in _SPAN.finditer(prose)]


def is_path(span: str) -> bool:
    if not _PATHLIKE.match(span):
        return False
    return span.endswith((".py", "/")) or span.startswith(tuple(f"{root}/" for root in ROOT_DIRS))


def resolve(span: str) -> Path:
    """Where a path span points, by the document's convention."""
    base = REPO if span.split("/")[0] in ROOT_DIRS else PACKAGE
    return base / span.rstrip("/")


def doc_paths() -> list[str]:
    return sorted({span for span in code_spans(DOC.read_text()) if is_path(span)})


def top_level_parts() -> list[Path]:
    """Each .py file directly in the package and each subpackage."""
    return sorted(p for p in PACKAGE.iterdir() if (p.is_file() and p.suffix == ".py") or (p / "__init__.py").is_file())


def test_the_extraction_follows_the_convention() -> None:
    spans = code_spans(
        "`reconcile/cycle.py` and `worker/train/` and `hack/gen-crds` and `tests/unit/` and `api/`, not\n"
        "`kubedistill.io/job`, `<dj>-progress`, `/dev/termination-log`, `s3://b/p/`, `app.kubernetes.io/*`,\n"
        "`kubectl get dj`, `manifest.json`\n"
        "```\nnot/in/a/fence.py\n```\n"
    )
    assert [s for s in spans if is_path(s)] == [
        "reconcile/cycle.py",
        "worker/train/",
        "hack/gen-crds",
        "tests/unit/",
        "api/",
    ]
    assert resolve("reconcile/cycle.py") == PACKAGE / "reconcile" / "cycle.py"
    assert resolve("hack/gen-crds") == REPO / "hack" / "gen-crds"
    assert resolve("worker/train/") == PACKAGE / "worker" / "train"


def test_the_document_names_paths() -> None:
    assert len(doc_paths()) > 50


@pytest.mark.parametrize("span", doc_paths())
def test_every_path_named_exists(span: str) -> None:
    path = resolve(span)
    assert path.exists(), f"docs/DESIGN.md names `{span}`, but {path.relative_to(REPO)} does not exist"
    if span.endswith("/"):
        assert path.is_dir(), f"docs/DESIGN.md names `{span}` as a directory, but it is a file"


@pytest.mark.parametrize("part", top_level_parts(), ids=lambda p: p.name)
def test_every_top_level_module_and_package_is_named(part: Path) -> None:
    named = {resolve(span) for span in doc_paths()}
    spelled = f"{part.name}/" if part.is_dir() else part.name
    assert part in named, f"docs/DESIGN.md never names `{spelled}` (operator/kubedistill/{spelled})"


def test_the_document_points_nowhere_outside_the_repository() -> None:
    text = DOC.read_text()
    assert "../shared" not in text and "shared/DESIGN" not in text
