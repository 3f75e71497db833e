"""Every figure the docs quote, rendered from a committed results file (``bench/results/*.json``).

A generated section sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in
``README.md`` or ``docs/*.md``, where NAME (``vqa-bench:…`` or ``results:…``) is registered in
:data:`SECTIONS` with the results file(s) it reads and the function that writes its markdown.
Nothing between the markers is typed by hand, and a measured figure outside them has no results
behind it: it does not belong in the docs.

    python -m bench.docgen           # re-render every generated section from bench/results/
    python -m bench.docgen --check   # exit 1 with a diff where a committed doc differs

``tests/bench/test_docgen.py`` runs the check, so a hand-edited figure or a results file
committed without re-rendering fails the suite.

To add a figure: have the measurement write its JSON to ``bench/results/``, register a section
with :func:`bench.sections.section` (in the module that owns the measurement, or in
bench/docsections.py, which imports every such module), put its markers where the text belongs,
run ``python -m bench.docgen``.
A *block* section owns whole lines (tables, paragraphs; the markers stand on their own lines);
an *inline* section is a phrase inside a sentence (``…figures (<!-- results:x:begin -->…<!--
results:x:end -->).``).
"""

from __future__ import annotations

import argparse
import difflib
import sys

from . import docsections  # noqa: F401  (imports every module that registers a section)
from .sections import ANY_MARKER, MARKER, SECTIONS, render_section
from .server import REPO

DOC_GLOBS = ("README.md", "docs/*.md")


def render_doc(text: str, where: str = "text") -> str:
    """``text`` with every generated section re-rendered. Refuses unknown or unpaired markers, so
    a misspelt marker cannot leave hand-typed figures unchecked."""
    sections = SECTIONS
    names = [m.group(1) for m in MARKER.finditer(text)]
    for m in ANY_MARKER.finditer(text):
        if m.group(1) not in names:
            raise ValueError(f"{where}: '{m.group(0)}' has no matching {'end' if m.group(2) == 'begin' else 'begin'}")
    for name in names:
        if name not in sections:
            raise ValueError(f"{where}: unknown generated section {name!r} (known: {', '.join(sorted(sections))})")
    return MARKER.sub(lambda m: f"<!-- {m.group(1)}:begin -->{render_section(m.group(1))}<!-- {m.group(1)}:end -->",
                      text)


def doc_paths() -> list[Path]:
    return sorted({p for g in DOC_GLOBS for p in REPO.glob(g)})


def sections_in(text: str) -> list[str]:
    return [m.group(1) for m in MARKER.finditer(text)]


def check() -> list[str]:
    """Unified diffs of every doc whose committed text differs from its rendering (empty: all match)."""
    diffs = []
    for path in doc_paths():
        text = path.read_text()
        rendered = render_doc(text, str(path.relative_to(REPO)))
        if rendered != text:
            rel = str(path.relative_to(REPO))
            diffs.append("".join(difflib.unified_diff(text.splitlines(True), rendered.splitlines(True),
                                                      f"{rel} (committed)", f"{rel} (rendered)")))
    return diffs


def write() -> list[Path]:
    changed = []
    for path in doc_paths():
        text = path.read_text()
        rendered = render_doc(text, str(path.relative_to(REPO)))
        if rendered != text:
            path.write_text(rendered)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.docgen", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 with a diff if a doc differs")
    args = p.parse_args(argv)
    if args.check:
        diffs = check()
        sys.stdout.write("".join(diffs))
        if diffs:
            print(f"{len(diffs)} doc(s) differ from their results: run `python -m bench.docgen`", file=sys.stderr)
        return 1 if diffs else 0
    for path in write():
        print(f"rewrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
