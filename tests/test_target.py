import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import ArraysCache, CacheList, KVCache, QuantizedKVCache, RotatingKVCache

from mlx_lm_dspark import early as early_start
from mlx_lm_dspark import load_drafter
from mlx_lm_dspark.target import (
    DrafterMismatchError,
    TargetAdapter,
    UnsupportedCacheError,
    UnsupportedTargetError,
    check_rollback,
    rollback,
    single_step_masks,
    validate_pair,
)
from mlx_lm_dspark_tools.tiny import build_pair


@pytest.fixture(scope="module", params=["qwen3", "gemma4"])
def pair(request, tmp_path_factory):
    target_dir, drafter_dir = build_pair(tmp_path_factory.mktemp(request.param), family=request.param)
    model, _ = mlx_lm.load(str(target_dir))
    return model, load_drafter(drafter_dir, bits=None)


def test_taps_keep_names_and_outputs(pair):
    model, _ = pair
    tokens = mx.array([[5, 9, 33, 4, 70]])
    names = [k for k, _ in tree_flatten(model.parameters())]
    before = model(tokens)
    n = len(model.layers)
    target = TargetAdapter(model, [1, n - 1])
    logits, features = target(tokens, cache=None)
    assert [k for k, _ in tree_flatten(model.parameters())] == names
    assert mx.array_equal(logits, before)
    assert mx.array_equal(model(tokens), before)
    assert features.shape == (1, 5, 2 * target.hidden_size)
    # The last tap is the residual stream the final norm and head turn into logits.
    inner = getattr(model, "language_model", model)
    last = features[..., target.hidden_size :]
    head = inner.lm_head if hasattr(inner, "lm_head") else inner.model.embed_tokens.as_linear
    recomputed = head(inner.model.norm(last))
    if getattr(inner, "final_logit_softcapping", None):
        cap = inner.final_logit_softcapping
        recomputed = mx.tanh(recomputed / cap) * cap
    assert mx.allclose(recomputed, logits, atol=1e-5)


def test_starting_early_changes_no_value_and_stays_out_of_transforms(pair, monkeypatch):
    model, _ = pair
    monkeypatch.setattr(early_start, "overlaps", lambda: True)  # as on a GPU: the CPU backend skips them
    target = TargetAdapter(model, [0, len(model.layers) - 1])
    tokens = mx.array([[5, 9, 33, 4, 70]])
    cache, early_cache = target.make_cache(), target.make_cache()
    late = target(tokens, cache)
    early = target(tokens, early_cache, start_early=True)
    assert all(mx.array_equal(a, b) for a, b in zip(late, early))
    assert all(mx.array_equal(a, b) for c, e in zip(cache, early_cache) for a, b in zip(c.state, e.state))

    # The default evaluates nothing, so the adapter runs inside a transformation
    # whose traced arrays reach the forward (training may share weights with it).
    def loss(early):
        logits, _ = target(tokens, None, start_early=early)
        return logits.astype(mx.float32).sum()

    value, grads = nn.value_and_grad(model, lambda: loss(False))()
    assert value.item() == pytest.approx(late[0].astype(mx.float32).sum().item(), rel=1e-3)
    with pytest.raises(ValueError, match="transformation"):
        nn.value_and_grad(model, lambda: loss(True))()


def test_validate_pair_names_the_field(pair):
    model, drafter = pair
    target = TargetAdapter(model, drafter.target_layer_ids)
    validate_pair(drafter, target)
    for field, value, message in [
        ("vocab_size", drafter.args.vocab_size + 1, "vocab_size"),
        ("hidden_size", drafter.args.hidden_size * 2, "hidden_size"),
        ("num_target_layers", target.num_layers + 4, "num_target_layers"),
        ("family", "gemma4" if drafter.args.family == "qwen3" else "qwen3", "family"),
    ]:
        original = getattr(drafter.args, field)
        setattr(drafter.args, field, value)
        try:
            with pytest.raises(DrafterMismatchError, match=message):
                validate_pair(drafter, target)
        finally:
            setattr(drafter.args, field, original)
    beyond = TargetAdapter(model, [0, target.num_layers])
    with pytest.raises(DrafterMismatchError, match="out of range"):
        beyond(mx.array([[1]]), None)


