"""Attention targets beyond Qwen3 and dense Gemma-4: Llama, Qwen2, Qwen3-MoE,
gpt-oss (attention sinks, sliding and full layers, MoE) and Gemma-4's MoE
variant are accepted by their structure and decode speculatively exactly
like plain decoding.

Every family is a tiny random model built from mlx-lm's own classes
(``mlx_lm_dspark_tools.tiny``) with a drafter in the released layout; the
expected tokens always come from running the plain target.  (Hybrid
recurrent families: tests/test_recurrent.py.)
"""

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache

from conftest import _host_loads, plain_tokens
from mlx_lm_dspark import last_stats, load_drafter
from mlx_lm_dspark.speculative import speculative_generate_step
from mlx_lm_dspark.target import TargetAdapter, cache_length, text_args, validate_pair
from mlx_lm_dspark_tools.oracle import OracleDrafter
from mlx_lm_dspark_tools.tiny import DECODER_MODEL_TYPES, build_pair, make_decoder_target, make_gemma4_target

PROMPT_LONG = [(7 * i + 3) % 300 + 5 for i in range(21)]
PROMPT_SHORT = [42]
MAX = 40
BLOCK = 7
slow = pytest.mark.slow

# family id -> (build_pair family, its extra target settings)
BUILDS = {t: (t, {}) for t in DECODER_MODEL_TYPES}
BUILDS["gemma4_moe"] = ("gemma4", {"num_experts": 4})
FAMILIES = [
    pytest.param(f, marks=pytest.mark.skipif(not _host_loads(BUILDS[f][0]), reason=f"the installed mlx-lm has no {f} model"))
    for f in BUILDS
]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Loaded (model, drafter dir, tokenizer) per family, built once."""
    built = {}

    def get(family, layout="deepspec"):
        if (family, layout) not in built:
            kind, kw = BUILDS[family]
            if layout == "zlab":  # z-lab's Qwen3.6 style: causal sliding layers beside a full one
                kw = {**kw, "drafter_sliding_window": 4, "num_drafter_layers": 3}
            target_dir, drafter_dir = build_pair(tmp_path_factory.mktemp(f"{family}-{layout}"), family=kind,
                                                 layout=layout, **kw)
            model, tokenizer = mlx_lm.load(str(target_dir))
            built[family, layout] = model, drafter_dir, tokenizer
        return built[family, layout]

    return get


def oracle(model, prompt, right=lambda pos: True, block=BLOCK):
    sequence = list(prompt) + plain_tokens(model, prompt, 3 * MAX)
    return OracleDrafter(text_args(model), sequence, block_size=block, right=right)


def speculative(model, drafter, prompt, max_tokens, **kw):
    kw.setdefault("num_draft_tokens", drafter.max_drafts)
    return [t for t, _, _ in speculative_generate_step(mx.array(prompt), model, drafter, max_tokens=max_tokens, **kw)]


# ---------------------------------------------------------------- the targets themselves


@pytest.mark.parametrize("family", FAMILIES)
def test_the_tiny_target_has_its_family_structure_and_is_accepted(pairs, family):
    """The builders make what the family is (experts, sinks, rotating
    caches), and the target is accepted from its structure alone."""
    model, drafter_dir, _ = pairs(family)
    names = [k for k, _ in tree_flatten(model.parameters())]
    if family in ("qwen3_moe", "gpt_oss", "gemma4_moe"):
        assert any("switch" in k or "experts" in k for k in names), "no experts in the MoE target"
    if family == "gpt_oss":
        assert any(k.endswith("sinks") for k in names)
        assert any(isinstance(c, RotatingKVCache) for c in make_prompt_cache(model))
    drafter = load_drafter(drafter_dir, bits=None)
    target = TargetAdapter(model, drafter.target_layer_ids)
    assert target.family == ("gemma4" if family.startswith("gemma4") else "qwen3")
    validate_pair(drafter, target)


@pytest.mark.parametrize("make", [lambda: make_decoder_target("llama")[0],
                                  lambda: make_gemma4_target(num_experts=4)[0]], ids=["llama", "gemma4_moe"])
def test_tap_minus_one_reads_the_embedding_output(make):
    """A drafter may tap -1 (DeepSpec: the embedding output) beside layers."""
    model = make()
    tokens = mx.array([[5, 9, 33]])
    _, features = TargetAdapter(model, [-1, 0])(tokens, None)
    inner = getattr(model, "language_model", model).model
    embedded = inner.embed_tokens(tokens) * getattr(inner, "embed_scale", 1.0)
    assert mx.allclose(features[..., : embedded.shape[-1]], embedded.astype(features.dtype))


# ---------------------------------------------------------------- greedy exactness


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt", [pytest.param(PROMPT_SHORT, marks=slow), PROMPT_LONG], ids=["prompt1", "prompt21"])
def test_random_drafter_exact(pairs, family, prompt):
    model, drafter_dir, _ = pairs(family)
    drafter = load_drafter(drafter_dir, bits=None)
    assert speculative(model, drafter, prompt, MAX) == plain_tokens(model, prompt, MAX)
    stats = last_stats(drafter)
    assert stats.rounds > 0 and stats.accepted + stats.rounds + 1 == MAX


@pytest.mark.parametrize("family", [p if p.values[0] in ("gpt_oss", "gemma4_moe") else
                                    pytest.param(*p.values, marks=[*p.marks, slow]) for p in FAMILIES])
def test_zlab_drafter_borrowing_the_targets_embeddings_exact(pairs, family):
    """z-lab's layout: no embeddings of its own, causal sliding-window layers
    beside full ones (a Qwen3-style backbone for Gemma-4 targets too)."""
    model, drafter_dir, _ = pairs(family, "zlab")
    drafter = load_drafter(drafter_dir, bits=None)
    assert drafter.args.family == "qwen3" and not drafter.args.has_embeddings
    assert [layer.self_attn.causal for layer in drafter.layers] == [True, True, False]
    if family.startswith("gemma4"):  # Gemma's embedding scale and soft-cap, from the target
        assert (drafter.args.input_embedding_scale, drafter.args.final_logit_softcapping) == (8.0, 30.0)
    assert speculative(model, drafter, PROMPT_LONG, MAX) == plain_tokens(model, PROMPT_LONG, MAX)
    assert last_stats(drafter).rounds > 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", [pytest.param("perfect", marks=slow), "partial"])
def test_oracle_drafters_exact(pairs, family, pattern):
    model, _, _ = pairs(family)
    right = (lambda pos: True) if pattern == "perfect" else (lambda pos: pos % 5 != 0)
    for prompt in (PROMPT_SHORT, PROMPT_LONG):
        drafter = oracle(model, prompt, right)
        assert speculative(model, drafter, prompt, MAX) == plain_tokens(model, prompt, MAX)
        stats = last_stats(drafter)
        if pattern == "perfect":
            assert stats.accepted == stats.drafted and stats.rounds == -(-(MAX - 1) // (BLOCK + 1))
        else:
            assert 0 < stats.accepted < stats.drafted


@slow
@pytest.mark.parametrize("family", FAMILIES)
def test_caps_and_max_tokens(pairs, family):
    model, _, _ = pairs(family)
    for cap in range(1, BLOCK + 1):
        for max_tokens in (1, 9, 17):
            drafter = oracle(model, PROMPT_LONG, lambda pos: pos % 4 != 1)
            got = speculative(model, drafter, PROMPT_LONG, max_tokens, num_draft_tokens=cap)
            assert got == plain_tokens(model, PROMPT_LONG, max_tokens), (cap, max_tokens)
            assert all(n <= cap for n in last_stats(drafter).proposal_lengths)


@slow
@pytest.mark.parametrize("family", FAMILIES)
def test_closed_generator_and_the_next_turn(pairs, family):
    """Multi-turn prompt-cache reuse: closing mid-round leaves prompt +
    yielded tokens, and the next turn continues like plain decoding."""
    model, _, _ = pairs(family)
    first, second, stop = PROMPT_LONG, [17, 99, 23], 9
    plain_cache = make_prompt_cache(model)
    expected_first = [t for t, _ in generate_step(mx.array(first), model, max_tokens=stop, prompt_cache=plain_cache)]
    expected_second = [t for t, _ in generate_step(mx.array(second), model, max_tokens=20, prompt_cache=plain_cache)]
    cache = make_prompt_cache(model)
    gen = speculative_generate_step(mx.array(first), model, oracle(model, first, lambda pos: pos % 3 != 0),
                                    max_tokens=MAX, num_draft_tokens=BLOCK, prompt_cache=cache)
    got = [next(gen)[0] for _ in range(stop)]
    gen.close()
    assert got == expected_first
    assert cache_length(cache) == len(first) + stop
    sequence = [0] * (len(first) + stop) + second + expected_second
    second_drafter = OracleDrafter(text_args(model), sequence, right=lambda pos: pos % 4 != 0, block_size=BLOCK)
    assert speculative(model, second_drafter, second, 20, prompt_cache=cache) == expected_second
    assert last_stats(second_drafter).accepted > 0


@slow
@pytest.mark.parametrize("family", FAMILIES)
def test_stream_generate_with_the_automatic_cap(pairs, family):
    """mlx-lm's own stream_generate with a drafter and no fixed cap."""
    model, drafter_dir, tokenizer = pairs(family)
    drafter = load_drafter(drafter_dir, bits=None)
    out = [r.token for r in mlx_lm.stream_generate(model, tokenizer, mx.array(PROMPT_LONG), max_tokens=24,
                                                     draft_model=drafter)]
    assert out == plain_tokens(model, PROMPT_LONG, 24)
    assert last_stats(drafter).cap is None


