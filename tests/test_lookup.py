"""Lookup (n-gram) speculation: the index, the proposers, exactness, entry points."""

import importlib
import json
import random
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from conftest import plain_tokens
from mlx_lm_dspark import last_stats
from mlx_lm_dspark.loader import DrafterOptionError, load_drafter
from mlx_lm_dspark.lookup import (
    LookupDrafter, LookupIndex, LookupSettings, LookupSpecError, WithLookup, lookup_cap, parse_spec,
)
from mlx_lm_dspark.speculative import speculative_generate_step
from mlx_lm_dspark_tools.tiny import build_pair, make_qwen3_target

PROMPT = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 9, 10, 5, 6, 7, 8, 5, 6]


def fresh_index(tokens, n=4):
    index = LookupIndex(n, 8)
    index.extend(tokens)
    return index


# ----------------------------------------------------------------- the index


def test_trim_undoes_extend_exactly():
    rng = random.Random(0)
    index = LookupIndex(4, 8)
    tokens = []
    for _ in range(300):
        if tokens and rng.random() < 0.4:
            k = rng.randint(1, min(6, len(tokens)))
            assert index.trim(k) == k
            del tokens[-k:]
        else:
            new = [rng.randint(0, 5) for _ in range(rng.randint(1, 5))]
            index.extend(new)
            tokens += new
        assert index.offset == len(tokens)
    assert index.ends == fresh_index(tokens).ends
    assert index.trim(10_000) == len(tokens) and index.ends == {} and index.offset == 0


def test_continuation_of_the_longest_most_recent_match():
    settings = LookupSettings(n=3, min_n=1, k=4)
    #        0  1  2  3  4  5  6  7  8  9
    index = fresh_index([1, 2, 3, 4, 9, 2, 3, 5, 7, 1], n=3)
    # anchor 2 after ...7 1: "1 2" (2 tokens) matches at 0-1 -> 3 4 9 2
    assert index.continuation(2, settings, 4) == ([3, 4, 9, 2], 2)
    # anchor 3 after ..., 1: "1 3" unseen, "3" seen last at 6 -> 5 7 1 3 (into the anchor)
    assert index.continuation(3, settings, 4) == ([5, 7, 1, 3], 1)
    assert index.continuation(8, settings, 4) == ([], 0)
    assert index.continuation(2, LookupSettings(n=3, min_n=3, k=4), 4) == ([], 0)


def test_a_repeating_pattern_continues_into_its_own_copy():
    index = fresh_index([4, 5, 4, 5])
    assert index.continuation(4, LookupSettings(n=2, min_n=2, k=6), 6) == ([5, 4, 5, 4, 5, 4], 2)


def test_may_match_needs_an_earlier_occurrence():
    assert not fresh_index([1, 2, 3]).may_match(2)
    assert fresh_index([3, 1, 2, 3]).may_match(2)
    assert fresh_index([1]).may_match(1)


def test_the_index_is_a_prompt_cache_entry():
    import copy

    from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

    cache = [fresh_index(PROMPT)]
    assert can_trim_prompt_cache(cache) and cache[0].nbytes > 0
    clone = copy.deepcopy(cache)
    trim_prompt_cache(clone, 3)
    assert clone[0].ends == fresh_index(PROMPT[:-3]).ends and cache[0].offset == len(PROMPT)


# ----------------------------------------------------------------- settings


@pytest.mark.parametrize("spec, want", [
    ("ngram", LookupSettings()),
    ("NGRAM:n=3,k=5", LookupSettings(n=3, min_n=2, k=5)),
    ("ngram: n=6, min=1", LookupSettings(n=6, min_n=1)),
    ("ngram:n=1", LookupSettings(n=1, min_n=1)),
])
def test_parse_spec(spec, want):
    assert parse_spec(spec) == want


@pytest.mark.parametrize("spec, words", [
    ("ngram:q=1", "unknown lookup setting"), ("ngram:n=x", "not an integer"), ("ngram:n", "no value"),
    ("ngram:n=2,min=3", "1 <= min <= n"), ("ngram:k=0", "k >= 1"),
])
def test_bad_specs_say_what_is_wrong(spec, words):
    with pytest.raises(LookupSpecError, match=words):
        parse_spec(spec)
    with pytest.raises(DrafterOptionError, match=words):
        load_drafter(spec)


