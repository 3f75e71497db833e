"""A question's validation (app/pipeline/questions.py)."""

from __future__ import annotations

import sys
import unicodedata

from app.pipeline.questions import CONTROL


def test_control_character_check_is_unicodes_cc_and_cs():
    """The one-regex check refuses exactly the code points of categories Cc and Cs except tab,
    newline and carriage return (what a per-character unicodedata lookup did)."""

    bad = [cp for cp in range(sys.maxunicode + 1)
           if unicodedata.category(chr(cp)) in ("Cc", "Cs") and chr(cp) not in "\t\n\r"]
    assert [cp for cp in range(sys.maxunicode + 1) if CONTROL.match(chr(cp))] == bad
