"""Every script in examples/ runs as a user would run it (a subprocess, offline)
and prints the line that says it worked."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

def run_example(name, *args, timeout=600):
    """The example's stdout; fails with its output unless it exits 0."""
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                            timeout=timeout, env=dict(os.environ))
    assert result.returncode == 0, f"{name} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_python_api():
    out = run_example("python_api.py", "--max-tokens", "32")  # automatic draft length
    assert "identical to plain decoding: True" in out
    assert "Speculative: τ=" in out


def test_python_api_fixed_cap_drafts():
    out = run_example("python_api.py", "--max-tokens", "32", "--num-draft-tokens", "3")
    assert "identical to plain decoding: True" in out
    assert "draft cap 3" in out


@pytest.mark.slow
def test_prompt_cache():
    out = run_example("prompt_cache.py", "--num-draft-tokens", "3")
    assert "turns identical to plain decoding: 3/3" in out


@pytest.mark.slow
def test_server_client():
    out = run_example("server_client.py", "--num-draft-tokens", "3", "--max-tokens", "24")
    assert "speculative: {'acceptance_rule': 'greedy'" in out
    assert "streamed speculative: {'acceptance_rule': 'greedy'" in out
    assert "same reply streamed: True" in out


@pytest.mark.slow
def test_mlx_vlm_image():
    pytest.importorskip("mlx_vlm", reason="the mlx-vlm example needs the `vlm` extra (pip install '.[vlm]')")
    out = run_example("mlx_vlm_image.py", "--draft-block-size", "8")
    assert "identical to plain decoding: True" in out
    assert "draft cap 7" in out  # width 8: 7 drafts per round


@pytest.mark.slow
def test_train_drafter():
    out = run_example("train_drafter.py", "--iters", "10")
    assert "training loss over 10 steps" in out
    assert "identical to plain decoding: True" in out
