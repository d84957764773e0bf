"""The drafter network against DeepSeek's reference (golden fixtures, fp32)."""

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_lm_dspark.drafter import Drafter, ModelArgs

FIXTURES = ["qwen3_tiny_dspark", "gemma4_tiny_dspark", "gemma4_kv_tiny_dspark", "qwen3_tiny_dflash"]
FAMILIES = {"Qwen3DSparkModel": "qwen3", "Gemma4DSparkModel": "gemma4"}

# Max abs errors observed (CPU, fp32) over both rounds of all fixtures:
# block hidden 1.1e-5 (gemma4_kv), base logits 8.1e-6, corrected logits 7.8e-6,
# confidence logits 2.7e-6 (magnitudes ~1-5).  Bounds sit ~4x above.
ATOL = {"block_hidden": 5e-5, "base_logits": 3e-5, "corrected_logits": 3e-5, "confidence_logits": 1e-5}


@pytest.fixture(scope="module")
def root(fixtures_dir) -> Path:
    # conftest resolves <repo>/../shared/fixtures/deepspec (env-overridable).
    return fixtures_dir


def deepspec_args(config: dict, **overrides) -> dict:
    """ModelArgs dict of a DeepSpec-layout config.json (built here so these
    tests do not depend on the config module)."""
    args = dict(config, family=FAMILIES[config["architectures"][0]])
    if args["family"] == "qwen3":
        args["rope_theta"] = config["rope_parameters"]["rope_theta"]
    return {**args, **overrides}


def weights_of(root, name) -> dict:
    return dict(mx.load(str(root / name / "model.safetensors")))


def build(root, name, weights=None, **overrides) -> Drafter:
    config = json.loads((root / name / "config.json").read_text())
    drafter = Drafter(ModelArgs.from_dict(deepspec_args(config, **overrides)))
    weights = weights_of(root, name) if weights is None else weights
    drafter.load_weights(list(weights.items()), strict=True)
    return drafter


def io_of(root, name) -> dict:
    return mx.load(str(root / name / "io_two_rounds.safetensors"))


def first(x: mx.array) -> int:
    return int(x.reshape(-1)[0].item())


@pytest.mark.parametrize("name", FIXTURES, ids=FIXTURES)
def test_two_rounds_match_reference(root, name):
    drafter, io = build(root, name), io_of(root, name)
    dspark = "round0.corrected_logits" in io
    assert (drafter.args.markov_rank > 0) == dspark
    cache = drafter.make_cache()
    for r in ("round0", "round1"):
        get = lambda key: io[f"{r}.{key}"]
        ctx_pos, block_pos, block_ids = get("ctx_pos"), get("block_pos"), get("block_ids")
        assert ctx_pos.tolist() == list(range(first(ctx_pos), first(ctx_pos) + ctx_pos.size))
        assert block_ids[0, 1:].tolist() == [drafter.args.mask_token_id] * (block_ids.shape[1] - 1)
        before = cache[0].offset
        drafter.add_context(cache, get("ctx_feat"), first(ctx_pos))
        assert [c.offset for c in cache] == [before + ctx_pos.size] * len(cache)

        start = first(block_pos)
        hidden = drafter.block_hidden(cache, block_ids, start)
        out = drafter.draft_block(cache, block_ids[0, :1], start, drafter.max_drafts)
        assert mx.array_equal(out["hidden"], hidden)
        checks = {
            "block_hidden": (hidden, get("block_hidden")),
            "base_logits": (drafter.base_logits(hidden), get("base_logits")),
        }
        if dspark:
            checks["corrected_logits"] = (out["corrected_logits"], get("corrected_logits")[0])
            checks["confidence_logits"] = (out["confidence_logits"], get("confidence_logits")[0])
        else:
            assert out["confidence_logits"] is None
            assert mx.array_equal(out["corrected_logits"], out["base_logits"][0])
        for key, (ours, ref) in checks.items():
            assert ours.shape == ref.shape, key
            err = mx.abs(ours - ref).max().item()
            assert err < ATOL[key], f"{name} {r} {key}: max abs error {err:.2e}"
        assert out["tokens"].dtype == mx.uint32
        assert out["tokens"].tolist() == get("greedy_tokens")[0].tolist()
        # Block K/V never enter the context cache.
        assert cache[0].offset == before + ctx_pos.size


