"""The registry of generated doc sections, and how a section's text is written.

A generated section sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in
``README.md`` or ``docs/*.md``; NAME is registered here (:func:`section`) with the results
file(s) it reads and the function that writes its markdown -- by the module that owns the
measurement (bench/drain.py registers its own) or by bench/docsections.py. A benchmark run
writes its section with :func:`publish` / :func:`write_section`, exactly as ``python -m
bench.docgen`` (bench/docgen.py) renders every section from the committed results.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import machine
from .server import REPO

RESULTS = REPO / "bench" / "results"
_NAME = r"(?:vqa-bench|results):[\w.:-]+?"
MARKER = re.compile(rf"<!-- ({_NAME}):begin -->(.*?)<!-- \1:end -->", re.S)
ANY_MARKER = re.compile(rf"<!-- ({_NAME}):(begin|end) -->")


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
    sec = SECTIONS[name]
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
    doc.write_text(replace_section(doc.read_text(), name, wrap(SECTIONS[name], body), str(doc)))


def section_for_results(path: Path) -> str | None:
    """The section rendered from the one results file ``path`` alone, if one is registered."""
    try:
        rel = str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return None
    found = [s.name for s in SECTIONS.values() if s.results == (rel,)]
    return found[0] if len(found) == 1 else None


def repo_relative(path: Path) -> str:
    """``path`` as results files record it: relative to the repository where it lies inside."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def opening(schema: str, suite: str, argv: list[str], *, label: str | None = None, device: str = "cpu",
            **fields) -> dict:
    """The fields a ``vqa-bench <suite>`` run's results begin with -- schema, label, when, the
    command, the machine, the load average at the start -- then ``fields``; :func:`closing`
    adds the end's."""
    import torch

    return {"schema": schema, "label": label,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["vqa-bench", suite, *argv]),
            "machine": machine.describe(torch.device(device)),
            "load_average_start": machine.load_average(), **fields}


def closing(results: dict, started: float) -> dict:
    """``results`` with the load average at the end and the run's duration since ``started``
    (a ``time.perf_counter()`` reading)."""
    results["load_average_end"] = machine.load_average()
    results["duration_s"] = time.perf_counter() - started
    return results


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


def not_measured() -> str:
    return "Not measured yet.\n"
