"""Exactness of the round loop against plain greedy decoding of the same target.

Expected tokens always come from running the plain target (mlx-lm's own
generate_step) on the same model, never from stored numbers.
"""

import json

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.generate import generate_step, stream_generate
from mlx_lm.models.cache import make_prompt_cache

from mlx_lm_dspark import last_stats, load_drafter
from mlx_lm_dspark.speculative import speculative_generate_step
from mlx_lm_dspark.target import cache_length, text_args
from conftest import needs_gemma4_unified, plain_tokens
from mlx_lm_dspark_tools.oracle import OracleDrafter
from mlx_lm_dspark_tools.tiny import build_pair

PROMPT_LONG = [(7 * i + 3) % 300 + 5 for i in range(21)]  # longer than the 8-token window
PROMPT_SHORT = [42]
MAX = 40


def plain(model, prompt, max_tokens, **kw):
    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens, **kw)]


def speculative(model, drafter, prompt, max_tokens, **kw):
    """The round loop with the drafter's whole block per round unless a cap
    is given (the automatic cap is tested in test_autocap)."""
    kw.setdefault("num_draft_tokens", drafter.max_drafts)
    gen = speculative_generate_step(mx.array(prompt), model, drafter, max_tokens=max_tokens, **kw)
    return [(t, d) for t, _, d in gen]