@pytest.mark.parametrize("name", FIXTURES, ids=FIXTURES)
def test_add_context_projects_only_new_positions(root, name):
    """Context added in pieces equals context added at once, and earlier
    rows stay untouched (nothing is re-projected)."""
    drafter, io = build(root, name), io_of(root, name)
    feats = mx.concatenate([io["round0.ctx_feat"], io["round1.ctx_feat"]], axis=1)
    whole, pieces = drafter.make_cache(), drafter.make_cache()
    drafter.add_context(whole, feats, 0)
    drafter.add_context(pieces, feats[:, :11], 0)
    kept = [(c.keys[..., :11, :], c.values[..., :11, :]) for c in pieces]
    mx.eval(kept)
    drafter.add_context(pieces, feats[:, 11:], 11)
    assert [c.offset for c in pieces] == [feats.shape[1]] * len(pieces)
    for c, w, (k, v) in zip(pieces, whole, kept):
        assert mx.array_equal(c.keys[..., :11, :], k) and mx.array_equal(c.values[..., :11, :], v)
        assert mx.allclose(c.keys[..., : c.offset, :], w.keys[..., : w.offset, :], atol=1e-6)
        assert mx.allclose(c.values[..., : c.offset, :], w.values[..., : w.offset, :], atol=1e-6)


@pytest.mark.parametrize("name", ["qwen3_tiny_dspark", "gemma4_tiny_dspark", "qwen3_tiny_dflash"])
def test_propose_is_a_prefix_of_the_full_block(root, name):
    drafter, io = build(root, name), io_of(root, name)
    cache = drafter.make_cache()
    drafter.add_context(cache, io["round0.ctx_feat"], 0)
    anchor, start = io["round0.block_ids"][0, :1], first(io["round0.block_pos"])
    full, conf, q = drafter.propose(cache, anchor, start, drafter.max_drafts)
    assert q is None and full.dtype == mx.uint32
    assert full.tolist() == io["round0.greedy_tokens"][0].tolist()
    if "round0.confidence_logits" in io:
        assert conf.dtype == mx.float32
        assert mx.allclose(conf, mx.sigmoid(io["round0.confidence_logits"][0]), atol=1e-5).item()
    else:
        assert conf is None
    for n in range(drafter.max_drafts + 1):
        tokens, c, _ = drafter.propose(cache, anchor, start, n)
        assert tokens.tolist() == full[:n].tolist()
        if conf is not None:
            assert mx.allclose(c, conf[:n]).item()
    for bad in (-1, drafter.max_drafts + 1):
        with pytest.raises(ValueError, match="num_drafts"):
            drafter.propose(cache, anchor, start, bad)
    assert cache[0].offset == io["round0.ctx_feat"].shape[1]  # proposing never writes the cache


def test_block_size_policy(root):
    drafter = build(root, "qwen3_tiny_dspark")
    assert drafter.block_size == drafter.max_drafts == 7
    assert drafter.confidence_threshold is None
    assert drafter.target_layer_ids == [1, 3, 5]
    drafter.block_size = 3
    assert drafter.max_drafts == 3
    cache = drafter.make_cache()
    drafter.add_context(cache, mx.zeros((1, 4, 3 * 64)), 0)
    out = drafter.draft_block(cache, mx.array([5]), 4)
    assert out["hidden"].shape == (1, 3, 64) and out["tokens"].shape == (3,)
    for bad in (0, 8):
        with pytest.raises(ValueError, match="block_size"):
            drafter.block_size = bad
    assert drafter.block_size == 3


