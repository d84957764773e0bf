"""Activation: the .pth hook is lazy, can be switched off, and reaches
unchanged user scripts."""

import os
import subprocess
import sys
import textwrap

import pytest

from mlx_lm_dspark_tools.tiny import build_pair

PROMPT = "the quick brown fox jumps over the lazy dog and the cat"


def run(args, env=None):
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("hook"), family="qwen3")


def test_unchanged_script_picks_up_the_hook(pair, tmp_path):
    target, drafter = pair
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        assert "mlx" not in sys.modules  # the hook stays lazy until mlx_lm is imported
        from mlx_lm import load, stream_generate
        model, tokenizer = load({str(target)!r})
        draft, _ = load({str(drafter)!r})
        plain = "".join(r.text for r in stream_generate(model, tokenizer, {PROMPT!r}, max_tokens=25))
        rs = list(stream_generate(model, tokenizer, {PROMPT!r}, max_tokens=25, draft_model=draft))
        from_draft = sum(r.from_draft for r in rs)
        from mlx_lm_dspark import last_stats
        print(plain == "".join(r.text for r in rs), type(draft).__module__,
              last_stats(draft).rounds > 0, from_draft == last_stats(draft).accepted)
    """))
    out = run([sys.executable, str(script)]).stdout.split()
    assert out == ["True", "mlx_lm_dspark.drafter", "True", "True"]


def test_disable_switch(pair):
    _, drafter = pair
    code = "import mlx_lm.utils as u, sys; print(u.load_model.__module__, 'mlx_lm_dspark' in sys.modules)"
    out = run([sys.executable, "-c", code], env={"MLX_LM_DSPARK_DISABLE": "1"}).stdout.split()
    assert out == ["mlx_lm.utils", "False"]
    out = run([sys.executable, "-c", code]).stdout.split()
    assert out[1] == "True"


def test_startup_stays_light():
    code = "import sys; print(sorted(m for m in ('mlx', 'mlx_lm', 'numpy', 'importlib.resources') if m in sys.modules))"
    assert run([sys.executable, "-c", code]).stdout.strip() == "[]"
