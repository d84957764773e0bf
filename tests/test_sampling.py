"""The acceptance rule and sampler-settings recovery, against closed forms."""

import inspect

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import make_sampler

from mlx_lm_dspark.sampling import GREEDY, MATCH, PQ, SamplerSettings, accept_pq, distribution, rule_for
from goodness import chi_square_p

V = 6


def _logp(values):
    p = np.asarray(values, dtype=np.float64)
    return mx.array(np.log(p / p.sum()), dtype=mx.float32)


def test_samplers_from_make_sampler_carry_their_settings():
    s = make_sampler(0.7, top_p=0.9, min_p=0.05, top_k=7)
    # Unset arguments carry the host's defaults (xtc_threshold: 0.1 since mlx-lm 0.32, 0.0 before).
    xtc_threshold = inspect.signature(make_sampler).parameters["xtc_threshold"].default
    assert s.dspark_settings == SamplerSettings(temp=0.7, top_p=0.9, min_p=0.05, top_k=7,
                                                xtc_threshold=xtc_threshold)
    assert rule_for(s) == PQ
    # mlx-lm 0.32's make_sampler(0.0) is its shared greedy_sampler, 0.31's a new function each call.
    assert rule_for(make_sampler(0.0)) == rule_for(make_sampler(temp=0.0, top_k=5)) == rule_for(None) == GREEDY
    assert rule_for(make_sampler(1.0, xtc_probability=0.5)) == MATCH  # XTC flips its own coin
    assert rule_for(lambda logprobs: mx.argmax(logprobs, axis=-1)) == MATCH


@pytest.mark.parametrize("settings", [SamplerSettings(temp=0.8), SamplerSettings(temp=1.3, top_k=3),
                                      SamplerSettings(temp=1.0, top_p=0.7), SamplerSettings(temp=1.0, min_p=0.3)])
def test_distribution_is_what_the_sampler_draws(settings):
    """The computed p equals the empirical distribution of mlx-lm's own sampler."""
    logprobs = _logp([0.35, 0.25, 0.2, 0.1, 0.06, 0.04])
    sampler = make_sampler(settings.temp, settings.top_p, settings.min_p, top_k=settings.top_k)
    mx.random.seed(5)
    draws = np.array(sampler(mx.broadcast_to(logprobs, (20000, V))))
    p = np.array(mx.exp(distribution(logprobs[None], settings))[0])
    counts = np.bincount(draws, minlength=V)
    assert (counts[p == 0] == 0).all()
    assert chi_square_p(counts, p) > 1e-3


def test_accept_pq_matches_closed_form():
    """One draft per trial: P(kept) = sum(min(p, q)); the emitted token
    (kept draft or residual sample) is distributed as p; after a kept draft
    the bonus is distributed as the next row of p."""
    p0, p1 = [0.5, 0.2, 0.1, 0.1, 0.05, 0.05], [0.1, 0.1, 0.1, 0.3, 0.3, 0.1]
    q0 = [0.2, 0.4, 0.05, 0.05, 0.2, 0.1]
    p, q = mx.concatenate([_logp(p0)[None], _logp(p1)[None]]), _logp(q0)[None]
    mx.random.seed(9)
    trials = 6000
    drafts = np.array(mx.random.categorical(mx.broadcast_to(q, (trials, V))))
    kept, first, bonus = 0, np.zeros(V), np.zeros(V)
    for d in drafts:
        a, token = accept_pq(p, q, mx.array([int(d)], dtype=mx.uint32))
        a, token = a.item(), token.item()
        kept += a
        first[d if a else token] += 1
        if a:
            bonus[token] += 1
    alpha = np.minimum(np.array(p0) / sum(p0), np.array(q0) / sum(q0)).sum()
    sd = np.sqrt(alpha * (1 - alpha) / trials)
    assert abs(kept / trials - alpha) < 4 * sd
    assert chi_square_p(first, np.array(p0) / sum(p0)) > 1e-3
    assert chi_square_p(bonus, np.array(p1) / sum(p1)) > 1e-3


def test_accept_pq_point_mass_drafter_and_empty_block():
    p = _logp([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])[None]
    q = mx.where(mx.arange(V)[None] == 1, 0.0, -mx.inf)  # a deterministic draft of token 1
    mx.random.seed(1)
    outcomes = [accept_pq(mx.concatenate([p, p]), q, mx.array([1], dtype=mx.uint32)) for _ in range(3000)]
    kept = np.mean([a.item() for a, _ in outcomes])
    assert abs(kept - 0.2) < 4 * np.sqrt(0.2 * 0.8 / 3000)
    assert all(t.item() != 1 for a, t in outcomes if a.item() == 0)  # the residual excludes the draft
    a, token = accept_pq(p, mx.zeros((0, V)), mx.zeros((0,), mx.uint32))
    assert a.item() == 0 and 0 <= token.item() < V
