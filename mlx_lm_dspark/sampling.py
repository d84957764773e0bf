"""Sampler settings, the distributions they sample from, and the speculative
acceptance rule.

mlx-lm's ``make_sampler`` returns an opaque function; once this package is
active the functions it returns carry their ``SamplerSettings`` (see
``hosts.mlx_lm.patch_sample_utils``), so the round loop can compute the exact
distribution p the sampler draws from and run DSpark's p/q rule.  A sampler
whose distribution is unknown (a user's own function, or XTC, which flips its
own coin) keeps the sample-and-match rule, which is exact for any sampler.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import mlx.core as mx
from mlx_lm import sample_utils
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

GREEDY = "greedy"  # argmax matching
PQ = "p/q"  # accept d with min(1, p(d)/q(d)), residual max(0, p - q)
MATCH = "sample-and-match"  # accept d when it equals the caller's sampled token


@dataclass(frozen=True)
class SamplerSettings:
    """The arguments of mlx-lm's ``make_sampler``."""

    temp: float = 0.0
    top_p: float = 0.0
    min_p: float = 0.0
    min_tokens_to_keep: int = 1
    top_k: int = 0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1


def _argmax(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


# mlx-lm >= 0.32 has one greedy sampler, which ``make_sampler(temp=0)``
# returns; before, that call made a new argmax function each time, which
# carries its settings like any other sampler it makes.
greedy_sampler = getattr(sample_utils, "greedy_sampler", _argmax)


def settings_of(sampler) -> Optional[SamplerSettings]:
    """Settings of a sampler made by mlx-lm, or None for an opaque one."""
    if sampler is None or sampler is greedy_sampler:
        return SamplerSettings()
    return getattr(sampler, "dspark_settings", None)


def choose_rows(k: int, logits: mx.array, chooses: Optional[List[Optional[Callable]]]) -> Tuple[mx.array, Optional[mx.array]]:
    """Draft ``k`` of every row of a batch from its logits [B, V]: the argmax
    when ``chooses`` is None, else each row's ``choose(k, row)`` (None: the
    argmax, its q a point mass).  Returns tokens [B] uint32 and q rows
    [B, V] (None with no ``chooses``)."""
    if chooses is None:
        return mx.argmax(logits, axis=-1).astype(mx.uint32), None
    tokens, qs = [], []
    for b, choose in enumerate(chooses):
        if choose is None:
            t = mx.argmax(logits[b : b + 1], axis=-1).astype(mx.uint32)
            q = mx.where(mx.arange(logits.shape[-1])[None] == t[:, None], 0.0, -mx.inf)
        else:
            t, q = choose(k, logits[b : b + 1])
        tokens.append(t.reshape(1).astype(mx.uint32))
        qs.append(q)
    return mx.concatenate(tokens), mx.concatenate(qs)


def rule_for(sampler) -> str:
    settings = settings_of(sampler)
    if settings is None or settings.xtc_probability > 0:
        return MATCH
    return GREEDY if settings.temp == 0 else PQ


def distribution(logprobs: mx.array, settings: SamplerSettings) -> mx.array:
    """Log-probabilities of what ``make_sampler(**settings)`` draws from
    ``logprobs`` (rows): its filters in its order, then the temperature."""
    if 0 < settings.top_p < 1.0:
        logprobs = apply_top_p(logprobs, settings.top_p)
    if settings.min_p != 0.0:
        logprobs = apply_min_p(logprobs, settings.min_p, settings.min_tokens_to_keep)
    if settings.top_k > 0:
        logprobs = apply_top_k(logprobs, settings.top_k)
    scaled = logprobs * (1 / settings.temp)
    return scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)


def sample(logp: mx.array) -> mx.array:
    return mx.random.categorical(logp).astype(mx.uint32)


def accept_pq(p: mx.array, q: mx.array, drafts: mx.array):
    """DSpark/speculative-sampling acceptance, entirely on device.

    ``p``: [n+1, V] target log-probabilities at the verified positions,
    ``q``: [n, V] drafter log-probabilities the drafts were sampled from,
    ``drafts``: [n].  Draft k is kept with probability min(1, p(d_k)/q(d_k))
    while all before it were kept; the token after the kept drafts is drawn
    from normalize(max(0, p - q)) at the first rejection, or from p after a
    fully accepted block.  ``q`` None: deterministic drafts (a point mass
    on each, as lookup proposes), kept with probability p(d_k), the residual
    normalize(max(0, p - onehot(d_k))).  Returns (number accepted, that next
    token [1]).
    """
    n = drafts.size
    if n == 0:
        return mx.array(0), sample(p[:1])
    rows = mx.arange(n)
    log_ratio = p[rows, drafts] - (q[rows, drafts] if q is not None else 0.0)
    u = mx.random.uniform(shape=(n,))
    kept = (mx.log(u) < log_ratio).astype(mx.int32)
    accepted = mx.cumprod(kept).sum()
    if q is None:
        point = mx.arange(p.shape[-1])[None] == drafts[:, None]
        residual = mx.where(point, 0.0, mx.exp(p[:n]))
    else:
        residual = mx.maximum(mx.exp(p[:n]) - mx.exp(q), 0.0)
    # p == q exactly leaves no residual mass; that row is then never used
    # (rejection has probability 0), but keep it a valid distribution.
    residual = mx.where(residual.sum(axis=-1, keepdims=True) > 0, residual, mx.exp(p[:n]))
    choices = mx.concatenate([mx.log(residual), p[n:]], axis=0)
    token = sample(mx.take(choices, accepted[None], axis=0))
    return accepted, token