# ---------------------------------------------------------------- sampling


@slow
@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_is_distributed_like_plain_sampling(family):
    """Sanity of the p/q rule on each family: a 12-token-vocabulary target,
    a drafter that drafts from the target's logits with a fixed bias (about
    half the drafts kept), 2000 tokens against plain mlx-lm's p_t (the full
    statistical suite on Qwen3: tests/test_speculative_sampling.py)."""
    from mlx_lm.sample_utils import make_sampler

    from mlx_lm_dspark.sampling import SamplerSettings
    from test_speculative_sampling import VOCAB, assert_plain_distribution, conditionals, distorted_drafter, generate

    small = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                 intermediate_size=64, seed=3)
    if family == "gemma4_moe":
        model = make_gemma4_target(num_experts=4, global_head_dim=16, num_kv_shared_layers=0, sliding_window=4,
                                   sliding_window_pattern=2, **small)[0]
    else:
        model = make_decoder_target(family, **({"sliding_window": 4} if family == "gpt_oss" else {}), **small)[0]
    drafter = distorted_drafter(model)
    sample = generate(model, drafter, make_sampler(temp=1.0), tokens=2000, seed=11)
    assert last_stats(drafter).rule == "p/q" and 0 < sample.accepted < sample.drafted
    assert_plain_distribution(conditionals(model, sample, SamplerSettings(temp=1.0)), sample)


