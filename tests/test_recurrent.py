"""Hybrid recurrent targets (Gated DeltaNet, short conv, Mamba-2 beside attention):
exact rollback of their ArraysCache state, and speculative decoding on them
equal to plain decoding.

Every family is a tiny random model built from mlx-lm's own classes; expected
tokens and states always come from the plain target itself.
"""

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.models.cache import ArraysCache, KVCache, make_prompt_cache

from mlx_lm_dspark import recurrent
from mlx_lm_dspark.speculative import speculative_generate_step
from mlx_lm_dspark.target import TargetAdapter, UnsupportedCacheError, cache_length, check_rollback, rollback, text_args
from conftest import _host_loads, plain_tokens
from mlx_lm_dspark_tools.oracle import OracleDrafter
from mlx_lm_dspark_tools.tiny import HYBRID_MODEL_TYPES, build_pair, make_hybrid_target
from decoding_checks import (BLOCK, MAX, PROMPT_LONG, PROMPT_SHORT, check_caps_and_max_tokens,
                             check_closed_generator_and_next_turn, check_concurrent_clients, check_oracle_pattern,
                             check_random_drafter,
                             check_server_conversation, check_stream_generate_with_the_automatic_cap,
                             check_trained_drafter, oracle, speculative)

FAMILIES = [
    pytest.param(t, marks=pytest.mark.skipif(not _host_loads(t), reason=f"the installed mlx-lm has no {t} model"))
    for t in HYBRID_MODEL_TYPES
]
DESIGNS = {"replay": recurrent.Replay, "stepwise": recurrent.Stepwise}
slow = pytest.mark.slow


@pytest.fixture(params=["replay", pytest.param("stepwise", marks=pytest.mark.slow)])
def design(request):
    """Run the test under each rollback design, then restore the default."""
    recurrent.use(DESIGNS[request.param])
    yield request.param
    recurrent.use(recurrent.Replay)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Loaded (model, drafter dir, tokenizer) per family, built once."""
    built = {}

    def get(family):
        if family not in built:
            target_dir, drafter_dir = build_pair(tmp_path_factory.mktemp(family), family=family)
            model, tokenizer = mlx_lm.load(str(target_dir))
            built[family] = model, drafter_dir, tokenizer
        return built[family]

    return get


def states(cache) -> list:
    """Every array a cache list holds (KV entries up to their offset)."""
    out = []
    for c in cache:
        if isinstance(c, ArraysCache):
            out += list(c.cache)
        else:
            out += [c.keys[..., : c.offset, :], c.values[..., : c.offset, :]]
    return out


def bit_equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and mx.array_equal(x, y).item() for x, y in zip(a, b))


def forwards_like_steps(model) -> bool:
    """Whether the host's forward over several tokens computes bit for bit
    what its one-token steps compute, here (Mamba-2's multi-token scan does
    not: its states then differ from plain decoding's in the last bits
    whatever the rollback does)."""
    tokens = mx.array([[5, 6, 7, 8, 9, 10]])
    chunked, stepped = make_prompt_cache(model), make_prompt_cache(model)
    model(tokens[:, :2], cache=chunked)
    model(tokens[:, :2], cache=stepped)
    wide = model(tokens[:, 2:], cache=chunked)
    steps = mx.concatenate([model(tokens[:, t : t + 1], cache=stepped) for t in range(2, 6)], axis=1)
    return mx.array_equal(wide, steps).item() and bit_equal(states(chunked), states(stepped))


# ---------------------------------------------------------------- the rollback itself


@pytest.mark.parametrize("family", FAMILIES)
def test_rollback_leaves_the_state_of_a_forward_over_the_kept_tokens(family, design):
    """A verify over k+1 tokens rolled back by n leaves, bit for bit, the
    caches a forward over its first k+1-n tokens leaves (n = 0 ... k+1)."""
    model, _ = make_hybrid_target(family)
    target = TargetAdapter(model, [1])
    prompt, block = mx.array([PROMPT_LONG]), mx.array([[11, 12, 13, 14, 15]])
    for n in range(block.shape[1] + 1):
        kept = block.shape[1] - n
        cache, reference = target.make_cache(), target.make_cache()
        for c in (cache, reference):
            target(prompt, c)
        target(block, cache)
        rollback(cache, n)
        if kept:
            target(block[:, :kept], reference)
        assert cache_length(cache) == cache_length(reference) == prompt.shape[1] + kept
        if design == "replay" or forwards_like_steps(model):
            assert bit_equal(states(cache), states(reference)), f"n={n}"
        # Decoding on from there matches too.
        follow = mx.array([[21]])
        assert mx.array_equal(target(follow, cache)[0], target(follow, reference)[0]).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_rollback_twice_within_one_verify(family, design):
    """The round loop may remove rejected drafts, then (closing early) more
    of the same verify: both count from the verify's own start."""
    model, _ = make_hybrid_target(family)
    target = TargetAdapter(model, [1])
    prompt, block = mx.array([PROMPT_LONG]), mx.array([[11, 12, 13, 14, 15]])
    cache, reference = target.make_cache(), target.make_cache()
    for c in (cache, reference):
        target(prompt, c)
    target(block, cache)
    rollback(cache, 2)
    rollback(cache, 1)
    target(block[:, :2], reference)
    assert cache_length(cache) == cache_length(reference)
    follow = mx.array([[21]])
    assert mx.array_equal(target(follow, cache)[0], target(follow, reference)[0]).item()
    with pytest.raises(RuntimeError, match="last recorded target forward"):
        rollback(cache, 2)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rejected", [(0, 2, 5), (1, 1, 1), (5, 0, 3), (4, 4, 0)])