def test_not_a_spec():
    assert parse_spec("mlx-community/Qwen3-0.6B") is None and parse_spec("ngrams") is None


def test_lookup_cap_without_costs_takes_every_match():
    assert lookup_cap([0.9] * 4, 3, None) == 3
    assert lookup_cap([0.1] * 4, 3, None, rival=2.0) == 0
    assert lookup_cap([0.9] * 4, 0, None) == 0


# ----------------------------------------------------------------- greedy exactness


@pytest.fixture(scope="module")
def target():
    return make_qwen3_target(vocab_size=16, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                             head_dim=16, intermediate_size=64, seed=1)[0]


def run(model, drafter, prompt=PROMPT, n=60, **kw):
    return [t for t, _, _ in speculative_generate_step(mx.array(prompt), model, drafter, max_tokens=n, **kw)]


@pytest.mark.parametrize("cap", [None, 1, 3, 8])
@pytest.mark.parametrize("settings", [LookupSettings(), LookupSettings(n=2, min_n=1, k=8)])
def test_lookup_is_token_identical_to_plain_greedy(target, cap, settings):
    drafter = LookupDrafter(settings)
    assert run(target, drafter, num_draft_tokens=cap) == plain_tokens(target, mx.array(PROMPT), 60)
    stats = last_stats(drafter)
    if cap is not None:
        assert stats.drafted > 0 and stats.accepted > 0  # a small vocabulary repeats: lookup finds runs


def test_a_context_without_repeats_proposes_nothing(target):
    drafter = LookupDrafter(LookupSettings(n=3, min_n=3))
    assert run(target, drafter, prompt=[3], n=2, num_draft_tokens=4) == plain_tokens(target, mx.array([3]), 2)
    assert last_stats(drafter).drafted == 0


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("lookup"), "qwen3", vocab_size=128, num_layers=2, hidden_size=32,
                      head_dim=16, intermediate_size=64, target_layer_ids=(0, 1), num_drafter_layers=1,
                      block_size=4)


@pytest.fixture(scope="module")
def pair_models(tiny_pair):
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(tiny_pair[0]))
    return model, tokenizer, load_drafter(tiny_pair[1], bits=None)


@pytest.mark.parametrize("cap", [None, 2, 3])
def test_combined_is_token_identical_and_keeps_the_drafter_context(pair_models, cap):
    model, _, drafter = pair_models
    combined = WithLookup(drafter, LookupSettings(n=2, min_n=1, k=3))
    prompt = [9, 10, 11, 12, 9, 10, 11, 12, 9, 10, 11, 12, 9, 10]
    cache = combined.make_cache()
    from mlx_lm.models.cache import make_prompt_cache

    prompt_cache = make_prompt_cache(model) + cache
    got = run(model, combined, prompt=prompt, n=40, num_draft_tokens=cap, prompt_cache=prompt_cache)
    assert got == plain_tokens(model, mx.array(prompt), 40)
    stats = last_stats(combined)
    assert stats.rounds > 0
    # The drafter context and the index cover exactly prompt + yielded tokens.
    held = len(prompt) + len(got)
    assert prompt_cache[0].offset == held
    assert all(c.offset == held for c in cache)
    assert cache[-1].tokens == prompt + got
    # ... and the drafter alone continues exactly from it.
    plain_drafter_cache = prompt_cache[: -1]
    more = run(model, drafter, prompt=[got[-1]], n=8, prompt_cache=plain_drafter_cache, num_draft_tokens=2)
    assert more == plain_tokens(model, mx.array(prompt + got + [got[-1]]), 8)


def test_combined_rounds_use_both_proposers(pair_models):
    model, _, drafter = pair_models
    combined = WithLookup(drafter, LookupSettings(n=2, min_n=1, k=3))
    prompt = [9, 10, 11, 12] * 6
    cache = combined.make_cache()
    from mlx_lm.models.cache import make_prompt_cache

    run(model, combined, prompt=prompt, n=40, num_draft_tokens=3, prompt_cache=make_prompt_cache(model) + cache)
    assert set(cache[-1].rates) >= {"drafter"} and any(k.startswith("lookup") for k in cache[-1].rates)