@pytest.mark.parametrize("name", ["qwen3_tiny_dspark", "gemma4_tiny_dspark"])
def test_borrowed_embeddings_match_own(root, name):
    """z-lab layout: embeddings and head come from the target as callables."""
    weights = weights_of(root, name)
    own = build(root, name, weights)
    embed, head = weights.pop("embed_tokens.weight"), weights.pop("lm_head.weight")
    borrower = build(root, name, weights, has_embeddings=False)
    flat = dict(tree_flatten(borrower.parameters()))
    assert not any(k.startswith(("embed_tokens", "lm_head")) for k in flat)

    cache = borrower.make_cache()
    borrower.add_context(cache, io_of(root, name)["round0.ctx_feat"], 0)
    with pytest.raises(RuntimeError, match="borrow"):
        borrower.propose(cache, mx.array([17]), 11, 1)
    borrower.borrow_embeddings(lambda ids: embed[ids], lambda h: h @ head.T)
    assert dict(tree_flatten(borrower.parameters())).keys() == flat.keys()

    ref_cache = own.make_cache()
    own.add_context(ref_cache, io_of(root, name)["round0.ctx_feat"], 0)
    ours, ref = borrower.draft_block(cache, mx.array([17]), 11), own.draft_block(ref_cache, mx.array([17]), 11)
    for key in ("hidden", "base_logits", "corrected_logits", "confidence_logits"):
        assert mx.array_equal(ours[key], ref[key]), key
    assert ours["tokens"].tolist() == ref["tokens"].tolist()


def test_shifted_alignment_drops_the_anchor_slot(root):
    """z-lab DFlash: slot i predicts its own position, so draft k is slot k+1."""
    plain = build(root, "qwen3_tiny_dflash")
    shifted = build(root, "qwen3_tiny_dflash", shifted_alignment=True)
    assert (plain.max_drafts, shifted.max_drafts) == (7, 6)
    shifted.block_size = 4
    assert shifted.max_drafts == 3
    shifted.block_size = 7
    ctx = io_of(root, "qwen3_tiny_dflash")["round0.ctx_feat"]
    caches = plain.make_cache(), shifted.make_cache()
    for d, c in zip((plain, shifted), caches):
        d.add_context(c, ctx, 0)
    ref = plain.draft_block(caches[0], mx.array([17]), 11)
    out = shifted.draft_block(caches[1], mx.array([17]), 11)
    assert mx.array_equal(out["base_logits"], ref["base_logits"])
    assert out["tokens"].tolist() == mx.argmax(ref["base_logits"][0, 1:], axis=-1).tolist()
    assert mx.array_equal(out["corrected_logits"], ref["base_logits"][0, 1:])


def test_sliding_window_drafter_layers(root):
    """A sliding layer sees only context inside its window: features outside
    it cannot change the block, and a window covering everything is full attention."""
    sliding = {"layer_types": ["sliding_attention"] * 2}
    weights = weights_of(root, "qwen3_tiny_dspark")
    mx.random.seed(0)
    features = mx.random.normal((1, 20, 3 * 64))

    def block(drafter, feats):
        cache = drafter.make_cache()
        drafter.add_context(cache, feats, 0)
        return drafter.draft_block(cache, mx.array([17]), 20)["base_logits"]

    full = build(root, "qwen3_tiny_dspark", weights)
    wide = build(root, "qwen3_tiny_dspark", weights, sliding_window=64, **sliding)
    assert mx.allclose(block(wide, features), block(full, features), atol=1e-5).item()
    # Window 6: slot 0 (position 20) sees positions >= 15 only.
    narrow = build(root, "qwen3_tiny_dspark", weights, sliding_window=6, **sliding)
    perturbed = features.at[:, :15].add(5.0)
    assert mx.allclose(block(narrow, perturbed), block(narrow, features), atol=1e-5).item()
    assert not mx.allclose(block(full, perturbed), block(full, features), atol=1e-3).item()
    # ... but does see position 15.
    perturbed = features.at[:, 15].add(5.0)
    assert not mx.allclose(block(narrow, perturbed), block(narrow, features), atol=1e-3).item()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_causal_sliding_layers_see_no_later_block_slot(root, causal):
    """z-lab's sliding layers attend causally inside the block: slot k's
    state is what a block of k+1 slots computes.  A bidirectional layer's
    early slots read the later ones."""
    sliding = {"layer_types": ["sliding_attention"] * 2, "sliding_window": 64,
               "causal_layer_types": ["sliding_attention"] if causal else []}
    drafter = build(root, "qwen3_tiny_dspark", **sliding)
    mx.random.seed(1)
    features = mx.random.normal((1, 12, 3 * 64))

    def hidden(block):
        drafter.block_size = block
        cache = drafter.make_cache()
        drafter.add_context(cache, features, 0)
        return drafter.draft_block(cache, mx.array([17]), 12)["hidden"][0]

    whole, short = hidden(7), hidden(3)
    assert mx.allclose(whole[:3], short, atol=1e-5).item() == causal


