"""The drafter network against DeepSeek's reference (golden fixtures, fp32)."""

import json

import mlx.core as mx
import pytest

from mlx_lm_dspark.config import drafter_args
from mlx_lm_dspark.drafter import Drafter, ModelArgs

FIXTURES = ["qwen3_tiny_dspark", "gemma4_tiny_dspark", "gemma4_kv_tiny_dspark", "qwen3_tiny_dflash"]
# Observed max abs errors are <= 1.2e-5 (block hidden of gemma4_kv) and
# <= 8.1e-6 for logits; the bounds sit a few times above that.
ATOL = {"hidden": 5e-5, "base_logits": 3e-5, "corrected_logits": 3e-5, "confidence_logits": 1e-5}


def load_fixture(root, name):
    config = json.loads((root / name / "config.json").read_text())
    drafter = Drafter(ModelArgs.from_dict(drafter_args(config)))
    drafter.load_weights(list(mx.load(str(root / name / "model.safetensors")).items()), strict=True)
    io = mx.load(str(root / name / "io_two_rounds.safetensors"))
    return drafter, io


def run_round(drafter, cache, io, r):
    get = lambda key: io[f"{r}.{key}"]
    drafter.add_context(cache, get("ctx_feat"), get("ctx_pos")[0].item())
    assert get("ctx_pos").tolist() == list(range(get("ctx_pos")[0].item(), get("ctx_pos")[-1].item() + 1))
    block = get("block_ids")[0]
    assert block[1:].tolist() == [drafter.args.mask_token_id] * (block.size - 1)
    return drafter.draft_block(cache, block[:1], get("block_pos")[0].item(), drafter.max_drafts), get


@pytest.mark.parametrize("name", FIXTURES)
def test_two_rounds_match_reference(fixtures_dir, name):
    drafter, io = load_fixture(fixtures_dir, name)
    cache = drafter.make_cache()
    dspark = "round0.corrected_logits" in io
    assert (drafter.args.markov_rank > 0) == dspark
    for r in ("round0", "round1"):
        before = cache[0].offset
        out, get = run_round(drafter, cache, io, r)
        # Only the newly committed positions are projected into the context.
        assert cache[0].offset == before + get("ctx_feat").shape[1]
        checks = {"hidden": (out["hidden"], get("block_hidden")),
                  "base_logits": (out["base_logits"], get("base_logits"))}
        if dspark:
            checks["corrected_logits"] = (out["corrected_logits"], get("corrected_logits")[0])
            checks["confidence_logits"] = (out["confidence_logits"], get("confidence_logits")[0])
        else:
            assert out["confidence_logits"] is None
        for key, (ours, ref) in checks.items():
            err = mx.abs(ours - ref).max().item()
            assert err < ATOL[key], f"{name} {r} {key}: max abs error {err:.2e}"
        assert out["tokens"].tolist() == get("greedy_tokens")[0].tolist()


@pytest.mark.parametrize("name", ["qwen3_tiny_dspark", "gemma4_tiny_dspark"])
def test_propose_is_a_prefix_of_the_full_block(fixtures_dir, name):
    drafter, io = load_fixture(fixtures_dir, name)
    cache = drafter.make_cache()
    drafter.add_context(cache, io["round0.ctx_feat"], 0)
    anchor, start = io["round0.block_ids"][0, :1], io["round0.block_pos"][0].item()
    full, conf, _ = drafter.propose(cache, anchor, start, drafter.max_drafts)
    for n in range(drafter.max_drafts + 1):
        tokens, c, _ = drafter.propose(cache, anchor, start, n)
        assert tokens.tolist() == full[:n].tolist()
        assert mx.allclose(c, conf[:n]).item()
    assert mx.allclose(conf, mx.sigmoid(io["round0.confidence_logits"][0]), atol=1e-5).item()
    assert cache[0].offset == io["round0.ctx_feat"].shape[1]  # proposing never writes the cache


