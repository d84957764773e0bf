"""The shipped demo pair and its reproduction script (scripts/make_demo_pair.py)."""

import importlib.util
import json
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest

from mlx_lm_dspark import demo, last_stats
from mlx_lm_dspark.loader import load_drafter
from mlx_lm_dspark.speculative import speculative_generate_step

from conftest import plain_tokens

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_pair.py"
CODE = [
    "def read_lines(path):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "import os\n",
]


@pytest.fixture(scope="module")
def pair():
    target_dir, drafter_dir = demo.pair_paths()
    model, tokenizer = mlx_lm.load(str(target_dir))
    return model, tokenizer, load_drafter(str(drafter_dir), bits=None)


def test_shipped_pair_is_small_quantized_and_described():
    target_dir, drafter_dir = demo.pair_paths()
    size = sum(f.stat().st_size for f in demo.PAIR_DIR.rglob("*") if f.is_file())
    assert size < 12e6, f"the demo pair should stay a few MB, it is {size / 1e6:.1f} MB"
    assert json.loads((target_dir / "config.json").read_text())["quantization"]["bits"] == 4
    assert json.loads((drafter_dir / "config.json").read_text())["quantization"]["bits"] == 4
    manifest = json.loads((demo.PAIR_DIR / "manifest.json").read_text())
    assert manifest["corpus"]["files"] > 100 and manifest["drafter"]["held_out"]


@pytest.mark.parametrize("cap", [None, 3, *(pytest.param(c, marks=pytest.mark.slow) for c in (0, 1, 6))])
def test_shipped_pair_lossless(pair, cap):
    """Greedy speculative output equals plain decoding (expected tokens from
    the plain target), for the automatic cap and fixed caps."""
    model, tokenizer, drafter = pair
    for text in CODE:
        prompt = mx.array(tokenizer.encode(text), dtype=mx.uint32)
        expected = plain_tokens(model, prompt, 64)
        got = [int(t) for t, _, _ in speculative_generate_step(prompt, model, drafter, num_draft_tokens=cap,
                                                              max_tokens=64)]
        assert got == expected, (text, cap)


@pytest.mark.slow
def test_shipped_drafter_is_trained(pair):
    """A trained drafter keeps several drafts per round on the demo's code
    prompts (measured 3.0 at the full block; a random drafter: 1.0)."""
    model, tokenizer, drafter = pair
    accepted = rounds = 0
    for text in demo.PROMPTS:
        prompt = mx.array(tokenizer.encode(text), dtype=mx.uint32)
        for _ in speculative_generate_step(prompt, model, drafter, num_draft_tokens=drafter.max_drafts,
                                           max_tokens=96):
            pass
        accepted, rounds = accepted + last_stats(drafter).accepted, rounds + last_stats(drafter).rounds
    tau = (accepted + rounds) / rounds
    assert tau >= 2.5, f"code τ {tau:.2f}: the shipped drafter looks untrained"


def test_demo_command(capsys):
    results = demo.run(["--prompt", "def main():\n", "--max-tokens", "48", "--no-color"])
    out = capsys.readouterr().out
    assert results["overall"]["identical"]
    assert "identical: yes" in out and "τ" in out and "speed-up" in out
    assert results["prompts"][0]["tokens"] == 48


def test_demo_missing_pair_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.run(["--pair", str(tmp_path)])
    assert "demo pair is incomplete" in capsys.readouterr().err


def test_demo_with_a_mismatched_or_damaged_pair_says_why_in_one_line(tmp_path, capsys):
    """The demo target with a tiny drafter is named as a mismatch (not a
    tokenizer problem); a damaged drafter config names the file."""
    import shutil

    from mlx_lm_dspark_tools.tiny import build_pair

    target_dir, _ = demo.pair_paths()
    _, tiny_drafter = build_pair(tmp_path / "tiny", family="qwen3")
    mixed = tmp_path / "mixed"
    shutil.copytree(target_dir, mixed / "target")
    shutil.copytree(tiny_drafter, mixed / "drafter")
    with pytest.raises(SystemExit) as caught:
        demo.run(["--pair", str(mixed)])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and "Traceback" not in err
    assert "does not match the target model" in err and "vocab_size: drafter 512" in err
    assert "tokenizer" not in err

    (mixed / "drafter" / "config.json").write_text('{"block_size": 7,')
    with pytest.raises(SystemExit):
        demo.run(["--pair", str(mixed)])
    assert "config.json is not valid JSON" in capsys.readouterr().err


@pytest.mark.slow
def test_reproduction_script_smoke(tmp_path):
    """The whole reproduction pipeline at toy sizes (a few corpus files, a
    two-layer target, a few steps): it writes a pair the demo runs losslessly."""
    spec = importlib.util.spec_from_file_location("make_demo_pair", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "pair"
    script.main(["--out", str(out), "--work", str(tmp_path / "work"), "--max-files", "8", "--vocab-size", "320",
                 "--hidden-size", "64", "--num-layers", "2", "--target-iters", "3", "--target-batch", "2",
                 "--target-seq", "32", "--drafter-iters", "2", "--drafter-batch", "2", "--drafter-seq", "64",
                 "--anchors", "4", "--drafter-layers", "1", "--markov-rank", "8"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["corpus"]["files"] == 8 and manifest["corpus"]["held_out_files"] == 1
    assert manifest["tokens"]["train"] > 0 and len(manifest["drafter"]["held_out"]) >= 1
    results = demo.run(["--pair", str(out), "--prompt", "def f(x):\n", "--max-tokens", "24", "--no-color"])
    assert results["overall"]["identical"]
    # --drafter-only retrains just the drafter for the target already there.
    target_weights = (out / "target" / "model.safetensors").read_bytes()
    script.main(["--out", str(out), "--work", str(tmp_path / "work"), "--max-files", "8", "--drafter-only",
                 "--drafter-iters", "1", "--drafter-batch", "2", "--drafter-seq", "64", "--anchors", "4",
                 "--drafter-layers", "1", "--markov-rank", "0"])
    assert (out / "target" / "model.safetensors").read_bytes() == target_weights
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["markov_rank"] == 0 and manifest["settings"]["drafter_iters"] == 1
    assert demo.run(["--pair", str(out), "--prompt", "x = ", "--max-tokens", "16", "--no-color"])["overall"]["identical"]