def test_config_validation(root):
    config = deepspec_args(json.loads((root / "qwen3_tiny_dspark" / "config.json").read_text()))
    for overrides, match in (
        ({"family": "llama"}, "family"),
        ({"layer_types": ["full_attention"]}, "layer_types"),
        ({"layer_types": ["chunked_attention"] * 2}, "layer_types"),
    ):
        with pytest.raises(ValueError, match=match):
            ModelArgs.from_dict({**config, **overrides})


# DeepSpec's other Markov heads ("gated", "rnn"): no fixtures were released
# for them, so they are checked against DeepSpec's formulas written out here
# in numpy (deepspec/modeling/dspark/markov_head.py).

def _np_sigmoid(x):
    import numpy as np

    return 1.0 / (1.0 + np.exp(-x))


def _reference_bias(head_type, w, prev_emb, hidden):
    """DeepSpec's bias rows for one block: prev_emb [B, r], hidden [B, H]."""
    import numpy as np

    w2 = w["markov_head.markov_w2.weight"]
    if head_type == "gated":
        gate = _np_sigmoid(np.concatenate([hidden, prev_emb], -1) @ w["markov_head.gate_proj.weight"].T
                           + w["markov_head.gate_proj.bias"])
        return (gate * prev_emb) @ w2.T
    r = prev_emb.shape[-1]
    state, rows = np.zeros(r), []
    for k in range(prev_emb.shape[0]):
        z = np.concatenate([state, prev_emb[k], hidden[k]])
        g, c, o = np.split(z @ w["markov_head.joint_proj.weight"].T + w["markov_head.joint_proj.bias"], 3)
        g = _np_sigmoid(g)
        state = g * state + (1 - g) * np.tanh(c)
        rows.append(np.tanh(o) @ w2.T)
    return np.stack(rows)


def _with_head(root, name, head_type, seed=0):
    config = json.loads((root / name / "config.json").read_text())
    H, r = config["hidden_size"], config["markov_rank"]
    weights = weights_of(root, name)
    mx.random.seed(seed)
    if head_type == "gated":
        weights["markov_head.gate_proj.weight"] = mx.random.normal((r, H + r)) * (H + r) ** -0.5
        weights["markov_head.gate_proj.bias"] = 0.3 * mx.random.normal((r,))
    else:
        weights["markov_head.joint_proj.weight"] = mx.random.normal((3 * r, 2 * r + H)) * (2 * r + H) ** -0.5
        weights["markov_head.joint_proj.bias"] = 0.3 * mx.random.normal((3 * r,))
    return config, weights


@pytest.mark.parametrize("head_type", ["gated", "rnn"])
@pytest.mark.parametrize("name", ["qwen3_tiny_dspark", "gemma4_tiny_dspark"])
def test_gated_and_rnn_markov_heads_follow_deepspec(root, name, head_type):
    import numpy as np

    _, weights = _with_head(root, name, head_type)
    drafter = build(root, name, weights=weights, markov_head_type=head_type)
    io = io_of(root, name)
    cache = drafter.make_cache()
    drafter.add_context(cache, io["round0.ctx_feat"], first(io["round0.ctx_pos"]))
    anchor, start = io["round0.block_ids"][0, :1], first(io["round0.block_pos"])
    out = drafter.draft_block(cache, anchor, start, drafter.max_drafts)
    n = drafter.max_drafts
    prev = mx.concatenate([anchor.astype(mx.uint32), out["tokens"][:-1]])
    w = {k: np.array(v, dtype=np.float64) for k, v in weights.items() if k.startswith("markov_head")}
    emb = w["markov_head.markov_w1.weight"][np.array(prev)]
    hidden = np.array(out["hidden"][0, :n], dtype=np.float64)
    want = np.array(out["base_logits"][0, :n], dtype=np.float64) + _reference_bias(head_type, w, emb, hidden)
    err = np.abs(np.array(out["corrected_logits"], dtype=np.float64) - want).max()
    assert err < 1e-4, err
    assert out["tokens"].tolist() == np.argmax(want, axis=-1).tolist()
    # Training's teacher-forced heads give the same rows for the same tokens.
    corrected, _ = drafter.heads(out["base_logits"][:, :n], out["hidden"][:, :n], prev[None])
    assert mx.allclose(corrected[0], out["corrected_logits"], atol=1e-5).item()