def test_block_size_policy(fixtures_dir):
    drafter, _ = load_fixture(fixtures_dir, "qwen3_tiny_dspark")
    assert drafter.block_size == drafter.max_drafts == 7
    drafter.block_size = 3
    assert drafter.max_drafts == 3
    for bad in (0, 8):
        with pytest.raises(ValueError, match="block_size"):
            drafter.block_size = bad


def test_borrowed_embeddings_and_shifted_alignment(fixtures_dir):
    """z-lab layout: embeddings/head from the target, anchor slot dropped."""
    drafter, io = load_fixture(fixtures_dir, "qwen3_tiny_dflash")
    config = drafter_args(json.loads((fixtures_dir / "qwen3_tiny_dflash" / "config.json").read_text()))
    borrower = Drafter(ModelArgs.from_dict({**config, "has_embeddings": False, "shifted_alignment": True}))
    weights = dict(mx.load(str(fixtures_dir / "qwen3_tiny_dflash" / "model.safetensors")))
    embed, head = weights.pop("embed_tokens.weight"), weights.pop("lm_head.weight")
    borrower.load_weights(list(weights.items()), strict=True)
    assert "embed_tokens" not in borrower and "lm_head" not in borrower
    cache = borrower.make_cache()
    with pytest.raises(RuntimeError, match="borrow"):
        borrower.propose(cache, mx.array([3]), 0, 1)
    borrower.borrow_embeddings(lambda ids: embed[ids], lambda h: h @ head.T)
    assert borrower.max_drafts == drafter.max_drafts - 1
    from mlx.utils import tree_flatten

    assert not any("embed" in k or "lm_head" in k for k, _ in tree_flatten(borrower.parameters()))

    ref_cache, cache = drafter.make_cache(), borrower.make_cache()
    for c, d in ((ref_cache, drafter), (cache, borrower)):
        d.add_context(c, io["round0.ctx_feat"], 0)
    anchor, start = io["round0.block_ids"][0, :1], io["round0.block_pos"][0].item()
    ref = drafter.draft_block(ref_cache, anchor, start, 7)
    out = borrower.draft_block(cache, anchor, start, 6)
    assert mx.allclose(out["base_logits"], ref["base_logits"], atol=1e-5).item()
    # Shifted: draft k comes from slot k+1.
    assert out["tokens"].tolist() == mx.argmax(ref["base_logits"][0, 1:], axis=-1).tolist()


def test_sliding_window_drafter_layers(fixtures_dir):
    """A sliding layer sees only context inside its window: features outside
    it cannot change the block, and a window covering everything is full attention."""
    config = drafter_args(json.loads((fixtures_dir / "qwen3_tiny_dspark" / "config.json").read_text()))
    weights = list(mx.load(str(fixtures_dir / "qwen3_tiny_dspark" / "model.safetensors")).items())

    def build(window):
        d = Drafter(ModelArgs.from_dict({**config, "layer_types": ["sliding_attention"] * 2,
                                         "sliding_window": window}))
        d.load_weights(weights, strict=True)
        return d

    mx.random.seed(0)
    features = mx.random.normal((1, 20, 3 * 64))
    anchor = mx.array([17])

    def block(drafter, feats):
        cache = drafter.make_cache()
        drafter.add_context(cache, feats, 0)
        return drafter.draft_block(cache, anchor, 20, 7)["base_logits"]

    full, _ = load_fixture(fixtures_dir, "qwen3_tiny_dspark")
    assert mx.allclose(block(build(64), features), block(full, features), atol=1e-5).item()
    # Window 6: the last block slot (position 26) sees positions >= 21 only, slot 0 sees >= 15.
    narrow = build(6)
    perturbed = features.at[:, :15].add(5.0)
    assert mx.allclose(block(narrow, perturbed), block(narrow, features), atol=1e-5).item()
    assert not mx.allclose(block(full, perturbed), block(full, features), atol=1e-3).item()
