"""Fixtures shared by the test files: validated params from overrides, and the real MRI volumes."""

from __future__ import annotations

from pathlib import Path

import pytest

from weak2full.params import Params, parse_params

# Three real brain MRI volumes with lesion masks, beside the project (read-only, never copied in).
OPEN_MS_DATA = Path(__file__).parents[2] / "shared" / "data" / "open_ms_data"


@pytest.fixture
def make_params():
    """``make_params(data={...}, common={...})``: a validated Params from per-section overrides."""

    def make(**sections) -> Params:
        return parse_params(sections)

    return make


@pytest.fixture
def open_ms_data() -> Path:
    if not (OPEN_MS_DATA / "README.md").is_file():
        pytest.skip(f"the real MRI volumes of ../shared/data/open_ms_data are not at {OPEN_MS_DATA}")
    return OPEN_MS_DATA
