"""Sampled generation through the round loop is distributed like plain sampling.

With a sampler, a draft is kept when it equals the token the caller's sampler
draws from the target at that position (sample-and-match).  These tests
compare the empirical distribution of consecutive token pairs, including the
pair that straddles a round boundary, with the target's exact distribution
computed by enumerating every continuation of a tiny-vocabulary model.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

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


def exact_joint(model, temp):
    """P(t1..t4) for every continuation, by batched forwards over the tree."""
    joint = np.ones((1,))
    prefixes = np.array([PROMPT])
    for _ in range(STEPS):
        logits = model(mx.array(prefixes))[:, -1, :].astype(mx.float32)
        probs = np.array(mx.softmax(logits / temp, axis=-1))
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


def sample_runs(model, drafter, temp, seed):
    mx.random.seed(seed)
    sampler = make_sampler(temp=temp)
    runs = np.zeros((SAMPLES, STEPS), dtype=np.int64)
    for s in range(SAMPLES):
        gen = speculative_generate_step(mx.array(PROMPT), model, drafter, max_tokens=STEPS, sampler=sampler)
        runs[s] = [t for t, _, _ in gen]
    return runs


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
    runs = sample_runs(model, drafter, temp, seed=11)
    stats = drafter.stats  # of the last run; acceptance overall is checked below
    assert stats.rounds >= 1

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