def test_batch_rows_roll_back_each_by_its_own_tail(family, design, rejected):
    """Rows of one batched verify, each rolled back by its own tail, hold
    bit for bit the state a forward of that row alone over its kept tokens
    leaves; a second rollback of the same verify is refused."""
    model, _ = make_hybrid_target(family)
    target = TargetAdapter(model, [1])
    prompts = mx.array([PROMPT_LONG[:7], PROMPT_LONG[7:14], PROMPT_LONG[14:21]])
    blocks = mx.array([[11, 12, 13, 14, 15], [16, 17, 18, 19, 20], [30, 31, 32, 33, 34]])
    cache = target.make_cache()
    target(prompts, cache)
    target(blocks, cache)
    recurrent_entries = [c for c in cache if isinstance(c, ArraysCache)]
    for c in recurrent_entries:
        recurrent.rollback_rows(c, list(rejected))
    for i, n in enumerate(rejected):
        reference = target.make_cache()
        target(prompts[i : i + 1], reference)
        if n < blocks.shape[1]:
            target(blocks[i : i + 1, : blocks.shape[1] - n], reference)
        mine = [a[i : i + 1] for c in recurrent_entries for a in c.cache]
        if design == "replay" or forwards_like_steps(model):
            assert bit_equal(mine, [a for c in reference if isinstance(c, ArraysCache) for a in c.cache]), f"row {i}"
    if len(set(rejected)) > 1:
        with pytest.raises(RuntimeError, match="last recorded target forward"):
            recurrent.rollback_rows(recurrent_entries[0], [1, 1, 1])


@slow
@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_state_is_plain_decodings_bit_for_bit(pairs, family, design):
    """After a generation with rejections every cache holds exactly what plain
    decoding of the same tokens holds (where the host's forward over several
    tokens equals its steps; otherwise tokens are still checked equal)."""
    model, _, _ = pairs(family)
    expected = plain_tokens(model, PROMPT_LONG, MAX)
    cache = make_prompt_cache(model)
    got = speculative(model, oracle(model, PROMPT_LONG, lambda pos: pos % 3 != 0), PROMPT_LONG, MAX, prompt_cache=cache)
    assert got == expected
    if not forwards_like_steps(model):
        pytest.skip(f"{family}'s forward over several tokens differs from its one-token steps in the last bits "
                    "here, so no verify can leave plain decoding's exact state")
    reference = make_prompt_cache(model)
    model(mx.array([PROMPT_LONG[:-1]]), cache=reference)
    for token in [PROMPT_LONG[-1]] + expected:
        model(mx.array([[token]]), cache=reference)
    assert bit_equal(states(cache), states(reference))


def test_without_the_rollback_the_output_changes(pairs, monkeypatch):
    """Teeth: a rollback that leaves the rejected drafts in the recurrent
    state breaks exactness, so the tests here would catch one."""
    model, _, _ = pairs("qwen3_5")
    drafter = oracle(model, PROMPT_LONG, lambda pos: pos % 3 != 0)
    monkeypatch.setattr(recurrent, "rollback", lambda c, n: None)
    assert speculative(model, drafter, PROMPT_LONG, MAX) != plain_tokens(model, PROMPT_LONG, MAX)


