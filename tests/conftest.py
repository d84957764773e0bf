import atexit
import os
import shutil
import sys
import tempfile
import weakref
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


def _host_loads(model_type: str) -> bool:
    import importlib.util

    from mlx_lm.utils import MODEL_REMAPPING

    return importlib.util.find_spec(f"mlx_lm.models.{MODEL_REMAPPING.get(model_type, model_type)}") is not None


# mlx-lm 0.31 has no "gemma4_unified" model type (0.32 loads it as gemma4).
needs_gemma4_unified = pytest.mark.skipif(
    not _host_loads("gemma4_unified"), reason="the installed mlx-lm cannot load gemma4_unified checkpoints"
)


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


_PLAIN_OPTIONS = {"kv_bits", "kv_group_size", "quantized_kv_start", "prefill_step_size"}
_plain_runs = {}  # id(model) -> {(prompt, options): the longest plain continuation decoded so far}


def plain_tokens(model, prompt, n, **options):
    """The first ``n`` tokens plain greedy decoding (mlx-lm's ``generate_step``
    on ``model``) continues ``prompt`` with, decoded once per session.

    Runs are kept per model, prompt and cache ``options``; a shorter request
    is served from a longer run, since a greedy token does not depend on
    ``max_tokens``.  Samplers, logits processors and prompt caches carry state,
    so calls with them decode themselves."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    unknown = set(options) - _PLAIN_OPTIONS
    if unknown:
        raise TypeError(f"plain_tokens memoises only {sorted(_PLAIN_OPTIONS)}, not {sorted(unknown)}")
    if id(model) not in _plain_runs:
        _plain_runs[id(model)] = {}
        weakref.finalize(model, _plain_runs.pop, id(model), None)
    runs = _plain_runs[id(model)]
    key = (tuple(int(t) for t in prompt), tuple(sorted(options.items())))
    if len(runs.get(key, ())) < n:
        tokens = prompt if isinstance(prompt, mx.array) else mx.array(key[0])
        runs[key] = [int(t) for t, _ in generate_step(tokens, model, max_tokens=n, **options)]
    return runs[key][:n]
