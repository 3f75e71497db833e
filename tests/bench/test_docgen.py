"""The docs' figures come from committed results (bench/docgen.py): the committed README.md and
docs/*.md are exactly what the renderer makes of bench/results/*.json, and a hand edit, a
misspelt marker or a results file left without a section is caught."""

from __future__ import annotations

import json

import pytest

from bench import docgen, sections
from bench.sections import REPO, RESULTS


def test_committed_docs_are_what_their_results_render():
    diffs = docgen.check()
    assert not diffs, "docs differ from bench/results (run `python -m bench.docgen`):\n" + "".join(diffs)


def test_every_registered_section_is_in_a_doc():
    used = {name for p in docgen.doc_paths() for name in docgen.sections_in(p.read_text())}
    registered = set(sections.SECTIONS)
    assert registered <= used, f"registered but in no doc: {sorted(registered - used)}"


def test_a_figure_edited_by_hand_is_caught():
    text = (REPO / "README.md").read_text()
    begin = text.index("<!-- results:bench-summary:begin -->")
    i = text.index("×", begin)  # the first ratio in the generated summary
    edited = text[:i - 1] + str((int(text[i - 1]) + 1) % 10) + text[i:]
    assert docgen.render_doc(edited) == text != edited


def test_misspelt_or_unpaired_markers_are_refused():
    with pytest.raises(ValueError, match="unknown generated section"):
        docgen.render_doc("<!-- results:nope:begin -->\n1.23 ms\n<!-- results:nope:end -->\n")
    with pytest.raises(ValueError, match="no matching end"):
        docgen.render_doc("<!-- results:soak:begin -->\n+0.25%\n<!-- results:soak:stop -->\n")


def test_inline_and_block_sections(monkeypatch, tmp_path):
    """A block section gets its own lines and a do-not-edit header naming its source; an inline
    one is a phrase; one with a ``missing`` fallback renders it while its results are absent."""
    monkeypatch.setattr(sections, "REPO", tmp_path)
    monkeypatch.setattr(sections, "SECTIONS", {})
    monkeypatch.setattr(docgen, "SECTIONS", sections.SECTIONS)
    (tmp_path / "r.json").write_text(json.dumps({"x": 1.5}))
    sections.section("results:t-block", "r.json")(lambda r: f"| x |\n|---|\n| {r['x']} |\n")
    sections.section("results:t-inline", "r.json", inline=True)(lambda r: f"x = {r['x']}")
    sections.section("results:t-missing", "absent.json", missing=lambda: "Not measured.")(lambda r: "never")
    text = ("A (<!-- results:t-inline:begin -->old<!-- results:t-inline:end -->).\n\n"
            "<!-- results:t-block:begin -->\nold\n<!-- results:t-block:end -->\n"
            "<!-- results:t-missing:begin --><!-- results:t-missing:end -->\n")
    assert docgen.render_doc(text) == (
        "A (<!-- results:t-inline:begin -->x = 1.5<!-- results:t-inline:end -->).\n\n"
        "<!-- results:t-block:begin -->\n"
        "<!-- generated from r.json by `python -m bench.docgen`; do not edit by hand -->\n"
        "| x |\n|---|\n| 1.5 |\n<!-- results:t-block:end -->\n"
        "<!-- results:t-missing:begin -->\n"
        "<!-- generated (absent.json not committed) by `python -m bench.docgen`; do not edit by hand -->\n"
        "Not measured.\n<!-- results:t-missing:end -->\n")


def test_vqa_bench_doc_update_writes_what_docgen_renders(tmp_path):
    """``vqa-bench --doc`` (bench.report.update_doc) and ``python -m bench.docgen`` agree, so a
    benchmark run followed by committing its JSON passes the check above."""
    from bench.report import update_doc

    doc = tmp_path / "perf.md"
    doc.write_text("x\n<!-- vqa-bench:cpu:begin -->\nstale\n<!-- vqa-bench:cpu:end -->\n")
    update_doc(doc, sections.load("bench/results/cpu.json"), RESULTS / "cpu.json")
    assert doc.read_text() == docgen.render_doc("x\n<!-- vqa-bench:cpu:begin --><!-- vqa-bench:cpu:end -->\n")


def test_drain_render_writes_the_section_of_its_results_file(tmp_path):
    """``vqa-bench drain --render FILE DOC`` puts a VQA_WORKERS=2 run into its own section."""
    from bench import drain

    assert sections.section_for_results(RESULTS / "drain-workers2.json") == "vqa-bench:drain-workers2"
    assert sections.section_for_results(RESULTS / "drain.json") == "vqa-bench:drain"
    assert sections.section_for_results(tmp_path / "elsewhere.json") is None
    empty = ("<!-- vqa-bench:drain:begin --><!-- vqa-bench:drain:end -->\n"
             "<!-- vqa-bench:drain-workers2:begin --><!-- vqa-bench:drain-workers2:end -->\n")
    doc = tmp_path / "doc.md"
    for results in ("drain.json", "drain-workers2.json"):
        doc.write_text(empty)
        assert drain.main(["--render", str(RESULTS / results), str(doc)]) == 0
        name = sections.section_for_results(RESULTS / results)
        other = ({"vqa-bench:drain", "vqa-bench:drain-workers2"} - {name}).pop()
        assert f"<!-- {other}:begin --><!-- {other}:end -->" in doc.read_text()  # untouched
        assert doc.read_text() == sections.replace_section(empty, name, sections.render_section(name))