def test_prompt_cache_reuse_across_turns(target):
    """A target-only prompt cache carries the index (as drafter contexts
    do); each turn equals plain decoding of the whole conversation."""
    from mlx_lm.models.cache import make_prompt_cache

    drafter = LookupDrafter(LookupSettings(n=3, min_n=1, k=4))
    cache = make_prompt_cache(target)
    history = []
    for turn in range(3):
        new = PROMPT[turn:turn + 6]
        got = run(target, drafter, prompt=new, n=20, prompt_cache=cache, num_draft_tokens=4)
        assert got == plain_tokens(target, mx.array(history + new), 20), f"turn {turn}"
        history += new + got
        assert cache[0].offset == len(history)  # the caches hold prompt + every yielded token


# ----------------------------------------------------------------- sampling


def test_point_mass_acceptance_rule():
    """accept_pq with q None: keep with p(d), else the residual without d."""
    from mlx_lm_dspark.sampling import accept_pq

    p = mx.log(mx.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    mx.random.seed(0)
    kept, first = [], []
    for _ in range(4000):
        a, token = accept_pq(p, None, mx.array([0], dtype=mx.uint32))
        kept.append(a.item())
        if a.item() == 0:
            first.append(token.item())
    assert abs(np.mean(kept) - 0.5) < 0.03
    counts = np.bincount(first, minlength=3) / len(first)
    assert counts[0] == 0 and abs(counts[1] - 0.6) < 0.04


@pytest.mark.slow
def test_sampled_lookup_is_distributed_like_plain_sampling():
    from mlx_lm.sample_utils import make_sampler

    from mlx_lm_dspark.sampling import SamplerSettings
    from test_speculative_sampling import FEWER, assert_plain_distribution, conditionals, generate
    from test_speculative_sampling import model as model_fixture

    model = model_fixture.__wrapped__()
    drafter = LookupDrafter(LookupSettings(n=2, min_n=1, k=3))
    sample = generate(model, drafter, make_sampler(temp=0.8), tokens=FEWER, seed=4)
    assert last_stats(drafter).rule == "p/q"
    assert 0.1 < sample.accepted / sample.drafted < 0.95
    assert_plain_distribution(conditionals(model, sample, SamplerSettings(temp=0.8)), sample)


@pytest.mark.slow
def test_sampled_combined_rounds_are_distributed_like_plain_sampling():
    """Rounds alternate between the drafter's proposals (its own q) and lookup
    proposals (point masses), the drafter's context kept across both."""
    from mlx_lm.sample_utils import make_sampler

    from mlx_lm_dspark.sampling import SamplerSettings
    from test_speculative_sampling import FEWER, assert_plain_distribution, conditionals, generate
    from test_speculative_sampling import model as model_fixture
    from test_speculative_sampling import random_dspark_drafter

    model = model_fixture.__wrapped__()
    drafter = random_dspark_drafter(model)
    calls = []
    own = drafter.propose
    drafter.propose = lambda *args, **kw: calls.append(1) or own(*args, **kw)
    combined = WithLookup(drafter, LookupSettings(n=2, min_n=1, k=drafter.max_drafts))
    sample = generate(model, combined, make_sampler(temp=1.0), tokens=FEWER, seed=26)
    assert last_stats(combined).rule == "p/q" and sample.accepted > 0
    assert 0 < len(calls) < sample.rounds  # both proposers ran (a fixed cap: each round one of them)
    assert_plain_distribution(conditionals(model, sample, SamplerSettings(temp=1.0)), sample)


@pytest.mark.slow
def test_the_sampling_test_catches_a_residual_that_keeps_the_draft(monkeypatch):
    """Teeth: drawing a rejection's replacement from p (d included) is caught."""
    from mlx_lm.sample_utils import make_sampler

    from mlx_lm_dspark import sampling, speculative
    from mlx_lm_dspark.sampling import SamplerSettings
    from test_speculative_sampling import FEWER, conditionals, generate, p_values
    from test_speculative_sampling import model as model_fixture

    exact = sampling.accept_pq

    def biased(p, q, drafts):
        if q is None:
            q = mx.full(p[: drafts.size].shape, -1e9)  # residual max(0, p - 0) = p: d may be drawn again
            q = mx.where(mx.arange(p.shape[-1])[None] == drafts[:, None], 0.0, q)
            accepted, token = exact(p, q, drafts)
            u = mx.random.uniform()
            return accepted, mx.where(u < 0.5, sampling.sample(p[accepted][None]), token)
        return exact(p, q, drafts)

    monkeypatch.setattr(speculative, "accept_pq", biased)
    model = model_fixture.__wrapped__()
    drafter = LookupDrafter(LookupSettings(n=2, min_n=1, k=3))
    sample = generate(model, drafter, make_sampler(temp=0.8), tokens=FEWER, seed=4)
    probs = conditionals(model, sample, SamplerSettings(temp=0.8))
    p = p_values(probs, sample.tokens, sample.slots, sample.breaks)
    assert min(p.values()) < 1e-4, p


# ----------------------------------------------------------------- entry points


def test_mlx_lm_load_and_stream_generate_take_ngram(pair_models):
    import mlx_lm
    from mlx_lm import stream_generate

    model, tokenizer, _ = pair_models
    drafter, stand_in = mlx_lm.load("ngram:n=3,k=4")
    assert isinstance(drafter, LookupDrafter) and drafter.settings == LookupSettings(n=3, min_n=2, k=4)
    assert stand_in.vocab_size == tokenizer.vocab_size
    prompt = "the quick brown fox jumps over the lazy dog and the quick brown fox jumps over the"
    texts = [
        "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=24, draft_model=d))
        for d in (None, drafter)
    ]
    assert texts[0] == texts[1] and last_stats(drafter).rounds > 0


def test_load_drafter_with_lookup(tiny_pair):
    combined = load_drafter(tiny_pair[1], bits=None, lookup="ngram:n=3")
    assert isinstance(combined, WithLookup) and combined.kind == "dspark+ngram"
    assert combined.settings == LookupSettings(n=3, min_n=2, k=combined.max_drafts)
    assert isinstance(load_drafter("ngram"), LookupDrafter)


def test_a_local_directory_named_ngram_is_a_path(tmp_path, monkeypatch):
    from mlx_lm_dspark.loader import names_lookup

    monkeypatch.chdir(tmp_path)
    assert names_lookup("ngram")
    (tmp_path / "ngram").mkdir()
    assert not names_lookup("ngram")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mlx_lm", "generate", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_cli_draft_model_ngram_and_draft_lookup(tiny_pair):
    target, drafter = map(str, tiny_pair)
    common = ["--model", target, "--prompt", "a cat sat on the mat and a cat sat on the mat and a cat",
              "--max-tokens", "20", "--verbose", "True"]
    plain = _cli(*common)
    assert plain.returncode == 0, plain.stderr
    text = plain.stdout.split("==========")[1]
    for extra in (["--draft-model", "ngram"], ["--draft-model", "ngram:n=2,k=3", "--num-draft-tokens", "2"],
                  ["--draft-model", drafter, "--draft-bits", "none", "--draft-lookup"],
                  ["--draft-model", drafter, "--draft-bits", "none", "--draft-lookup", "n=2"]):
        got = _cli(*common, *extra)
        assert got.returncode == 0, got.stderr
        assert got.stdout.split("==========")[1] == text
        assert "Speculative: τ=" in got.stdout
    bad = _cli(*common, "--draft-model", "ngram:n=0")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "need 1 <= min <= n" in bad.stderr


@pytest.mark.slow
def test_server_with_draft_model_ngram_equals_plain_and_reuses_the_cache(tiny_pair):
    from test_server import CHAT, converse, request, server_pair, text_of

    common = ["--model", str(tiny_pair[0]), "--max-tokens", "24", "--temp", "0.0"]

    def drafted_and_cached(turn, got):
        assert got["usage"]["speculative"]["rounds"] > 0
        if turn:
            assert got["usage"]["prompt_tokens_details"]["cached_tokens"] > 0

    with server_pair(common, ["--draft-model", "ngram:n=3,min=1"]) as (spec, plain):
        converse(spec, plain, "a cat sat on the mat and a cat sat on the mat", 3, 16, "and a cat sat on the mat",
                 check=drafted_and_cached)
        body = request(CHAT, "the quick brown fox jumps over the lazy dog")
        assert text_of(CHAT, body, spec.post(CHAT, body)[1]) == text_of(CHAT, body, plain.post(CHAT, body)[1])
