"""A VQA v2-layout fixture generated once per test session (see vqa2_fixture.py)."""

from pathlib import Path

import pytest

from tests.training.vqa2_fixture import make_vqa2_fixture


@pytest.fixture(scope="session")
def vqa2_root(tmp_path_factory) -> Path:
    return make_vqa2_fixture(tmp_path_factory.mktemp("vqa2"))
