"""Shared test fixtures."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real formula corpora in ../shared/data. Absent means a broken checkout: fail, never skip."""
    if not (SHARED_DATA / "im2latex_val.norm.txt").is_file():
        pytest.fail(f"real formula corpora missing: expected {SHARED_DATA} (the ../shared folder "
                    f"beside the repo); these tests need real formulas and must not be skipped")
    return SHARED_DATA