def check_exact(model, drafter, prompt, max_tokens, **kw):
    expected = plain_tokens(model, prompt, max_tokens)
    got = speculative(model, drafter, prompt, max_tokens, **kw)
    assert [t for t, _ in got] == expected
    return got, expected


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Loaded (model, tokenizer, drafter dir) per target flavour, built once."""
    cache = {}

    def get(family, bits=None, layout="deepspec", **kw):
        key = (family, bits, layout, tuple(sorted(kw.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{family}-{bits}-{layout}")
            target_dir, drafter_dir = build_pair(root, family=family, layout=layout, bits=bits, **kw)
            model, tokenizer = mlx_lm.load(str(target_dir))
            cache[key] = (model, tokenizer, drafter_dir)
        return cache[key]

    return get


def oracle(model, prompt, right=lambda pos: True, block=7):
    sequence = list(prompt) + plain_tokens(model, prompt, 3 * MAX)
    return OracleDrafter(text_args(model), sequence, block_size=block, right=right)


FLAVOURS = [("qwen3", None), ("gemma4", None), ("qwen3", 4), ("gemma4", 4)]


@pytest.mark.parametrize("family,bits", FLAVOURS)
@pytest.mark.parametrize("prompt", [PROMPT_SHORT, PROMPT_LONG], ids=["prompt1", "prompt21"])
def test_random_drafter_exact(pairs, family, bits, prompt):
    model, _, drafter_dir = pairs(family, bits)
    drafter = load_drafter(drafter_dir, bits=None)
    got, _ = check_exact(model, drafter, prompt, MAX)
    stats = last_stats(drafter)
    assert stats.rounds > 0 and sum(stats.accepted_lengths) + stats.rounds + 1 == MAX


@pytest.mark.parametrize("family,bits", FLAVOURS)
@pytest.mark.parametrize("pattern", ["perfect", "partial"])
def test_oracle_drafters_exact(pairs, family, bits, pattern):
    model, _, _ = pairs(family, bits)
    right = (lambda pos: True) if pattern == "perfect" else (lambda pos: pos % 5 != 0)
    for prompt in (PROMPT_SHORT, PROMPT_LONG):
        drafter = oracle(model, prompt, right)
        got, expected = check_exact(model, drafter, prompt, MAX)
        if pattern == "perfect":
            # Every round drafts the full block and accepts it all.
            assert all(a == n for a, n in zip(last_stats(drafter).accepted_lengths, last_stats(drafter).proposal_lengths))
            assert last_stats(drafter).rounds == -(-(MAX - 1) // 8)
        else:
            assert 0 < last_stats(drafter).accepted < last_stats(drafter).drafted
        # from_draft marks exactly the accepted drafts
        assert sum(d for _, d in got) == last_stats(drafter).accepted


@pytest.mark.parametrize("cap", range(1, 8))
@pytest.mark.parametrize("max_tokens", [1, 2, 7, 8, 9, 17])
def test_caps_and_max_tokens(pairs, cap, max_tokens):
    model, _, _ = pairs("gemma4")
    drafter = oracle(model, PROMPT_LONG, lambda pos: pos % 4 != 1)
    got, _ = check_exact(model, drafter, PROMPT_LONG, max_tokens, num_draft_tokens=cap)
    assert len(got) == max_tokens
    assert all(n <= cap for n in last_stats(drafter).proposal_lengths)


def test_num_draft_tokens_zero_is_plain_decoding(pairs):
    model, _, _ = pairs("qwen3")
    drafter = oracle(model, PROMPT_LONG)
    check_exact(model, drafter, PROMPT_LONG, 12, num_draft_tokens=0)
    assert last_stats(drafter).drafted == 0
    with pytest.raises(ValueError, match="num_draft_tokens"):
        speculative(model, drafter, PROMPT_LONG, 5, num_draft_tokens=-1)


def test_host_time_is_split_into_graph_building_and_loop(pairs):
    model, _, drafter_dir = pairs("qwen3")
    drafter = load_drafter(drafter_dir, bits=None)
    for cap in (0, 3):  # undrafted and drafted rounds
        check_exact(model, drafter, PROMPT_LONG, 24, num_draft_tokens=cap)
        stats = last_stats(drafter)
        assert 0.0 < stats.graph_seconds <= stats.host_seconds
        assert stats.loop_ms_per_round == pytest.approx(
            1000 * (stats.host_seconds - stats.graph_seconds) / stats.rounds)


def test_tau_without_rounds(pairs):
    """max_tokens=1: the token comes from the prefill, no round runs; τ counts
    tokens per target forward, so 1.0 (not 0.0)."""
    model, _, drafter_dir = pairs("qwen3")
    drafter = load_drafter(drafter_dir, bits=None)
    assert len(speculative(model, drafter, PROMPT_LONG, 1)) == 1
    stats = last_stats(drafter)
    assert stats.rounds == 0 and stats.mean_acceptance_length == 1.0
    assert stats.as_dict()["mean_acceptance_length"] == 1.0 and "τ=1.00 over 0 rounds" in stats.summary()


@pytest.mark.parametrize("layout", ["dflash", "dflash_config", "zlab"])
def test_other_layouts_exact(pairs, layout):
    kw = {"markov_rank": 0} if layout == "dflash" else {}
    model, _, drafter_dir = pairs("qwen3", layout="deepspec" if layout == "dflash" else layout, **kw)
    drafter = load_drafter(drafter_dir, bits=None)
    assert drafter.kind == ("dspark" if layout == "dflash_config" else "dflash")
    check_exact(model, drafter, PROMPT_LONG, MAX)


def test_quantized_drafter_exact(pairs):
    model, _, drafter_dir = pairs("qwen3")
    check_exact(model, load_drafter(drafter_dir), PROMPT_LONG, MAX)  # default 4-bit


@pytest.mark.parametrize("family", ["qwen3", "gemma4"])
def test_eos_inside_accepted_block(pairs, family):
    model, tokenizer, _ = pairs(family)
    expected = plain_tokens(model, PROMPT_LONG, MAX)
    # With a perfect drafter, round 2 yields tokens 9..16; 16 is its bonus.
    # Pick an EOS that is an accepted draft in the middle of that block.
    stop_at = next(i for i in range(9, 16) if expected[i] not in expected[:i])
    eos = expected[stop_at]
    tokenizer = mlx_lm.tokenizer_utils.TokenizerWrapper(tokenizer._tokenizer, eos_token_ids=[eos])
    drafter = oracle(model, PROMPT_LONG)

    def run(draft):
        kw = {"draft_model": draft} if draft else {}
        cache = make_prompt_cache(model)
        if draft:
            kw["num_draft_tokens"] = draft.max_drafts
        out = list(stream_generate(model, tokenizer, mx.array(PROMPT_LONG), max_tokens=MAX,
                                   prompt_cache=cache, **kw))
        return [r.token for r in out], out[-1].finish_reason, cache_length(cache)

    tokens, reason, length = run(drafter)
    assert (tokens, reason, length) == run(None)
    assert tokens[-1] == eos and reason == "stop" and len(tokens) == stop_at + 1
    assert last_stats(drafter).rounds == 2
    assert length == len(PROMPT_LONG) + stop_at + 1


@pytest.mark.parametrize("family", ["qwen3", "gemma4"])
@pytest.mark.parametrize("stop", [1, 2, 5, 9, 16])
def test_closed_generator_leaves_prompt_plus_yielded(pairs, family, stop):
    """Cache reuse: after closing early, continuing from the cache equals plain."""
    model, _, _ = pairs(family)
    first, second = PROMPT_LONG, [17, 99, 23]
    plain_cache = make_prompt_cache(model)
    expected_first = plain(model, first, stop, prompt_cache=plain_cache)
    plain_length = cache_length(plain_cache)
    expected_second = plain(model, second, 20, prompt_cache=plain_cache)

    drafter = oracle(model, first, lambda pos: pos % 3 != 0)
    cache = make_prompt_cache(model)
    gen = speculative_generate_step(mx.array(first), model, drafter, max_tokens=MAX, prompt_cache=cache)
    got = [next(gen)[0] for _ in range(stop)]
    gen.close()
    assert got == expected_first
    assert cache_length(cache) == plain_length == len(first) + stop
    sequence = [0] * (len(first) + stop) + second + expected_second
    second_drafter = OracleDrafter(text_args(model), sequence, right=lambda pos: pos % 4 != 0)
    out = [t for t, _, _ in speculative_generate_step(mx.array(second), model, second_drafter,
                                                      max_tokens=20, prompt_cache=cache)]
    assert out == expected_second
    assert last_stats(second_drafter).accepted > 0


def test_drafter_context_follows_the_cache(pairs):
    model, _, drafter_dir = pairs("qwen3")
    drafter = load_drafter(drafter_dir, bits=None)
    from mlx_lm_dspark.session import find

    # A target-only cache reused across calls carries the drafter context along.
    cache = make_prompt_cache(model)
    list(speculative_generate_step(mx.array(PROMPT_LONG), model, drafter, max_tokens=9, prompt_cache=cache))
    contexts = find(drafter, model).draft_contexts
    assert contexts[cache[0]][0].offset == cache_length(cache) == len(PROMPT_LONG) + 9
    list(speculative_generate_step(mx.array(PROMPT_SHORT), model, drafter, max_tokens=5, prompt_cache=cache))
    assert contexts[cache[0]][0].offset == cache_length(cache) == len(PROMPT_LONG) + 9 + 1 + 5

    # mlx-lm's convention (target entries + draft entries) works as well.
    combined = make_prompt_cache(model) + drafter.make_cache()
    expected = plain_tokens(model, PROMPT_LONG, 12)
    got = speculative(model, drafter, PROMPT_LONG, 12, prompt_cache=combined)
    assert [t for t, _ in got] == expected
    assert combined[-1].offset == cache_length(combined[:-len(drafter.make_cache())]) == len(PROMPT_LONG) + 12
    with pytest.raises(ValueError, match="prompt_cache"):
        speculative(model, drafter, PROMPT_LONG, 3, prompt_cache=make_prompt_cache(model)[:-1])


def test_logits_processors_match_plain(pairs):
    model, _, _ = pairs("qwen3")
    from mlx_lm.sample_utils import make_logits_processors

    procs = make_logits_processors(logit_bias={7: 3.0}, repetition_penalty=1.3, repetition_context_size=8)
    expected = plain(model, PROMPT_LONG, MAX, logits_processors=procs)
    sequence = list(PROMPT_LONG) + expected
    drafter = OracleDrafter(text_args(model), sequence, right=lambda pos: pos % 3 != 0)
    got = speculative(model, drafter, PROMPT_LONG, MAX, logits_processors=procs)
    assert [t for t, _ in got] == expected
    assert last_stats(drafter).accepted > 0


def test_quantized_kv_cache_matches_plain(pairs):
    model, _, _ = pairs("qwen3", head_dim=32)  # mlx quantizes in groups of >= 32
    kw = dict(kv_bits=8, kv_group_size=32, quantized_kv_start=4)
    expected = plain(model, PROMPT_LONG, MAX, **kw)
    drafter = OracleDrafter(text_args(model), list(PROMPT_LONG) + expected, right=lambda pos: pos % 3 != 0)
    combined = make_prompt_cache(model) + drafter.make_cache()
    got = speculative(model, drafter, PROMPT_LONG, MAX, prompt_cache=combined, **kw)
    assert [t for t, _ in got] == expected
    # The quantized entries replace the caller's ones, as generate_step does.
    from mlx_lm.models.cache import QuantizedKVCache

    assert all(isinstance(c, QuantizedKVCache) for c in combined[:-1])
    assert cache_length(combined[:-1]) == combined[-1].offset == len(PROMPT_LONG) + MAX


@pytest.mark.parametrize("start", [len(PROMPT_LONG) + 1, len(PROMPT_LONG) + 3, len(PROMPT_LONG) + 9])
@pytest.mark.parametrize("right", [lambda pos: True, lambda pos: False], ids=["all-right", "never-right"])
def test_kv_quantization_starting_after_the_prefill_matches_plain(pairs, start, right):
    """The cache converts on the same committed position as in plain
    decoding, and no verify block computes positions on both sides of
    ``quantized_kv_start`` (a whole-block drafter would cross it)."""
    model, _, _ = pairs("qwen3", head_dim=32)
    kw = dict(kv_bits=2, kv_group_size=32, quantized_kv_start=start)
    expected = plain(model, PROMPT_LONG, 24, **kw)
    drafter = OracleDrafter(text_args(model), list(PROMPT_LONG) + expected, block_size=8, right=right)
    got = speculative(model, drafter, PROMPT_LONG, 24, **kw)
    assert [t for t, _ in got] == expected


@pytest.mark.parametrize("expected_file", ["expected", "expected_conf_threshold"])
def test_reproduces_deepspec_e2e_run(fixtures_dir, expected_file):
    """DeepSeek's reference loop on the e2e_bigram pair: same ids, same rounds."""
    from mlx_lm.utils import load_model

    root = fixtures_dir / "e2e_bigram"
    expected = mx.load(str(root / f"{expected_file}.safetensors"))
    threshold = expected["confidence_threshold"].item() if "confidence_threshold" in expected else None
    max_new = expected["max_new_tokens"].item() if "max_new_tokens" in expected else 60
    # A transformers-5 config: rope_theta given at the top too, for mlx-lm < 0.32.
    rope_theta = json.loads((root / "target" / "config.json").read_text())["rope_parameters"]["rope_theta"]
    target, _ = load_model(root / "target", model_config={"rope_theta": rope_theta})
    drafter = load_drafter(root / "draft", bits=None, confidence_threshold=threshold)
    prompt = expected["prompt"][0].tolist()
    reference_ids = expected["output_ids"][0, len(prompt):].tolist()
    assert len(reference_ids) == max_new

    # Run past max_new so that no round the reference ran is clamped by max_tokens.
    got = speculative(target, drafter, prompt, max_new + drafter.max_drafts + 1)
    assert [t for t, _ in got][:max_new] == reference_ids
    assert [t for t, _ in got][:max_new] == plain(target, prompt, max_new)
    rounds = expected["acceptance_lengths"].size
    stats = last_stats(drafter)
    assert [a + 1 for a in stats.accepted_lengths[:rounds]] == expected["acceptance_lengths"].tolist()
    assert stats.proposal_lengths[:rounds] == expected["proposal_lengths"].tolist()
    if "accepted_draft_lengths" in expected:
        assert stats.accepted_lengths[:rounds] == expected["accepted_draft_lengths"].tolist()


@pytest.mark.parametrize("model_type", ["gemma4_text", pytest.param("gemma4_unified", marks=needs_gemma4_unified)])
def test_gemma4_config_flavours_exact(pairs, model_type):
    model, _, drafter_dir = pairs(model_type)
    check_exact(model, load_drafter(drafter_dir, bits=None), PROMPT_LONG, 24)
    check_exact(model, oracle(model, PROMPT_LONG, lambda pos: pos % 4 != 0), PROMPT_LONG, 24)


def test_mismatched_pair_is_refused_before_generating(pairs):
    from mlx_lm_dspark.target import DrafterMismatchError

    qwen3, tokenizer, _ = pairs("qwen3")
    _, _, gemma_drafter_dir = pairs("gemma4")
    drafter = load_drafter(gemma_drafter_dir, bits=None)
    with pytest.raises(DrafterMismatchError, match="family"):
        list(stream_generate(qwen3, tokenizer, "the cat", max_tokens=4, draft_model=drafter))
