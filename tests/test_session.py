"""Sessions: one per (drafter, target model) pair, keeping neither model
alive, and the drafter's last statistics."""

import gc
import subprocess
import sys
import weakref

import mlx.core as mx
import mlx_lm
import pytest

from mlx_lm_dspark import last_stats, load_drafter
from mlx_lm_dspark.session import find, forget, session_for
from mlx_lm_dspark.speculative import bind, speculative_generate_step
from mlx_lm_dspark_tools.tiny import build_pair

PROMPT = [5, 17, 42, 99, 3]


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("session"), family="qwen3")


def generate(model, drafter, max_tokens=6):
    return [t for t, _, _ in speculative_generate_step(mx.array(PROMPT), model, drafter, max_tokens=max_tokens,
                                                       num_draft_tokens=drafter.max_drafts)]


def test_one_pair_one_session(pair_dirs):
    target_dir, drafter_dir = pair_dirs
    model, _ = mlx_lm.load(str(target_dir))
    drafter = load_drafter(drafter_dir, bits=None)
    assert find(drafter, model) is None
    session = session_for(drafter, model)
    assert session_for(drafter, model) is session and find(drafter, model) is session
    assert bind(drafter, model) is session.target
    generate(model, drafter)
    assert find(drafter, model) is session and session.stats is last_stats(drafter)
    forget(drafter, model)
    assert find(drafter, model) is None and bind(drafter, model) is not session.target


def test_two_targets_two_sessions(pair_dirs):
    target_dir, drafter_dir = pair_dirs
    first, _ = mlx_lm.load(str(target_dir))
    second, _ = mlx_lm.load(str(target_dir))
    drafter = load_drafter(drafter_dir, bits=None)
    other = load_drafter(drafter_dir, bits=None)
    a, b = session_for(drafter, first), session_for(drafter, second)
    assert a is not b and a.target.model is first and b.target.model is second
    assert session_for(other, first) is not a  # another drafter: its own session with the same target
    generate(first, drafter)
    generate(second, drafter)
    assert a.stats is not b.stats and last_stats(drafter) is b.stats  # the latest, whatever target
    assert last_stats(other) is None


def test_last_stats(pair_dirs):
    target_dir, drafter_dir = pair_dirs
    model, _ = mlx_lm.load(str(target_dir))
    drafter = load_drafter(drafter_dir, bits=None)
    assert last_stats(drafter) is None
    tokens = generate(model, drafter, max_tokens=9)
    stats = last_stats(drafter)
    assert stats.rounds > 0 and 1 + stats.rounds + stats.accepted == len(tokens)
    generate(model, drafter, max_tokens=1)
    assert last_stats(drafter) is not stats and last_stats(drafter).rounds == 0  # each generation its own


def test_nothing_is_kept_alive(pair_dirs):
    target_dir, drafter_dir = pair_dirs
    model, _ = mlx_lm.load(str(target_dir))
    drafter = load_drafter(drafter_dir, bits=None)
    generate(model, drafter)
    model_ref, drafter_ref = weakref.ref(model), weakref.ref(drafter)

    stats = last_stats(drafter)
    del drafter
    gc.collect()
    assert drafter_ref() is None  # the session on the target does not hold its drafter
    assert stats.rounds > 0

    drafter = load_drafter(drafter_dir, bits=None)
    generate(model, drafter)
    del model
    gc.collect()
    assert model_ref() is None  # neither the drafter nor its last statistics hold the target
    assert last_stats(drafter) is not None


def test_last_stats_imports_before_mlx_lm():
    """Importing it first must not trip over the host patches mlx-lm's import runs."""
    code = "from mlx_lm_dspark import last_stats; import mlx_lm.generate; print(last_stats(object()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "None", out.stderr
