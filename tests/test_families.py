"""Attention targets beyond Qwen3 and dense Gemma-4: Llama, Qwen2, Qwen3-MoE,
gpt-oss (attention sinks, sliding and full layers, MoE) and Gemma-4's MoE
variant are accepted by their structure and decode speculatively exactly
like plain decoding.

Every family is a tiny random model built from mlx-lm's own classes
(``mlx_lm_dspark_tools.tiny``) with a drafter in the released layout; the
expected tokens always come from running the plain target.  (Hybrid
recurrent families: tests/test_recurrent.py.)
"""

import json
import shutil

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache

from conftest import _host_loads, plain_tokens
from mlx_lm_dspark import last_stats, load_drafter
from mlx_lm_dspark.session import session_for
from mlx_lm_dspark.target import TargetAdapter, validate_pair
from mlx_lm_dspark_tools.tiny import DECODER_MODEL_TYPES, build_pair, make_decoder_target, make_gemma4_target
from decoding_checks import (BLOCK, MAX, PROMPT_LONG, PROMPT_SHORT, check_caps_and_max_tokens,
                             check_closed_generator_and_next_turn, check_concurrent_clients, check_oracle_pattern,
                             check_random_drafter, check_server_conversation,
                             check_stream_generate_with_the_automatic_cap, check_trained_drafter, speculative)

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
    check_random_drafter(model, drafter_dir, prompt)


@pytest.mark.parametrize("family", [p if p.values[0] in ("gpt_oss", "gemma4_moe") else
                                    pytest.param(*p.values, marks=[*p.marks, slow]) for p in FAMILIES])
def test_zlab_drafter_borrowing_the_targets_embeddings_exact(pairs, family):
    """z-lab's layout: no embeddings of its own, causal sliding-window layers
    beside full ones (a Qwen3-style backbone for Gemma-4 targets too)."""
    model, drafter_dir, _ = pairs(family, "zlab")
    drafter = load_drafter(drafter_dir, bits=None)
    assert drafter.args.family == "qwen3" and not drafter.args.has_embeddings
    assert [layer.self_attn.causal for layer in drafter.layers] == [True, True, False]
    assert speculative(model, drafter, PROMPT_LONG, MAX) == plain_tokens(model, PROMPT_LONG, MAX)
    assert last_stats(drafter).rounds > 0
    if family.startswith("gemma4"):  # bound: Gemma's embedding scale √64 from the target
        assert drafter.args.input_embedding_scale is None and drafter.factor("input_embedding_scale") == 8.0


def _zlab_gemma4_drafter(pairs, tmp_path, **fields):
    """The z-lab drafter of the tiny Gemma-4 MoE target, its config without
    an embedding scale or soft-cap unless ``fields`` sets them."""
    model, drafter_dir, _ = pairs("gemma4_moe", "zlab")
    config = json.loads((drafter_dir / "config.json").read_text())
    config.pop("final_logit_softcapping")
    assert "input_embedding_scale" not in config and "input_embedding_scale" not in config["dflash_config"]
    config["dflash_config"].update(fields)
    shutil.copytree(drafter_dir, tmp_path / "drafter")
    (tmp_path / "drafter" / "config.json").write_text(json.dumps(config))
    return model, load_drafter(tmp_path / "drafter", bits=None)


def test_zlab_drafter_of_a_gemma4_target_takes_its_embedding_scale_and_soft_cap(pairs, tmp_path):
    """z-lab's reference embeds through the Gemma-4 target's scaled
    embedding (√hidden_size, here √64) and soft-caps like the target (30):
    a config that names neither gets both from the target when bound."""
    model, drafter = _zlab_gemma4_drafter(pairs, tmp_path)
    session_for(drafter, model)
    inner = model.language_model.model
    ids = mx.array([[3, 17, 40]])
    assert (drafter.factor("input_embedding_scale"), drafter.factor("final_logit_softcapping")) == (8.0, 30.0)
    assert mx.allclose(drafter.embed(ids), inner.embed_tokens(ids) * 8.0)
    h = 50 * mx.random.normal((1, 3, 64), key=mx.random.key(0))
    assert mx.allclose(drafter.base_logits(h), 30.0 * mx.tanh(inner.embed_tokens.as_linear(h) / 30.0))
    assert speculative(model, drafter, PROMPT_LONG, MAX) == plain_tokens(model, PROMPT_LONG, MAX)


def test_zlab_drafter_config_values_win_over_the_targets(pairs, tmp_path):
    model, drafter = _zlab_gemma4_drafter(pairs, tmp_path, input_embedding_scale=2.0, final_logit_softcapping=10.0)
    session_for(drafter, model)
    assert (drafter.factor("input_embedding_scale"), drafter.factor("final_logit_softcapping")) == (2.0, 10.0)
    ids = mx.array([[3, 17]])
    assert mx.allclose(drafter.embed(ids), model.language_model.model.embed_tokens(ids) * 2.0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", [pytest.param("perfect", marks=slow), "partial"])
def test_oracle_drafters_exact(pairs, family, pattern):
    check_oracle_pattern(pairs(family)[0], pattern)


@slow
@pytest.mark.parametrize("family", FAMILIES)
def test_caps_and_max_tokens(pairs, family):
    check_caps_and_max_tokens(pairs(family)[0], range(1, BLOCK + 1), (1, 9, 17))


@slow
@pytest.mark.parametrize("family", FAMILIES)
def test_closed_generator_and_the_next_turn(pairs, family):
    """Multi-turn prompt-cache reuse, closing mid-round."""
    check_closed_generator_and_next_turn(pairs(family)[0], 9)


@slow
@pytest.mark.parametrize("family", FAMILIES)
def test_stream_generate_with_the_automatic_cap(pairs, family):
    check_stream_generate_with_the_automatic_cap(*pairs(family))


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
    """mlx_lm_dspark.train on each family: a drafter of the target's own variant."""
    model = (make_gemma4_target(num_experts=4) if family == "gemma4_moe" else make_decoder_target(family))[0]
    check_trained_drafter(model, tmp_path, "gemma4" if family == "gemma4_moe" else "qwen3")


def _server_pair(tmp_path_factory, family):
    kind, kw = BUILDS[family]
    return build_pair(tmp_path_factory.mktemp(f"server-{family}"), kind, vocab_size=128, num_layers=4,
                      target_layer_ids=(0, 2), num_drafter_layers=1, block_size=4,
                      **({"num_kv_shared_layers": 0} if kind == "gemma4" else {}), **kw)


@slow
@pytest.mark.parametrize("family", FAMILIES)
def test_server_repeat_requests_and_a_conversation(family, tmp_path_factory):
    """mlx_lm.server with a drafter on each family."""
    check_server_conversation(*_server_pair(tmp_path_factory, family))


@slow
@pytest.mark.parametrize("family", FAMILIES)
def test_server_concurrent_clients(family, tmp_path_factory):
    """Four clients at once through mlx_lm.server with a drafter on each family."""
    check_concurrent_clients(*_server_pair(tmp_path_factory, family))