"""Sampled generation through the round loop is distributed like plain sampling.

Samplers from mlx-lm's ``make_sampler`` run DSpark's p/q rule; any other
sampler runs sample-and-match.  These tests compare the empirical
distribution of consecutive token pairs, including the pair that straddles a
round boundary, with the exact distribution plain decoding samples from,
computed by enumerating every continuation of a tiny-vocabulary model with
the same filters and logits processors.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from mlx_lm_dspark.drafter import Drafter, ModelArgs
from mlx_lm_dspark.sampling import SamplerSettings, distribution
from mlx_lm_dspark.speculative import speculative_generate_step
from mlx_lm_dspark.target import text_args
from mlx_lm_dspark.tiny import make_qwen3_target
from oracle import OracleDrafter

VOCAB = 12
PROMPT = [3, 7, 5, 9]
STEPS = 4  # token 1 from the prefill, tokens 2-3 drafted in round 1, token 4 its bonus/correction
SAMPLES = 3000


@pytest.fixture(scope="module")
def model():
    return make_qwen3_target(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2,
                             num_kv_heads=1, head_dim=16, intermediate_size=64, seed=3)[0]


def exact_joint(model, temp, settings=None, processors=()):
    """P(t1..t4) for every continuation, by batched forwards over the tree,
    with the processors and sampler filters plain decoding would apply."""
    settings = settings or SamplerSettings(temp=temp)
    joint = np.ones((1,))
    prefixes = np.array([PROMPT])
    for _ in range(STEPS):
        logits = model(mx.array(prefixes))[:, -1, :].astype(mx.float32)
        if processors:
            rows = []
            for history, row in zip(prefixes, logits):
                row = row[None]
                for processor in processors:
                    row = processor(mx.array(history), row)
                rows.append(row)
            logits = mx.concatenate(rows)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        probs = np.array(mx.exp(distribution(logprobs, settings)))
        joint = (joint[:, None] * probs).reshape(-1)
        prefixes = np.concatenate(
            [np.repeat(prefixes, VOCAB, axis=0), np.tile(np.arange(VOCAB), len(prefixes))[:, None]], axis=1)
    return joint.reshape((VOCAB,) * STEPS)


def pair_marginal(joint, i):
    axes = tuple(a for a in range(STEPS) if a not in (i, i + 1))
    return joint.sum(axis=axes).reshape(-1)


def chi_square_p(observed, expected_probs):
    """Pearson's test, cells with expected count < 5 pooled; p from the
    Wilson-Hilferty normal approximation of the chi-square tail."""
    n = observed.sum()
    expected = expected_probs * n
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    k = len(obs) - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def sample_runs(model, drafter, temp, seed, sampler=None, processors=None, samples=SAMPLES):
    mx.random.seed(seed)
    sampler = sampler or make_sampler(temp=temp)
    runs = np.zeros((samples, STEPS), dtype=np.int64)
    accepted = 0
    for s in range(samples):
        gen = speculative_generate_step(mx.array(PROMPT), model, drafter, max_tokens=STEPS, sampler=sampler,
                                        logits_processors=processors)
        runs[s] = [t for t, _, _ in gen]
        accepted += drafter.stats.accepted
    return runs, accepted / samples


def pair_counts(runs, i):
    counts = np.zeros(VOCAB * VOCAB)
    np.add.at(counts, runs[:, i] * VOCAB + runs[:, i + 1], 1)
    return counts


@pytest.mark.parametrize("drafter_kind", ["greedy-continuation", "always-wrong"])
def test_sample_and_match_is_distributed_like_the_target(model, drafter_kind):
    temp = 1.0
    greedy = [t for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=STEPS + 8)]
    right = (lambda pos: True) if drafter_kind == "greedy-continuation" else (lambda pos: False)
    drafter = OracleDrafter(text_args(model), PROMPT + greedy, right=right)
    opaque = lambda logprobs: mx.random.categorical(logprobs * (1 / temp))  # noqa: E731
    runs, _ = sample_runs(model, drafter, temp, seed=11, sampler=opaque)
    assert drafter.stats.rule == "sample-and-match"

    joint = exact_joint(model, temp)
    for i in range(STEPS - 1):  # (t1,t2), (t2,t3) inside round 1, (t3,t4) draft then bonus
        p = chi_square_p(pair_counts(runs, i), pair_marginal(joint, i))
        assert p > 1e-3, f"pair {i}: p={p:.2e}"
    # The test has teeth: the same samples against the target at a slightly
    # different temperature are rejected.
    wrong = exact_joint(model, 1.25)
    assert min(chi_square_p(pair_counts(runs, i), pair_marginal(wrong, i)) for i in range(STEPS - 1)) < 1e-3
    if drafter_kind == "greedy-continuation":
        # Drafts really were accepted, so accepted drafts are part of what was tested.
        first_draft_accepted = (runs[:, 1] == greedy[1]).mean()
        assert first_draft_accepted > 0.2


def random_dspark_drafter(model):
    """A DSpark drafter for the tiny target: random layers, the target's
    embedding and head, so its q overlaps p only partly."""
    args = dict(family="qwen3", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-6,
                vocab_size=VOCAB, block_size=4, target_layer_ids=[0, 1], num_target_layers=2,
                mask_token_id=VOCAB - 1, markov_rank=4, enable_confidence_head=True,
                confidence_head_with_markov=True)
    drafter = Drafter(ModelArgs.from_dict(args))
    mx.random.seed(0)
    params = [(k, mx.ones(v.shape) if "norm" in k else 0.3 * mx.random.normal(v.shape))
              for k, v in tree_flatten(drafter.parameters())]
    drafter.update(tree_unflatten(params))
    drafter.embed_tokens.weight = model.model.embed_tokens.weight
    drafter.lm_head.weight = model.lm_head.weight
    drafter.kind = "dspark"
    return drafter


def _penalise_last_token(tokens, logits):
    """A user's own history-dependent processor."""
    return logits.at[:, tokens[-1]].add(-1.5)


