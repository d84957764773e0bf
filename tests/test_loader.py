import json
import shutil

import mlx.nn as nn
import mlx_lm
import pytest

from mlx_lm_dspark import loader
from mlx_lm_dspark.loader import DrafterTokenizer, load_drafter


def _config(path):
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("layout,kind", [("deepspec", "dspark"), ("dflash_config", "dspark"),
                                         ("zlab", "dflash"), ("dflash", "dflash")])
def test_load_drafter_layouts_and_quantization(qwen3_dirs, layout, kind):
    _, drafter_dir = qwen3_dirs[layout]
    full = load_drafter(drafter_dir, bits=None)
    assert full.kind == kind
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in full.named_modules())
    quantized = load_drafter(drafter_dir)  # default: 4-bit
    q = [m for _, m in quantized.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert q and all(m.bits == 4 for m in q)
    eight = load_drafter(drafter_dir, bits=8, group_size=32)
    assert all(m.bits == 8 for _, m in eight.named_modules() if isinstance(m, nn.QuantizedLinear))


def test_run_time_policy(qwen3_dirs):
    _, drafter_dir = qwen3_dirs["deepspec"]
    drafter = load_drafter(drafter_dir, block_size=3, confidence_threshold=0.4)
    assert drafter.block_size == 3 and drafter.confidence_threshold == 0.4
    for bad in (0, drafter.args.block_size + 1):
        with pytest.raises(loader.DrafterOptionError, match=f"block_size {bad} .* from 1 to {drafter.args.block_size}"):
            load_drafter(drafter_dir, block_size=bad)
    with pytest.raises(loader.DrafterOptionError, match=r"\[0, 1\]"):
        load_drafter(drafter_dir, confidence_threshold=1.5)


def _bits_of(drafter):
    return {(m.bits, m.group_size) for _, m in drafter.named_modules() if isinstance(m, nn.QuantizedLinear)}


def test_bits_requantize_a_quantized_drafter(qwen3_dirs, tmp_path):
    """A drafter stored 4-bit: kept as stored by default and with None, other
    bits re-quantize it (dequantized first), unsupported bits are refused."""
    from mlx.utils import tree_flatten

    _, drafter_dir = qwen3_dirs["deepspec"]
    stored = load_drafter(drafter_dir, bits=4, group_size=32)
    out = tmp_path / "q4"
    out.mkdir()
    import mlx.core as mx

    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(stored.parameters())))
    config = _config(drafter_dir)
    config["quantization"] = {"bits": 4, "group_size": 32}
    (out / "config.json").write_text(json.dumps(config))

    assert _bits_of(load_drafter(out)) == {(4, 32)}
    assert _bits_of(load_drafter(out, bits=None)) == {(4, 32)}
    assert _bits_of(load_drafter(out, bits=4)) == {(4, 32)}  # the stored group size is kept
    assert _bits_of(load_drafter(out, bits=8)) == {(8, 32)}
    assert _bits_of(load_drafter(out, bits=3, group_size=64)) == {(3, 64)}
    for bad in (0, 7, 9):
        with pytest.raises(loader.DrafterOptionError, match="1, 2, 3, 4, 5, 6, 8 bits"):
            load_drafter(out, bits=bad)


def test_mlx_lm_load_builds_drafter_with_tokenizer_stand_in(qwen3_dirs):
    target_dir, drafter_dir = qwen3_dirs["deepspec"]
    _, tokenizer = mlx_lm.load(str(target_dir))
    drafter, draft_tokenizer = mlx_lm.load(str(drafter_dir))
    assert drafter.kind == "dspark"
    assert isinstance(draft_tokenizer, DrafterTokenizer)
    # mlx_lm.generate's own vocabulary check passes for the right target ...
    assert not (draft_tokenizer.vocab_size != tokenizer.vocab_size)
    # ... but the stand-in never pretends to be a tokenizer.
    with pytest.raises(AttributeError, match="no tokenizer of its own"):
        draft_tokenizer.encode("hello")
    # A drafter has no tokenizer to compare: mlx-lm's check passes for any
    # target, and binding names the real difference (see test_target).
    assert not (draft_tokenizer.vocab_size != drafter.args.vocab_size + 1)
    # Ordinary checkpoints still go to mlx-lm's loader untouched.
    model, _ = mlx_lm.load(str(target_dir))
    assert type(model).__module__ == "mlx_lm.models.qwen3"


def test_clear_errors_for_bad_checkpoints(qwen3_dirs, tmp_path):
    target_dir, drafter_dir = qwen3_dirs["deepspec"]
    with pytest.raises(loader.DrafterOptionError, match="not a DSpark/DFlash drafter"):
        load_drafter(target_dir)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_drafter(tmp_path)
    broken = tmp_path / "no-weights"
    broken.mkdir()
    shutil.copy(drafter_dir / "config.json", broken / "config.json")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_drafter(broken)
    wrong = tmp_path / "wrong-weights"
    wrong.mkdir()
    config = _config(drafter_dir)
    config["intermediate_size"] *= 2
    (wrong / "config.json").write_text(json.dumps(config))
    shutil.copy(drafter_dir / "model.safetensors", wrong / "model.safetensors")
    with pytest.raises(loader.DrafterConfigError, match="do not match"):
        load_drafter(wrong)


def test_load_defaults_feed_mlx_lm_load(qwen3_dirs, monkeypatch):
    _, drafter_dir = qwen3_dirs["deepspec"]
    monkeypatch.setitem(loader.load_defaults, "block_size", 2)
    monkeypatch.setitem(loader.load_defaults, "bits", None)
    drafter, _ = mlx_lm.load(str(drafter_dir))
    assert drafter.block_size == 2
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in drafter.named_modules())


def test_hub_repo_ids_go_through_mlx_lm_download(qwen3_dirs, tmp_path):
    """A repo id resolves through mlx-lm's download helper (the HF cache);
    offline, with the snapshot already cached, nothing is fetched."""
    import os
    import subprocess
    import sys

    _, drafter_dir = qwen3_dirs["deepspec"]
    repo = tmp_path / "hub" / "models--deepseek-ai--dspark_tiny_block7"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(drafter_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    code = (
        "import mlx_lm, mlx_lm_dspark\n"
        "d = mlx_lm_dspark.load_drafter('deepseek-ai/dspark_tiny_block7')\n"
        "m, t = mlx_lm.load('deepseek-ai/dspark_tiny_block7')\n"
        "print(d.kind, type(m).__name__, d.source.endswith('0' * 40))\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["dspark", "Drafter", "True"]
