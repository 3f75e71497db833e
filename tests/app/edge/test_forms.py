"""The inference routes' form parsing (app/edge/forms.py)."""

from __future__ import annotations

from app.edge.forms import UploadedFile, parse_form
from tests.app.test_hostile_uploads import IMAGE, MULTIPART, body, part


def test_parse_form_reads_fields_files_and_charsets():
    items = parse_form(body(IMAGE, part("question", "qué".encode()), part("question", b"\xff")), MULTIPART)
    assert [n for n, _ in items] == ["image", "question", "question"]
    assert isinstance(items[0][1], UploadedFile) and items[0][1].filename == "a.png"
    assert items[1][1] == "qué" and items[2][1] == "ÿ"  # not UTF-8: read as latin-1
