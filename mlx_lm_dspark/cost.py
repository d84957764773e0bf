"""What a speculative round costs on this machine, measured once and cached.

Verifying K tokens costs more than verifying one (on CPUs roughly K times as
much, on Apple GPUs far less), so the best number of drafts per round depends
on the machine, the target's size and precision, and the drafter.  The cost
model holds the target's forward time for every verify width 1..block+1 and
the drafter's time per round, measured in a few seconds on first use and
kept in the user's cache directory, keyed by everything that changes them.
A drafter that drafts one token per forward (EAGLE3) also has its cost per
drafted token measured: its proposal costs less the fewer drafts it makes,
so the cap is best decided before it drafts.
"""

import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
from mlx.utils import tree_flatten


FORMAT = 10  # bump when what is measured changes
MEASURED_SPAN = 256  # the cost model is measured with its context and this many more positions cached


@dataclass
class CostModel:
    verify_ms: List[float]  # [w - 1]: a round verifying w tokens (w = 1: a pipelined plain step)
    draft_ms: float  # one drafter round: context update + a full-block proposal
    context: int = 0  # positions in the caches when the above were measured
    # Growth per cached position (attention reads the whole context, so a
    # round costs more as the context grows).
    verify_ms_per_position: Optional[List[float]] = None
    draft_ms_per_position: float = 0.0
    # What each draft fewer than a full block saves of ``draft_ms``: 0 for a
    # drafter that drafts its block at once (DSpark/DFlash), one drafter
    # forward for one that drafts token by token (EAGLE3).
    draft_ms_per_draft: float = 0.0

    @property
    def max_drafts(self) -> int:
        return len(self.verify_ms) - 1

    @property
    def sequential(self) -> bool:
        """Whether a proposal's cost grows with each drafted token."""
        return self.draft_ms_per_draft > 0

    def draft_ms_for(self, drafts: int) -> float:
        """A proposal of ``drafts`` drafts (at most ``max_drafts``)."""
        if not self.draft_ms_per_draft:
            return self.draft_ms
        return max(self.draft_ms - self.draft_ms_per_draft * (self.max_drafts - drafts), 0.0)

    def at(self, context: int) -> "CostModel":
        """The costs with ``context`` positions in the caches."""
        if not self.verify_ms_per_position:
            return self
        d = context - self.context
        return CostModel(
            verify_ms=[v + g * d for v, g in zip(self.verify_ms, self.verify_ms_per_position)],
            draft_ms=self.draft_ms + self.draft_ms_per_position * d,
            context=context,
            draft_ms_per_draft=self.draft_ms_per_draft,
        )

    def round_ms(self, drafts: int, scale=(1.0, 1.0)) -> float:
        """A round's time; ``scale`` = (undrafted, drafted) rounds' measured
        time over the cost model's, learned while decoding (the machine's
        speed now against when it was measured, plus host work).  A drafted
        round's verify is never cheaper than a plain step: otherwise, when
        plain steps are timed slower than their model, a draft nobody accepts
        could look cheaper than a plain step, and a loop that drafts every
        round would never correct the plain steps' scale."""
        if drafts:
            return self.draft_ms_for(drafts) * scale[1] + max(self.verify_ms[drafts] * scale[1], self.verify_ms[0] * scale[0])
        return self.verify_ms[0] * scale[0]

    def expected_tokens(self, accept: List[float], drafts: int) -> float:
        """1 + E[accepted] when draft k is kept with conditional probability
        ``accept[k]`` given all before it were."""
        total, alive = 1.0, 1.0
        for a in accept[:drafts]:
            alive *= a
            total += alive
        return total

    def tokens_per_ms(self, accept: List[float], drafts: int, scale=(1.0, 1.0)) -> float:
        return self.expected_tokens(accept, drafts) / max(self.round_ms(drafts, scale), 1e-6)

    def best_cap(self, accept: List[float], limit: Optional[int] = None, scale=(1.0, 1.0)) -> int:
        """The number of drafts with the highest expected tokens per second
        (the smallest such number on a tie)."""
        limit = min(self.max_drafts, len(accept) if limit is None else limit)
        verify, drafted = self.verify_ms, scale[1]
        plain = verify[0] * scale[0]
        draft = self.draft_ms * drafted
        best, best_rate = 0, 1.0 / max(plain, 1e-6)
        total = alive = 1.0
        for k in range(1, limit + 1):  # one pass: E[accepted | k] grows term by term (``round_ms`` inlined)
            alive *= accept[k - 1]
            total += alive
            if self.draft_ms_per_draft:
                draft = self.draft_ms_for(k) * drafted
            check = verify[k] * drafted
            rate = total / max(draft + (check if check > plain else plain), 1e-6)
            if rate > best_rate:
                best, best_rate = k, rate
        return best