def test_tap_minus_one_is_the_embedding_output(pair):
    """DeepSpec's tap -1: the state entering layer 0, i.e. the embedding
    output (Gemma-4's times its scale sqrt(H), as transformers' scaled
    embedding returns it)."""
    model, _ = pair
    tokens = mx.array([[5, 9, 33, 4]])
    target = TargetAdapter(model, [-1, 2])
    _, features = target(tokens, cache=None)
    H = target.hidden_size
    inner = getattr(model, "language_model", model)
    embedded = inner.model.embed_tokens(tokens)
    if target.family == "gemma4":
        embedded = embedded * inner.model.embed_scale
    assert mx.array_equal(features[..., :H], embedded)
    assert mx.array_equal(features[..., H:], TargetAdapter(model, [2])(tokens, None)[1])
    with pytest.raises(DrafterMismatchError, match="out of range: \\[-2\\]"):
        TargetAdapter(model, [-2])(tokens, None)


class _NoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.args = {"model_type": "mystery", "vocab_size": 8, "hidden_size": 4}
        self.blocks = [nn.Linear(4, 4)]

    def __call__(self, tokens, cache=None):
        return tokens


class _PlainLayers(_NoLayers):
    @property
    def layers(self):
        return [lambda x: x]


@pytest.mark.parametrize("model,reason", [(_NoLayers(), "exposes no `layers`"),
                                          (_PlainLayers(), r"layers\[0\] is a function, not a callable mlx Module")])
def test_a_model_whose_layers_cannot_be_tapped_is_refused_in_one_line(model, reason):
    with pytest.raises(UnsupportedTargetError, match=reason) as caught:
        TargetAdapter(model, [0])
    assert "\n" not in str(caught.value) and "Not a target mlx-lm-dspark can run" in str(caught.value)


def test_a_zlab_drafter_serves_a_gemma4_target(tmp_path):
    """z-lab's Gemma-4 drafters are Qwen3-style networks that borrow the
    target's embedding and head: the family check lets them pass, while a
    DeepSpec Qwen3 drafter (with its own embeddings) is still refused."""
    target_dir, _ = build_pair(tmp_path / "g", family="gemma4")
    _, zlab_dir = build_pair(tmp_path / "q", family="qwen3", layout="zlab", tie_word_embeddings=True)
    _, deepspec_dir = build_pair(tmp_path / "d", family="qwen3")
    model, _ = mlx_lm.load(str(target_dir))
    zlab, deepspec = load_drafter(zlab_dir, bits=None), load_drafter(deepspec_dir, bits=None)
    validate_pair(zlab, TargetAdapter(model, zlab.target_layer_ids))
    with pytest.raises(DrafterMismatchError, match="family: drafter is for qwen3, target is gemma4"):
        validate_pair(deepspec, TargetAdapter(model, deepspec.target_layer_ids))


def test_a_drafter_for_another_model_is_told_every_difference(tmp_path):
    """Taps out of range do not hide the vocabulary and width: a drafter for
    another model is named as such, all differences in one line."""
    from mlx_lm_dspark_tools.tiny import build_pair

    small_target, _ = build_pair(tmp_path / "small", family="qwen3", hidden_size=32, vocab_size=256,
                                 num_layers=4, target_layer_ids=(1, 2))
    _, big_drafter = build_pair(tmp_path / "big", family="qwen3", target_layer_ids=(1, 3, 5))
    model, _ = mlx_lm.load(str(small_target))
    drafter = load_drafter(big_drafter, bits=None)
    with pytest.raises(DrafterMismatchError) as caught:
        validate_pair(drafter, TargetAdapter(model, drafter.target_layer_ids))
    text = str(caught.value)
    assert "\n" not in text
    for part in ("vocab_size: drafter 512, target 256", "hidden_size: drafter 64, target 32",
                 "num_target_layers: drafter expects 8, target has 4", "out of range: [5]"):
        assert part in text


def test_recurrent_state_needs_an_attention_cache_beside_it():
    """Recurrent state is rolled back by recurrent.py (tests/test_recurrent.py);
    the attention caches count the positions, so a target of recurrent state
    only is refused with the reason."""
    check_rollback([KVCache(), ArraysCache(2)])
    check_rollback([CacheList(KVCache(), ArraysCache(1))])
    check_rollback([KVCache(), QuantizedKVCache(), RotatingKVCache(8), CacheList(KVCache())])
    with pytest.raises(UnsupportedCacheError, match="recurrent state"):
        check_rollback([ArraysCache(2), CacheList(ArraysCache(1))])