KNOBS = {
    "temperature": (dict(temp=0.9), None),
    "top_p": (dict(temp=1.0, top_p=0.75), None),
    "top_k": (dict(temp=1.0, top_k=4), None),
    "min_p": (dict(temp=1.0, min_p=0.12), None),
    "repetition_penalty": (dict(temp=1.0), dict(repetition_penalty=1.6, repetition_context_size=8)),
    "logit_bias": (dict(temp=1.0), dict(logit_bias={4: 1.5, 6: -1.0})),
    "user_processor": (dict(temp=1.0), "user"),
}


@pytest.mark.parametrize("knob", list(KNOBS))
def test_pq_rule_is_distributed_like_plain_sampling(model, knob):
    sampler_kw, processor_kw = KNOBS[knob]
    if processor_kw == "user":
        processors = [_penalise_last_token]
    else:
        processors = make_logits_processors(**processor_kw) if processor_kw else None
    sampler = make_sampler(**sampler_kw)
    settings = SamplerSettings(**sampler_kw)
    # The drafter samples its drafts from a q that is right on the plain
    # sample's most likely continuation 70% of the time, uniform otherwise.
    greedy = [t for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=STEPS + 8,
                                          logits_processors=processors)]
    drafter = OracleDrafter(text_args(model), PROMPT + greedy, confidence=0.7)
    runs, accepted = sample_runs(model, drafter, None, seed=21, sampler=sampler, processors=processors)
    assert drafter.stats.rule == "p/q"
    assert accepted > 0.4  # drafts are kept often enough to be part of what is tested
    joint = exact_joint(model, None, settings, processors or ())
    for i in range(STEPS - 1):
        p = chi_square_p(pair_counts(runs, i), pair_marginal(joint, i))
        assert p > 1e-3, f"{knob} pair {i}: p={p:.2e}"
    if processors:
        # The processors matter: ignoring them is detected.
        plain_joint = exact_joint(model, None, settings)
        assert min(chi_square_p(pair_counts(runs, i), pair_marginal(plain_joint, i)) for i in range(3)) < 1e-3


def test_pq_rule_with_a_dspark_network_drafter(model):
    """The drafter network's own sampling path (Markov chain over sampled
    drafts), with a random drafter whose q overlaps p only partly."""
    drafter = random_dspark_drafter(model)
    runs, accepted = sample_runs(model, drafter, None, seed=23, sampler=make_sampler(temp=1.0), samples=1200)
    assert drafter.stats.rule == "p/q" and accepted > 0
    joint = exact_joint(model, 1.0)
    for i in range(STEPS - 1):
        assert chi_square_p(pair_counts(runs, i), pair_marginal(joint, i)) > 1e-3