# ---------------------------------------------------------------- greedy exactness


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt", [pytest.param(PROMPT_SHORT, marks=slow), PROMPT_LONG], ids=["prompt1", "prompt21"])
def test_random_drafter_exact(pairs, family, prompt):
    model, drafter_dir, _ = pairs(family)
    check_random_drafter(model, drafter_dir, prompt)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", [pytest.param("perfect", marks=slow), "partial"])
def test_oracle_drafters_exact(pairs, family, pattern, design):
    check_oracle_pattern(pairs(family)[0], pattern)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("caps,lengths", [((1, 4, 7), (9,)), pytest.param(range(1, BLOCK + 1), (1, 9, 17), marks=slow)],
                         ids=["some", "all"])
def test_caps_and_max_tokens(pairs, family, caps, lengths):
    check_caps_and_max_tokens(pairs(family)[0], caps, lengths)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stop", [pytest.param(1, marks=slow), 5, pytest.param(9, marks=slow), pytest.param(16, marks=slow)])
def test_closed_generator_and_the_next_turn(pairs, family, stop):
    """Multi-turn prompt-cache reuse on a hybrid target."""
    check_closed_generator_and_next_turn(pairs(family)[0], stop)


@slow
@pytest.mark.parametrize("family", FAMILIES)
def test_stream_generate_with_the_automatic_cap(pairs, family):
    check_stream_generate_with_the_automatic_cap(*pairs(family))


# ---------------------------------------------------------------- refusals


def test_a_state_updated_outside_a_cache_taking_module_is_refused_before_any_token():
    import mlx.nn as nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def __call__(self, x, cache=None):
            if cache is not None and not isinstance(cache, KVCache):
                cache[0] = x[:, -1:] if cache[0] is None else cache[0] + x[:, -1:]
            return self.proj(x)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.model_type = "qwen3_5"
            self.args = {"model_type": "qwen3_5", "vocab_size": 16, "hidden_size": 8}
            self.embed = nn.Embedding(16, 8)
            self.layers = [Layer(), Layer()]

        def __call__(self, tokens, cache=None):
            h = self.embed(tokens)
            for layer, c in zip(self.layers, cache or [None] * 2):
                h = layer(h, cache=c)
            return self.embed.as_linear(h)

        def make_cache(self):
            return [ArraysCache(size=1), KVCache()]

    model = Model()
    drafter = OracleDrafter(text_args(model), list(range(40)), right=lambda pos: True, block_size=3)
    gen = speculative_generate_step(mx.array([3, 4, 5]), model, drafter, max_tokens=8, num_draft_tokens=3)
    with pytest.raises(UnsupportedCacheError, match=r"ArraysCache\) of layer 0 \(Layer\)"):
        next(gen)


def test_a_target_of_recurrent_state_only_is_refused():
    with pytest.raises(UnsupportedCacheError, match="no attention cache"):
        check_rollback([ArraysCache(size=2), ArraysCache(size=2)])
    check_rollback([ArraysCache(size=2), KVCache()])


# ---------------------------------------------------------------- training


@slow
@pytest.mark.parametrize("family", FAMILIES)
def test_train_a_drafter_end_to_end(family, tmp_path):
    """mlx_lm_dspark.train on a hybrid target: a Qwen3-style drafter."""
    check_trained_drafter(make_hybrid_target(family)[0], tmp_path, "qwen3")


# ---------------------------------------------------------------- server


def _server_pair(tmp_path_factory, family):
    return build_pair(tmp_path_factory.mktemp(f"server-{family}"), family, vocab_size=128, num_layers=4,
                      target_layer_ids=(0, 2), num_drafter_layers=1, block_size=4)


@pytest.mark.parametrize("family", FAMILIES)
def test_server_repeat_requests_and_a_conversation(family, tmp_path_factory):
    """mlx_lm.server with a drafter on a hybrid target."""
    check_server_conversation(*_server_pair(tmp_path_factory, family))


@slow
@pytest.mark.parametrize("family", FAMILIES)
def test_server_concurrent_clients(family, tmp_path_factory):
    """Four clients at once through mlx_lm.server with a drafter on a hybrid target."""
    check_concurrent_clients(*_server_pair(tmp_path_factory, family))