def _attend(q, kv):
    k, v = kv
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0)


@pytest.mark.parametrize("prefix", [3, 12, 30])
def test_rotating_rollback_after_wrap(prefix):
    """Rejected keys must vanish, also for the single-token update that follows
    (mlx-lm's own trim() leaves them visible there once the window wrapped)."""
    mx.random.seed(prefix)
    window, accepted, rejected = 8, 2, 3
    keys = mx.random.normal((1, 1, prefix + accepted + rejected + 1, 4))
    q = mx.random.normal((1, 1, 1, 4))

    def run(cache, chunks):
        out = None
        for a, b in chunks:
            out = cache.update_and_fetch(keys[:, :, a:b], keys[:, :, a:b])
        return out

    end = prefix + accepted
    reference = RotatingKVCache(window)
    run(reference, [(0, prefix), (prefix, end)])
    want = _attend(q, reference.update_and_fetch(*(keys[:, :, -1:],) * 2))

    ours = RotatingKVCache(window)
    run(ours, [(0, prefix), (prefix, end + rejected)])
    rollback([ours], rejected)
    assert ours.offset == end
    got = _attend(q, ours.update_and_fetch(*(keys[:, :, -1:],) * 2))
    assert mx.allclose(got, want, atol=1e-6)

    if prefix >= window:  # the defect needs a wrapped window
        stock = RotatingKVCache(window)
        run(stock, [(0, prefix), (prefix, end + rejected)])
        stock.trim(rejected)
        kv = stock.update_and_fetch(*(keys[:, :, -1:],) * 2)
        assert not mx.allclose(_attend(q, kv), want, atol=1e-6)


def test_rollback_plain_and_quantized():
    for cache in (KVCache(), QuantizedKVCache(group_size=32, bits=8)):
        cache.update_and_fetch(mx.zeros((1, 1, 10, 32)), mx.zeros((1, 1, 10, 32)))
        rollback([cache], 4)
        assert cache.offset == 6


@pytest.mark.parametrize("prefix,block", [(6, 5), (9, 3), (14, 6), (30, 8)])
def test_verify_over_a_rotating_cache_with_keep_sees_what_single_steps_see(prefix, block):
    """A rotating cache with keep > 0 (``make_prompt_cache(model,
    max_kv_size=W)``): a block's logits under ``single_step_masks`` equal
    single-token steps', before, across and after wrap-around, and a later
    block after rollback still does (mlx-lm's own window mask drops the kept
    positions for all but the first query)."""
    from mlx_lm_dspark_tools.tiny import make_qwen3_target

    model, _ = make_qwen3_target(num_layers=2, head_dim=32)
    window, keep = 10, 4
    tokens = mx.array([[(11 * i + 5) % 400 + 3 for i in range(prefix + 2 * block)]])

    def cache():
        c = [RotatingKVCache(window, keep) for _ in model.layers]
        model(tokens[:, : prefix - 1], cache=c)
        model(tokens[:, prefix - 1 : prefix], cache=c)
        return c

    def single_steps(c, start, n):
        return mx.concatenate([model(tokens[:, p : p + 1], cache=c) for p in range(start, start + n)], axis=1)

    plain = cache()
    want = single_steps(plain, prefix, 2 * block)
    ours = cache()
    with single_step_masks(ours, block + 2):
        first = model(tokens[:, prefix : prefix + block + 2], cache=ours)
    rollback(ours, 2)
    with single_step_masks(ours, block):
        second = model(tokens[:, prefix + block : prefix + 2 * block], cache=ours)
    got = mx.concatenate([first[:, :block], second], axis=1)
    assert mx.allclose(got, want, atol=1e-5), mx.abs(got - want).max()
    assert not hasattr(ours[0], "make_mask") or "make_mask" not in vars(ours[0])  # the host's again

    if prefix + block + 2 > window:  # the host's mask differs once a block wraps
        stock = cache()
        assert not mx.allclose(model(tokens[:, prefix : prefix + block + 2], cache=stock)[:, :block],
                               want[:, :block], atol=1e-3)