def cache_dir() -> Path:
    root = os.environ.get("MLX_LM_DSPARK_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlx-lm-dspark"


def _nbytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in sorted(d.items()) if isinstance(v, (str, int, float, bool, list, tuple, type(None)))}


def cache_key(target, drafter) -> str:
    """Everything that changes the costs: both models' shapes, sizes in bytes
    (precision, quantization), the mlx version and the machine."""
    from .target import text_args

    facts = {
        "format": FORMAT,
        "target": _jsonable(text_args(target.model)),
        "target_bytes": _nbytes(target.model),
        "drafter": _jsonable(vars(drafter.args)),
        "drafter_bytes": _nbytes(drafter) if hasattr(drafter, "parameters") else 0,
        "drafter_kind": getattr(drafter, "kind", None),
        "max_drafts": drafter.max_drafts,
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "machine": [platform.machine(), platform.processor(), os.cpu_count()],
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def relative_costs(samples) -> List[List[float]]:
    """Per setting and piece, the typical cost from repetitions of every
    piece (``samples[setting][piece][repetition]``, piece 0 of setting 0 the
    plain step): the median over repetitions of the piece's time over the
    plain step's in the same repetition, times the median plain step.

    A shared machine's speed drifts over seconds; one repetition takes a
    fraction of a second, so the ratios within it keep the pieces' relative
    costs, which decide the cap, whatever phase each repetition fell in.  The
    median then drops the bursts that hit single pieces.  (A low quantile of
    each piece's own times would not be the typical cost: a wide verify's
    times spread further than a plain step's.)"""
    base, ratios = _ratios(samples)
    return [[base * statistics.median(r) for r in pieces] for pieces in ratios]


def _ratios(samples):
    """(the median plain step, each piece's times over the plain step's in
    the same repetition)."""
    reference = samples[0][0]
    return statistics.median(reference), [
        [[t / r for t, r in zip(times, reference)] for times in pieces] for pieces in samples]


def relative_errors(samples) -> List[List[float]]:
    """The standard error of each ``relative_costs`` value: its ratios'
    spread (median absolute deviation, as a standard deviation) over the
    root of the number of repetitions, for a median."""
    base, ratios = _ratios(samples)
    out = []
    for pieces in ratios:
        row = []
        for r in pieces:
            middle = statistics.median(r)
            spread = 1.4826 * statistics.median(abs(x - middle) for x in r)
            row.append(base * 1.2533 * spread / math.sqrt(len(r)))
        out.append(row)
    return out


def towards_line(values: List[float], errors: List[float]) -> List[float]:
    """Verify costs by width, each pulled towards the least-squares line
    through all of them (weighted by 1 / error^2: a width hit by bursts moves
    it little) as far as its distance from the line is within its timing
    error (shrunk by 1 - error^2 / distance^2, zero when negative).

    With a few seconds of repetitions on a noisy machine one width's error
    can be as large as the true difference between neighbouring caps, so an
    unsmoothed model would pick different caps from run to run for the same
    pair; a real step between widths (a kernel switch on a GPU) stands well
    clear of the errors and is kept."""
    n = len(values)
    if n < 3:
        return list(values)
    weights = [1.0 / (e * e + (1e-3 * v) ** 2 + 1e-12) for v, e in zip(values, errors)]
    total = sum(weights)
    middle_x = sum(w * x for x, w in enumerate(weights)) / total
    middle_y = sum(w * v for v, w in zip(values, weights)) / total
    slope = sum(w * (x - middle_x) * (v - middle_y) for x, (v, w) in enumerate(zip(values, weights))) / sum(
        w * (x - middle_x) ** 2 for x, w in enumerate(weights))
    out = []
    for x, (v, e) in enumerate(zip(values, errors)):
        line = middle_y + slope * (x - middle_x)
        d = v - line
        keep = max(0.0, 1.0 - (e * e) / (d * d)) if d else 0.0
        out.append(line + keep * d)
    return out


def non_decreasing(values: List[float]) -> List[float]:
    """The closest non-decreasing sequence (pool adjacent violators): a wider
    verify never costs less, so a dip between widths is timing noise."""
    blocks = []  # [mean, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, n1), (m2, n2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2]
    return [m for m, n in blocks for _ in range(n)]


class Sampler:
    """Times the target at every verify width and one drafter round (and,
    for a drafter drafting token by token, a one-draft round too), with
    ``context`` and ``context + longer`` positions cached (the growth with
    context is linear: attention reads every cached position).  Each
    ``take`` times every piece once (interleaved, so a slow phase of the
    machine touches all alike); ``model`` turns the repetitions so far into
    a cost model.  The benchmark keeps taking repetitions between its runs,
    so its predictions see the machine as the runs did."""

    def __init__(self, target, drafter, context: int = 32, longer: int = MEASURED_SPAN):
        self.target, self.drafter = target, drafter
        # A drafter whose proposal runs one forward per draft says so.
        self.sequential = bool(getattr(drafter, "sequential_drafts", False)) and drafter.max_drafts > 1
        self.context, self.longer = context, longer
        # Own keys: measuring must not move the global RNG (seeded runs stay
        # reproducible whether or not the costs were cached).
        self._keys = iter(mx.random.split(mx.random.key(0), 64))
        self._token_key = next(self._keys)
        self._settings = [self._timers(context), self._timers(context + longer)]
        for timers in self._settings:  # warm-up
            for timer in timers:
                timer()
        self.samples = [[[] for _ in timers] for timers in self._settings]

    @property
    def repetitions(self) -> int:
        return len(self.samples[0][0])

    def _timers(self, length):
        """Timers for caches holding ``length`` positions."""
        target, drafter = self.target, self.drafter
        vocab = target.vocab_size or 2
        token_key = self._token_key
        anchor = mx.array([1], dtype=mx.uint32)
        cache, draft_cache = target.make_cache(), drafter.make_cache()
        prompt = mx.random.randint(0, vocab, (1, length), key=next(self._keys)).astype(mx.uint32)
        _, features = target(prompt, cache)
        drafter.add_context(draft_cache, features, 0, prompt[0])
        mx.eval([c.state for c in cache] + [c.state for c in draft_cache])
        snapshot = [c.state for c in cache]

        def restore():
            """Back to the context alone.  Trimmed like the round loop rolls
            back where the cache allows it: assigning the snapshot sizes the
            buffer exactly, so the next forward would pay for regrowing it,
            which a real round (writing into spare room) does not."""
            for c, state in zip(cache, snapshot):
                if c.is_trimmable():
                    c.trim(c.offset - length)
                else:
                    c.state = state

        def verify(width):
            """A round with drafts: forward, the acceptance ops, one sync."""
            tokens = mx.random.randint(0, vocab, (1, width), key=token_key).astype(mx.uint32)
            mx.eval(tokens)
            start = time.perf_counter()
            logits, features = target(tokens, cache, start_early=True)
            logprobs = logits[0] - mx.logsumexp(logits[0], axis=-1, keepdims=True)
            choice = mx.argmax(logprobs, axis=-1)
            kept = mx.cumprod((choice[:-1] == tokens[0, 1:]).astype(mx.int32)).sum()
            mx.eval(kept, choice, features)
            elapsed = time.perf_counter() - start
            restore()
            return elapsed, features

        def plain_steps(steps=8):
            """Per-token time of rounds without drafts, which are pipelined like
            plain decoding (the next forward queued before the token is read).
            Timed as decoding is, from the first token read to the last: the
            pipeline's start (a graph built while the device idles) is paid
            once per generation, not once per step."""
            token = mx.array([[1]], dtype=mx.uint32)
            reads = []
            for _ in range(steps + 1):
                logits, _ = target(token, cache)
                following = mx.argmax(logits[0, -1:] - mx.logsumexp(logits[0, -1:], axis=-1, keepdims=True), axis=-1)
                mx.async_eval(following)
                token.item()  # the step before's token (at first, the input)
                reads.append(time.perf_counter())
                token = following[None]
            token.item()
            reads.append(time.perf_counter())
            restore()
            return (reads[-1] - reads[1]) / steps

        _, new_features = verify(2)
        anchor_pair = mx.array([1, 1], dtype=mx.uint32)  # the tokens of the two committed positions

        def draft_round(drafts):
            start = time.perf_counter()
            drafter.add_context(draft_cache, new_features, length, anchor_pair)
            proposal = drafter.propose(draft_cache, anchor, length + new_features.shape[1], drafts)
            mx.eval([x for x in proposal if x is not None])
            elapsed = time.perf_counter() - start
            for c in draft_cache:
                c.trim(new_features.shape[1])
            return elapsed

        widths = range(2, drafter.max_drafts + 2)
        timers = [plain_steps] + [lambda w=w: verify(w)[0] for w in widths]
        timers.append(lambda: draft_round(drafter.max_drafts))
        if self.sequential:  # and a one-draft proposal: the line through both is the cost per draft
            timers.append(lambda: draft_round(1))
        return timers

    def take(self) -> float:
        """One more repetition of every piece; returns the seconds it took."""
        began = time.perf_counter()
        for timers, into in zip(self._settings, self.samples):
            for timer, values in zip(timers, into):
                values.append(1000 * timer())
        return time.perf_counter() - began

    def model(self) -> CostModel:
        """The cost model of the repetitions so far: per piece its typical
        cost (``relative_costs``), verify widths smoothed within their errors
        (``towards_line``), wider verifies never cheaper, more context never
        cheaper."""
        costs, errors = relative_costs(self.samples), relative_errors(self.samples)
        sequential = getattr(self, "sequential", False)
        widths = len(self.samples[0]) - (2 if sequential else 1)  # pieces: plain, verifies, drafter round(s)
        short, long = [c[:1] + non_decreasing(towards_line(c[1:widths], e[1:widths])) + c[widths:]
                       for c, e in zip(costs, errors)]
        growth = [max(0.0, (b - a) / self.longer) for a, b in zip(short, long)]
        growth = growth[:1] + non_decreasing(growth[1:widths]) + growth[widths:]  # more queries read more
        per_draft = 0.0
        if sequential:  # short[widths + 1]: a one-draft proposal
            per_draft = max(0.0, (short[widths] - short[widths + 1]) / (widths - 2))
        return CostModel(
            verify_ms=short[:widths], draft_ms=short[widths], context=self.context,
            verify_ms_per_position=growth[:widths], draft_ms_per_position=growth[widths],
            draft_ms_per_draft=per_draft,
        )


def extend(sampler: Sampler, reps: int = 3, budget_s: float = 2.0, max_reps: int = 40) -> Sampler:
    """Take at least ``reps`` repetitions of every piece, more while within
    ``budget_s`` (at most ``max_reps``)."""
    began = time.perf_counter()
    while sampler.repetitions < reps or (sampler.repetitions < max_reps and time.perf_counter() - began < budget_s):
        sampler.take()
    return sampler


def measure(target, drafter, context: int = 32, longer: int = MEASURED_SPAN, **budget) -> CostModel:
    """The pair's cost model, measured now (``budget``: see ``extend``)."""
    return extend(Sampler(target, drafter, context, longer), **budget).model()


def cache_path(target, drafter) -> Path:
    return cache_dir() / f"cost-{cache_key(target, drafter)}.json"


def save(target, drafter, model: CostModel) -> None:
    """Cache ``model`` as the pair's cost model on this machine.

    Concurrent processes may both write; each writes its file atomically
    (temporary file + rename), so readers never see a partial one."""
    path = cache_path(target, drafter)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".cost-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(model), f)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs a re-measure next time


def _finite(x, low: float) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= low


def _damage(data, widths: int) -> Optional[str]:
    """What is wrong with a cached cost model's JSON, or None when it can be
    used for a drafter proposing ``widths - 1`` drafts."""
    if not isinstance(data, dict):
        return f"it holds a JSON {type(data).__name__}, not an object"
    unknown = sorted(set(data) - set(CostModel.__dataclass_fields__))
    if unknown:
        return f"unknown fields {unknown}"
    verify, growth = data.get("verify_ms"), data.get("verify_ms_per_position")
    if not isinstance(verify, list) or len(verify) != widths:
        return f"verify_ms is not a list of {widths} times"
    if not all(_finite(v, 0.0) and v > 0 for v in verify):
        return "verify_ms holds a time that is not a positive number"
    if not (_finite(data.get("draft_ms"), 0.0) and data["draft_ms"] > 0):
        return "draft_ms is not a positive number"
    if not (isinstance(data.get("context", 0), int) and data.get("context", 0) >= 0):
        return "context is not a non-negative integer"
    if growth is not None and not (isinstance(growth, list) and len(growth) == widths
                                   and all(_finite(g, 0.0) for g in growth)):
        return f"verify_ms_per_position is not a list of {widths} non-negative numbers"
    if not _finite(data.get("draft_ms_per_position", 0.0), 0.0):
        return "draft_ms_per_position is not a non-negative number"
    if not _finite(data.get("draft_ms_per_draft", 0.0), 0.0):
        return "draft_ms_per_draft is not a non-negative number"
    return None


def _say(message: str) -> None:
    print(f"mlx-lm-dspark: {message}", file=sys.stderr, flush=True)


def _pair_name(target, drafter) -> str:
    from .target import text_args

    model_type = text_args(target.model).get("model_type") or type(target.model).__name__
    source = getattr(drafter, "source", None)
    return f"the {model_type} target with drafter {source}" if source else f"the {model_type} target and its drafter"


def cached(target, drafter) -> Optional[CostModel]:
    """The pair's cached cost model, or None when there is none or it is
    damaged (said on stderr: it is then measured again)."""
    path = cache_path(target, drafter)
    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        data = json.loads(text)
        problem = _damage(data, drafter.max_drafts + 1)
    except ValueError as e:  # not JSON, or not UTF-8
        problem = f"it is not valid JSON ({e})"
    if problem is None:
        return CostModel(**data)
    _say(f"the cached cost model {path} is damaged ({problem}); measuring it again.")
    return None


def load_or_measure(target, drafter, refresh: bool = False) -> CostModel:
    """The cached cost model of this pair on this machine, measured (and
    cached) if absent or damaged, or now with ``refresh``.  Measuring on
    first use is said once on stderr, with where the result is kept."""
    if not refresh:
        model = cached(target, drafter)
        if model is not None:
            return model
        _say(
            f"measuring this machine's speculative costs for {_pair_name(target, drafter)} "
            f"(a few seconds, once; cached in {cache_dir()})"
        )
    model = measure(target, drafter)
    save(target, drafter, model)
    return model
