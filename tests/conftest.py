import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MLX_LM_DSPARK_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "deepspec"

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        raise FileNotFoundError(
            f"Golden fixtures not found at {FIXTURES}; set MLX_LM_DSPARK_SHARED to the shared/ directory."
        )
    return FIXTURES
