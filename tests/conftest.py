import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"  # copies of shared/fixtures and shared/data/eval_prompts
FIXTURES = DATA / "deepspec"
EAGLE3_FIXTURES = DATA / "deepspec_eagle3"
EVAL_PROMPTS = DATA / "eval_prompts"

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Cost models measured by the tests (and their subprocesses) stay out of the
# user's cache directory.
if "MLX_LM_DSPARK_CACHE" not in os.environ:
    os.environ["MLX_LM_DSPARK_CACHE"] = tempfile.mkdtemp(prefix="mlx-lm-dspark-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MLX_LM_DSPARK_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        raise FileNotFoundError(f"Golden fixtures not found at {FIXTURES}: the checkout is incomplete.")
    return FIXTURES


@pytest.fixture(scope="session")
def qwen3_dirs(tmp_path_factory):
    """(target dir, drafter dir) of a tiny Qwen3 pair per drafter layout."""
    from mlx_lm_dspark_tools.tiny import build_pair

    root = tmp_path_factory.mktemp("layouts")
    dirs = {}
    for layout in ("deepspec", "dflash_config", "zlab"):
        dirs[layout] = build_pair(root / layout, family="qwen3", layout=layout)
    dirs["dflash"] = build_pair(root / "dflash", family="qwen3", markov_rank=0)
    return dirs
