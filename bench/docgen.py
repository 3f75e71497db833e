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
with :func:`section` (below, or in the module that owns the measurement, imported in
:func:`_register_all`), put its markers where the text belongs, run ``python -m bench.docgen``.
A *block* section owns whole lines (tables, paragraphs; the markers stand on their own lines);
an *inline* section is a phrase inside a sentence (``…figures (<!-- results:x:begin -->…<!--
results:x:end -->).``).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .server import REPO

RESULTS = REPO / "bench" / "results"
DOC_GLOBS = ("README.md", "docs/*.md")
_NAME = r"(?:vqa-bench|results):[\w.:-]+?"
MARKER = re.compile(rf"<!-- ({_NAME}):begin -->(.*?)<!-- \1:end -->", re.S)
_ANY_MARKER = re.compile(rf"<!-- ({_NAME}):(begin|end) -->")


@dataclass(frozen=True)
class Section:
    name: str
    results: tuple[str, ...]  # paths relative to the repository root
    render: Callable[..., str]  # one loaded results dict per path -> markdown
    inline: bool = False
    # Rendered instead when a results file is not committed (e.g. no GPU run yet); None: the
    # file is required.
    missing: Callable[[], str] | None = None


SECTIONS: dict[str, Section] = {}


def section(name: str, *results: str, inline: bool = False, missing: Callable[[], str] | None = None):
    """Register ``render(*loaded_results) -> markdown`` as section ``name``."""
    if not re.fullmatch(_NAME, name):
        raise ValueError(f"section name {name!r} must start with 'vqa-bench:' or 'results:'")

    def register(render: Callable[..., str]) -> Callable[..., str]:
        if name in SECTIONS:
            raise ValueError(f"section {name!r} registered twice")
        SECTIONS[name] = Section(name, tuple(results), render, inline, missing)
        return render
    return register


def load(path: str) -> dict:
    return json.loads((REPO / path).read_text())


def header(sec: Section, missing: bool = False) -> str:
    sources = ", ".join(sec.results)
    where = f"({sources} not committed)" if missing else f"from {sources}"
    return f"<!-- generated {where} by `python -m bench.docgen`; do not edit by hand -->\n"


def wrap(sec: Section, body: str, missing: bool = False) -> str:
    """The text that goes between the markers."""
    if sec.inline:
        if "\n" in body.strip():
            raise ValueError(f"inline section {sec.name} rendered more than one line")
        return body.strip()
    return "\n" + header(sec, missing) + body.rstrip("\n") + "\n"


def render_section(name: str) -> str:
    sec = _sections()[name]
    if sec.missing is not None and not all((REPO / p).exists() for p in sec.results):
        return wrap(sec, sec.missing(), missing=True)
    return wrap(sec, sec.render(*(load(p) for p in sec.results)))


def replace_section(text: str, name: str, inner: str, where: str = "text") -> str:
    """``text`` with section ``name``'s content replaced by ``inner`` (as :func:`wrap` returns it)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{where}: no '{begin}' … '{end}' markers to put the results between")
    return pattern.sub(lambda _: begin + inner + end, text)


def write_section(doc: Path, name: str, body: str) -> None:
    """Put ``body`` (a section's rendering, e.g. from results just measured) into ``doc``'s
    section ``name``, exactly as :func:`render_doc` would from the committed results file."""
    doc.write_text(replace_section(doc.read_text(), name, wrap(_sections()[name], body), str(doc)))


def section_for_results(path: Path) -> str | None:
    """The section rendered from the one results file ``path`` alone, if one is registered."""
    try:
        rel = str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return None
    found = [s.name for s in _sections().values() if s.results == (rel,)]
    return found[0] if len(found) == 1 else None


def publish(results: dict, output: Path, section: str, render: Callable[[dict], str],
            doc: Path | None = None) -> None:
    """The end of a benchmark run: write ``results`` to ``output`` (JSON), print the section's
    markdown and, with ``doc``, put it into that document's section ``section``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")
    text = render(results)
    print(text, end="" if text.endswith("\n") else "\n")
    if doc is not None:
        write_section(doc, section, text)


def rerender(argv: list[str], render: Callable[[dict], str], section: str) -> int:
    """``vqa-bench X --render RESULTS [DOC]``: print the section rendered from a results file,
    or write it into DOC's section for that file (``section`` when none is registered for it)."""
    results = json.loads(Path(argv[1]).read_text())
    if len(argv) > 2:
        write_section(Path(argv[2]), section_for_results(Path(argv[1])) or section, render(results))
    else:
        print(render(results), end="")
    return 0


def render_doc(text: str, where: str = "text") -> str:
    """``text`` with every generated section re-rendered. Refuses unknown or unpaired markers, so
    a misspelt marker cannot leave hand-typed figures unchecked."""
    sections = _sections()
    names = [m.group(1) for m in MARKER.finditer(text)]
    for m in _ANY_MARKER.finditer(text):
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


_registered = False


def _register_all() -> None:
    global _registered
    if not _registered:
        _registered = True
        from . import docsections  # noqa: F401  (registers the sections)


def _sections() -> dict[str, Section]:
    _register_all()
    return SECTIONS


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


if __name__ == "__main__":  # run as the package's module, so the sections register in one registry
    from bench.docgen import main as _main

    raise SystemExit(_main())
