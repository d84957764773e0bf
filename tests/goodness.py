"""Goodness-of-fit tests for sampled token sequences (numpy only).

A generated sequence x_1..x_N is an exact sample of plain decoding iff each
x_t is drawn from p_t, the distribution plain decoding would sample from
given x_<t.  The p_t are computed afterwards by running the plain target
(with its processors and sampler filters) over the sequence, so long runs
that cross many round boundaries can be checked, not only the first tokens.

Three statistics, each with a known null distribution:

- ``token_test``: per-token counts against their expected sum of p_t,
  with the exact covariance (catches a token systematically over- or
  under-produced, e.g. a logits processor missing on some positions).
- ``pit_test``: the randomised probability-integral transform
  u_t = F_t(x_t-) + U p_t(x_t), tokens ordered by decreasing p_t, is iid
  uniform under the null, whatever p_t is (catches distributions that are
  too sharp or too flat, e.g. a wrong temperature or residual).
- ``pit_mean_test``: the mean of u is 1/2 (the sharpest check for a
  distribution that is too sharp or too flat overall).
- ``pair_test``: non-overlapping pairs (u_t, u_t+1) are uniform on the
  square (catches dependence between consecutive tokens, e.g. across a
  round boundary).

Every statistic may be stratified by a label known before x_t is drawn
(here: the token's slot in its speculative round), which keeps the null.
"""

import math

import numpy as np


def chi2_sf(x: float, df: int) -> float:
    """P(chi2_df > x): the regularized upper incomplete gamma Q(df/2, x/2)."""
    if x <= 0:
        return 1.0
    a, z = df / 2.0, x / 2.0
    log_prefix = -z + a * math.log(z) - math.lgamma(a)
    if z < a + 1:  # series for P, then Q = 1 - P
        term = total = 1.0 / a
        n = 0
        while abs(term) > 1e-15 * abs(total):
            n += 1
            term *= z / (a + n)
            total += term
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    # Continued fraction for Q (modified Lentz).
    tiny = 1e-300
    b = z + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(log_prefix) * h


def _quadratic_form(deviation: np.ndarray, covariance: np.ndarray):
    """(d' C^+ d, rank C): chi-square distributed under the null."""
    eigenvalues, vectors = np.linalg.eigh(covariance)
    keep = eigenvalues > eigenvalues.max() * 1e-9
    projected = vectors[:, keep].T @ deviation
    return float((projected**2 / eigenvalues[keep]).sum()), int(keep.sum())


def token_test(probs: np.ndarray, tokens: np.ndarray, strata=None):
    """(statistic, df) of observed token counts vs sum of p_t, per stratum."""
    stat, df = 0.0, 0
    for rows in _strata(len(tokens), strata):
        p = probs[rows]
        observed = np.bincount(tokens[rows], minlength=p.shape[1]).astype(np.float64)
        covariance = np.diag(p.sum(0)) - p.T @ p
        s, d = _quadratic_form(observed - p.sum(0), covariance)
        stat, df = stat + s, df + d
    return stat, df


def pit(probs: np.ndarray, tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Randomised PIT values, tokens ordered by decreasing probability
    (ties by id), so a too-sharp distribution piles u up near 0."""
    order = np.argsort(-probs, axis=1, kind="stable")
    ranked = np.take_along_axis(probs, order, axis=1)
    rank = np.argmax(order == tokens[:, None], axis=1)
    below = np.cumsum(ranked, axis=1) - ranked
    rows = np.arange(len(tokens))
    return below[rows, rank] + rng.uniform(size=len(tokens)) * ranked[rows, rank]


def _uniform_cells(counts: np.ndarray):
    n = counts.sum()
    expected = n / counts.size
    return float(((counts - expected) ** 2 / expected).sum()), counts.size - 1


def pit_test(u: np.ndarray, bins: int = 8, strata=None):
    """(statistic, df): u is uniform in each stratum."""
    stat, df = 0.0, 0
    for rows in _strata(len(u), strata):
        counts = np.bincount(np.minimum((u[rows] * bins).astype(int), bins - 1), minlength=bins)
        s, d = _uniform_cells(counts)
        stat, df = stat + s, df + d
    return stat, df


def pit_mean_test(u: np.ndarray):
    """(statistic, 1): the mean of u is 1/2 (variance 1/12 per value).  A
    distribution sharpened or flattened by total variation d shifts it by
    about d/2, so this is the most sensitive check for that shape."""
    z = (u.mean() - 0.5) * math.sqrt(12 * len(u))
    return z * z, 1


def pair_test(u: np.ndarray, bins: int = 4, breaks=()):
    """(statistic, df): non-overlapping consecutive pairs are uniform on the
    square.  ``breaks`` are indices where a new independent run starts (no
    pair crosses them)."""
    cells = []
    for run in np.split(u, list(breaks)):
        m = len(run) // 2 * 2
        b = np.minimum((run[:m] * bins).astype(int), bins - 1)
        cells.append(b[0::2] * bins + b[1::2])
    return _uniform_cells(np.bincount(np.concatenate(cells), minlength=bins * bins))


def _strata(n: int, labels):
    if labels is None:
        return [np.arange(n)]
    labels = np.asarray(labels)
    return [np.flatnonzero(labels == v) for v in np.unique(labels)]


def chi_square_p(observed: np.ndarray, expected_probs: np.ndarray) -> float:
    """Pearson's test of counts against fixed probabilities (cells expected
    below 5 pooled into one)."""
    n = observed.sum()
    expected = expected_probs * n
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    assert observed[expected_probs == 0].sum() == 0, "counts on impossible cells"
    obs, exp = obs[keep], exp[keep]
    return chi2_sf(float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1)