# ---------------------------------------------------------------- training and the server


@slow
@pytest.mark.parametrize("family", FAMILIES)
def test_train_a_drafter_end_to_end(family, tmp_path):
    """mlx_lm_dspark.train on each family: a drafter of the target's own
    variant that reloads and decodes exactly."""
    import json

    import numpy as np

    from mlx_lm_dspark import train as T

    model = (make_gemma4_target(num_experts=4) if family == "gemma4_moe" else make_decoder_target(family))[0]
    corpus = np.random.default_rng(0).integers(3, 500, (12, 16)).tolist()
    args = T.TrainingArgs(markov_rank=8, num_layers=1, target_layer_ids=None, block_size=4, iters=2,
                          batch_size=2, anchors_per_seq=4, seq_length=32, learning_rate=3e-3, eval_every=2,
                          eval_sequences=2, eval_tokens=6, save_every=0, progress=False)
    out = T.train(model, corpus, args, output=tmp_path)
    history = json.loads((out / "trainer_state.json").read_text())["history"]
    assert all(np.isfinite(h.get("loss", h.get("val_loss"))) for h in history)
    drafter = load_drafter(out, bits=None)
    assert drafter.args.family == ("gemma4" if family == "gemma4_moe" else "qwen3")
    assert speculative(model, drafter, PROMPT_LONG, 12) == plain_tokens(model, PROMPT_LONG, 12)


@slow
@pytest.mark.parametrize("family", FAMILIES)
def test_server_repeat_requests_and_a_conversation(family, tmp_path_factory):
    """mlx_lm.server with a drafter on each family: a repeated request and
    a continued conversation equal a server without drafter."""
    from test_server import converse, server_pair, with_chat_template

    kind, kw = BUILDS[family]
    target, drafter = build_pair(tmp_path_factory.mktemp(f"server-{family}"), kind, vocab_size=128, num_layers=4,
                                 target_layer_ids=(0, 2), num_drafter_layers=1, block_size=4,
                                 **({"num_kv_shared_layers": 0} if kind == "gemma4" else {}), **kw)
    with_chat_template(target)
    common = ["--model", str(target), "--max-tokens", "16", "--temp", "0.0"]

    def drafted(turn, got):
        assert got["usage"]["speculative"]["rounds"] > 0

    with server_pair(common, ["--draft-model", str(drafter), "--draft-bits", "none"]) as (spec, plain):
        converse(spec, plain, "the river runs past the old mill", 2, 16, "what next", repeat=True, check=drafted)