def test_markov_head_types_from_config(root, tmp_path):
    import shutil

    from mlx_lm_dspark import load_drafter
    from mlx_lm_dspark.config import DrafterConfigError

    name = "qwen3_tiny_dspark"
    config, weights = _with_head(root, name, "rnn")
    out = tmp_path / "rnn"
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps({**config, "markov_head_type": "rnn"}))
    drafter = load_drafter(out, bits=None)
    assert drafter.args.markov_head_type == "rnn" and hasattr(drafter.markov_head, "joint_proj")
    missing = tmp_path / "gated"
    shutil.copytree(root / name, missing)
    (missing / "config.json").write_text(json.dumps({**config, "markov_head_type": "gated"}))
    with pytest.raises(DrafterConfigError, match="gate_proj"):  # the weights the type needs are named
        load_drafter(missing, bits=None)
    (missing / "config.json").write_text(json.dumps({**config, "markov_head_type": "lstm"}))
    with pytest.raises(DrafterConfigError, match="markov_head_type is 'lstm'.*'vanilla', 'gated', 'rnn'"):
        load_drafter(missing, bits=None)


@pytest.mark.parametrize("variant", ["deepspec", "zlab-sliding", "gemma4"])
def test_rows_proposed_in_one_forward_equal_each_row_proposed_alone(tmp_path, variant):
    """``propose_rows`` over left-padded batch caches (rows of different
    context lengths) drafts what ``propose`` drafts for each row alone,
    with the same confidences; a row of the batch that samples gets the q
    its ``choose`` returned."""
    from mlx_lm import load
    from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

    from mlx_lm_dspark.loader import load_drafter
    from mlx_lm_dspark.speculative import bind
    from mlx_lm_dspark_tools.tiny import build_pair

    family, kw = {"deepspec": ("qwen3", {}), "gemma4": ("gemma4", {}),
                  "zlab-sliding": ("qwen3", {"layout": "zlab", "drafter_sliding_window": 4,
                                             "num_drafter_layers": 3})}[variant]
    target_dir, drafter_dir = build_pair(tmp_path, family, **kw)
    model, _ = load(str(target_dir))
    drafter = load_drafter(str(drafter_dir))
    target = bind(drafter, model)
    rows, anchors = [], []
    for length in (3, 11, 6):
        tokens = mx.arange(5, 5 + length).astype(mx.uint32)
        _, features = target(tokens[None], make_prompt_cache(model))
        context = drafter.make_cache()
        drafter.add_context(context, features, 0, tokens)
        rows.append(context)
        anchors.append(mx.array([40 + length], mx.uint32))
    alone = [drafter.propose(c, a, c[0].offset, 4) for c, a in zip(rows, anchors)]
    batch = None
    for context in rows:
        merged = [BatchKVCache.merge([c]) for c in context]
        if batch is None:
            batch = merged
        else:
            for c, new in zip(batch, merged):
                c.extend(new)
    starts = mx.array([c[0].offset for c in rows])
    tokens, confidence, q = drafter.propose_rows(batch, mx.concatenate(anchors), starts, 4)
    assert q is None
    for i, (t, conf, _) in enumerate(alone):
        assert tokens[i].tolist() == t.tolist()
        if conf is not None:
            assert mx.allclose(confidence[i], conf, atol=1e-5)
    assert [c._idx for c in batch] == [11] * len(batch)  # the block left the contexts

    def choose(k, row):
        q_row = row - mx.logsumexp(row, axis=-1, keepdims=True)
        return mx.argmax(row, axis=-1).astype(mx.uint32), q_row

    _, _, q = drafter.propose_rows(batch, mx.concatenate(anchors), starts, 4, [None, choose, None])
    assert q.shape[:2] == (3, 4) and mx.all(mx.isfinite(q[1])).item()
