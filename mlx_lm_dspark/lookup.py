"""Lookup (n-gram) speculation: drafts copied from the context itself.

Much of what is generated repeats the context: code pasted and edited, a
quoted passage, reformatted JSON.  There, the tokens that followed an
earlier occurrence of the last few tokens are a proposal that is right for
long runs and costs no network forward.

- ``LookupIndex``: a drafter-cache entry holding the committed token ids and,
  for every n-gram of 1..n tokens, the positions where it ends.  It grows by
  the tokens the target reads (``add_context``) and shrinks exactly on
  rollback (``trim``), so it travels with a prompt cache across turns and
  server requests like the target's own cache entries.
- ``LookupDrafter``: the drafter-protocol proposer needing no checkpoint
  (``--draft-model ngram``, ``ngram:n=4,k=8``): the continuation of the
  longest, most recent earlier match of the last tokens.
- ``WithLookup``: a DSpark/DFlash drafter whose rounds may take the lookup
  proposal instead of the drafter's when the automatic cap's cost model
  expects more tokens per second from it (a lookup round runs no drafter
  forward).  The drafter still reads the target's states of every committed
  position, whichever proposer ran.

A lookup draft is deterministic: under sampling it is a point mass q, so the
p/q rule keeps it with probability p(d) and draws a rejection's replacement
from normalize(max(0, p - onehot(d))) (``sampling.accept_pq`` with q None).
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import mlx.core as mx

from .cost import CostModel

RESERVED = "ngram"  # the --draft-model value naming the lookup proposer
DEFAULT_N = 4  # longest n-gram matched
DEFAULT_MIN_N = 2  # shortest n-gram matched
DEFAULT_K = 8  # most drafts per proposal
DECAY = 0.95  # weight of the past in the per-slot acceptance estimates (per proposal)
PRIOR = 0.5  # acceptance assumed for a slot never judged ...
PRIOR_WEIGHT = 2.0  # ... worth this many proposals of evidence


class LookupSpecError(ValueError):
    """A malformed lookup specification (``ngram:n=...,k=...``)."""


@dataclass(frozen=True)
class LookupSettings:
    """What the lookup proposer matches and proposes."""

    n: int = DEFAULT_N  # longest n-gram matched (tried first)
    min_n: int = DEFAULT_MIN_N  # shortest n-gram matched
    k: int = DEFAULT_K  # most drafts per proposal

    @classmethod
    def from_dict(cls, params: dict) -> "LookupSettings":
        fields = {"n": "n", "min_n": "min_n", "min": "min_n", "k": "k"}
        values = {}
        for key, value in params.items():
            if key not in fields:
                raise LookupSpecError(
                    f"unknown lookup setting {key!r}; the settings are n (longest n-gram), "
                    "min (shortest n-gram) and k (most drafts per round), e.g. ngram:n=4,min=2,k=8."
                )
            try:
                values[fields[key]] = int(value)
            except (TypeError, ValueError):
                raise LookupSpecError(f"lookup setting {key}={value!r} is not an integer.") from None
        settings = cls(**values)
        if "min_n" not in values and settings.min_n > settings.n:
            settings = cls(n=settings.n, min_n=settings.n, k=settings.k)
        if not 1 <= settings.min_n <= settings.n:
            raise LookupSpecError(
                f"lookup n-gram lengths min={settings.min_n}, n={settings.n}: need 1 <= min <= n."
            )
        if settings.k < 1:
            raise LookupSpecError(f"lookup k={settings.k}: a proposal needs at least 1 draft (k >= 1).")
        return settings


def parse_spec(spec: str) -> Optional[LookupSettings]:
    """The settings a lookup specification names (``ngram``, ``ngram:n=4,k=8``),
    or None when ``spec`` is not one (a checkpoint path or repo)."""
    text = str(spec).strip()
    name, sep, rest = text.partition(":")
    if name.lower() != RESERVED:
        return None
    params = {}
    for part in filter(None, (p.strip() for p in rest.split(","))) if sep else ():
        key, eq, value = part.partition("=")
        if not eq:
            raise LookupSpecError(f"lookup setting {part!r} has no value; write it as key=value (e.g. n=4).")
        params[key.strip().lower()] = value.strip()
    return LookupSettings.from_dict(params)


def is_spec(spec) -> bool:
    """Whether ``spec`` names the lookup proposer (malformed settings included,
    so that they are reported rather than looked up on the hub)."""
    return isinstance(spec, str) and spec.strip().partition(":")[0].lower() == RESERVED


class SlotRates:
    """Per-slot conditional acceptance of a proposer's drafts, learned from
    what the target committed after them."""

    def __init__(self, slots: int):
        self.tried = [0.0] * slots
        self.kept = [0.0] * slots

    def rates(self) -> List[float]:
        return [(k + PRIOR * PRIOR_WEIGHT) / (t + PRIOR_WEIGHT) for k, t in zip(self.kept, self.tried)]

    def record(self, judged: int, accepted: int) -> None:
        for s in range(len(self.tried)):
            self.tried[s] *= DECAY
            self.kept[s] *= DECAY
            if s < judged:
                self.tried[s] += 1.0
                self.kept[s] += s < accepted


class LookupIndex:
    """A drafter-cache entry: the committed tokens and where each n-gram of
    1..``n`` tokens ends, updated per token and undone exactly on ``trim``.
    It also remembers the last proposal made from it (``judge_last``), so
    proposers can learn how often their drafts are kept."""

    def __init__(self, n: int, slots: int):
        self.n = n
        self.tokens: List[int] = []
        self.ends: Dict[Tuple[int, ...], List[int]] = {}  # n-gram -> positions of its last token, ascending
        self.last: Optional[tuple] = None  # (proposer, anchor position, drafts: a list or an mx.array)
        self.slots = slots
        self.rates: Dict[str, SlotRates] = {}  # per proposer ("drafter", "lookup<n>": a match of n tokens)

    # --- a cache entry as mlx-lm's prompt caches see it

    @property
    def offset(self) -> int:
        return len(self.tokens)

    @property
    def state(self) -> list:
        return []  # nothing on the device

    @property
    def nbytes(self) -> int:
        return 8 * len(self.tokens) * (1 + self.n)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = max(0, min(n, len(self.tokens)))
        tokens, ends = self.tokens, self.ends
        for _ in range(n):
            i = len(tokens) - 1
            for length in range(1, min(self.n, i + 1) + 1):
                key = tuple(tokens[i - length + 1 : i + 1])
                positions = ends[key]
                positions.pop()
                if not positions:
                    del ends[key]
            tokens.pop()
        return n

    # --- growing and searching

    def extend(self, new: List[int]) -> None:
        tokens, ends = self.tokens, self.ends
        for t in new:
            tokens.append(int(t))
            i = len(tokens) - 1
            for length in range(1, min(self.n, i + 1) + 1):
                ends.setdefault(tuple(tokens[i - length + 1 : i + 1]), []).append(i)

    def may_match(self, min_n: int) -> bool:
        """Whether some anchor could complete a match of ``min_n`` tokens: the
        last ``min_n - 1`` committed tokens occurred earlier too.  Lets a
        proposer skip reading an anchor still being computed."""
        if min_n <= 1:
            return bool(self.tokens)
        if len(self.tokens) < min_n:
            return False
        positions = self.ends.get(tuple(self.tokens[len(self.tokens) - min_n + 1 :]), ())
        return len(positions) >= 2

    def continuation(self, anchor: int, settings: LookupSettings, limit: int) -> Tuple[List[int], int]:
        """Up to ``limit`` tokens following the most recent earlier occurrence
        of the longest suffix (``settings.n`` down to ``settings.min_n``
        tokens) of the committed tokens + ``anchor``, and the suffix's length
        (0: no match).  A match near the end continues into its own copy (a
        repeating pattern repeats on)."""
        tokens = self.tokens
        seq = tokens + [anchor]
        for length in range(min(settings.n, len(seq)), settings.min_n - 1, -1):
            positions = self.ends.get(tuple(seq[len(seq) - length :]))
            if positions:
                start = positions[-1] + 1
                out = []
                while len(out) < limit:
                    out.append(seq[start + len(out)])
                    seq.append(out[-1])
                return out, length
        return [], 0

    # --- learning from what was committed

    def remember(self, proposer: str, anchor_position: int, drafts) -> None:
        self.last = (proposer, anchor_position, drafts)

    def rates_of(self, proposer: str) -> SlotRates:
        rates = self.rates.get(proposer)
        if rates is None:
            rates = self.rates[proposer] = SlotRates(self.slots)
        return rates

    def judge_last(self, anchor: Optional[int]) -> None:
        """Compare the last proposal (verified or not) with the tokens
        committed since (and the ``anchor`` after them, when read) and record
        how many of its drafts the target would keep."""
        if self.last is None:
            return
        proposer, at, drafts = self.last
        self.last = None
        if isinstance(drafts, mx.array):
            drafts = drafts.tolist()
        seen = self.tokens[at + 1 :] + ([anchor] if anchor is not None else [])
        if at >= len(self.tokens) or not seen:
            return  # rolled back past it (a new prompt): nothing to judge
        matched = 0
        while matched < min(len(drafts), len(seen)) and drafts[matched] == seen[matched]:
            matched += 1
        judged = min(len(drafts), matched + 1, len(seen))
        self.rates_of(proposer).record(judged, matched)


def _read_anchor(anchor: mx.array) -> int:
    return int(anchor.item())


def _round_ms(now, drafts: int, scale, drafter: bool) -> float:
    """A round's time under the cost model ``now``: ``CostModel.round_ms``,
    less the drafter's forward for a lookup round."""
    if drafter or drafts == 0:
        return now.round_ms(drafts, scale)
    return max(now.verify_ms[drafts] * scale[1], now.verify_ms[0] * scale[0])


def lookup_cap(rates: List[float], available: int, lengths, rival: Optional[float] = None) -> int:
    """How many of ``available`` lookup drafts a round verifies: the number
    with the most expected tokens per millisecond under the automatic cap's
    costs (``lengths``: its ``DraftLength``), 0 when that is no more than
    ``rival`` (the best of the other proposer; None: plain decoding alone).
    With a fixed cap (``lengths`` None) all of them, unless the rival's
    expected tokens (then a count per round) are more."""
    if available == 0:
        return 0
    if lengths is None:
        expected = CostModel([1.0], 0.0).expected_tokens(rates, available)
        return available if rival is None or expected >= rival else 0
    now, scale = lengths.now, lengths.time_scale
    best, best_rate = 0, 1.0 / max(_round_ms(now, 0, scale, False), 1e-6)
    if rival is not None:
        best_rate = max(best_rate, rival)
    for c in range(1, min(available, now.max_drafts) + 1):
        rate = now.expected_tokens(rates, c) / max(_round_ms(now, c, scale, False), 1e-6)
        if rate > best_rate:
            best, best_rate = c, rate
    return best


def drafter_rate(rates: List[float], limit: int, lengths) -> float:
    """The drafter's best expected tokens per millisecond (tokens per round
    with a fixed cap) for its per-slot acceptance ``rates``."""
    if lengths is None:
        return CostModel([1.0], 0.0).expected_tokens(rates, limit)
    now, scale = lengths.now, lengths.time_scale
    cap = now.best_cap(rates, limit=min(limit, now.max_drafts), scale=scale)
    return now.tokens_per_ms(rates, cap, scale)


@dataclass(frozen=True)
class LookupArgs:
    """What the pair check reads: None matches any target."""

    family: Optional[str] = None
    vocab_size: Optional[int] = None
    hidden_size: Optional[int] = None
    num_target_layers: Optional[int] = None
    has_embeddings: bool = True
    block_size: int = DEFAULT_K
    lookup: str = ""  # the settings, as part of the cost model's key


class LookupProposals:
    """What both lookup proposers share: the index in the cache's last
    entry, kept with the token ids the target read, and each round's lookup
    continuation, remembered to be judged against what was committed (also
    when it was not verified: the estimates learn every round)."""

    settings: LookupSettings
    lengths = None  # the automatic cap of the generation under way (``plan_with``)
    sized = False  # whether the last proposal was a lookup one, sized here

    def plan_with(self, lengths) -> None:
        """The automatic cap (``autocap.DraftLength``) of the generation
        starting, or None with a fixed cap."""
        self.lengths = lengths

    def extend_index(self, cache: list, start: int, tokens: mx.array) -> None:
        index = cache[-1]
        if start != index.offset:
            index.trim(index.offset - start)
        index.extend(tokens.tolist())

    def lookup(self, index: LookupIndex, anchor: int, start: int, limit: int) -> Tuple[List[int], str]:
        """This round's continuation (remembered) and its estimates' name."""
        drafts, matched = index.continuation(anchor, self.settings, limit) if limit > 0 else ([], 0)
        name = f"lookup{matched}"
        if drafts:
            index.remember(name, start, drafts)
        return drafts, name


class LookupDrafter(LookupProposals):
    """The lookup proposer behind the drafter protocol (no checkpoint, no
    network).  It taps the target's first layer only because the round loop
    hands every drafter the target's states; it reads the token ids alone."""

    kind = "ngram"
    target_layer_ids = [0]
    confidence_threshold = None

    def __init__(self, settings: LookupSettings = LookupSettings()):
        self.settings = settings
        self.args = LookupArgs(block_size=settings.k, lookup=repr(settings))
        self.source = spec_of(settings)

    @property
    def max_drafts(self) -> int:
        return self.settings.k

    @property
    def block_size(self) -> int:
        return self.settings.k

    def make_cache(self) -> list:
        return [LookupIndex(self.settings.n, self.settings.k)]

    def add_context(self, cache: list, features: mx.array, start: int, tokens: mx.array) -> None:
        self.extend_index(cache, start, tokens)

    def propose(self, cache: list, anchor: mx.array, start: int, num_drafts: int, choose=None):
        """The lookup continuation, as long as the costs make it pay
        (possibly empty); no confidences, and q None: the drafts are point
        masses."""
        index = cache[-1]
        self.sized = True
        drafts = []
        if not index.may_match(self.settings.min_n):
            index.judge_last(None)  # no anchor read: a plain step stays pipelined
        else:
            token = _read_anchor(anchor)
            index.judge_last(token)
            found, name = self.lookup(index, token, start, num_drafts)
            drafts = found[: lookup_cap(index.rates_of(name).rates(), len(found), self.lengths)]
        return mx.array(drafts, dtype=mx.uint32), None, None


def spec_of(settings: LookupSettings) -> str:
    return f"{RESERVED}:n={settings.n},min={settings.min_n},k={settings.k}"


class WithLookup(LookupProposals):
    """A drafter whose rounds may propose the lookup continuation instead.

    Each round compares the best expected tokens per millisecond of the two
    proposals under the automatic cap's costs (the drafter's round pays its
    forward, a lookup round only the verify) and the per-slot acceptance
    each proposer earned on this context.  A lookup proposal is sized here
    (``sized``), so the automatic cap neither cuts it nor counts it as the
    drafter's.  The drafter's context gets every committed position either
    way; only its proposal is skipped."""

    def __init__(self, drafter, settings: Optional[LookupSettings] = None):
        self.drafter = drafter
        self.settings = settings or LookupSettings(k=max(1, drafter.max_drafts))
        self.kind = f"{drafter.kind}+{RESERVED}"

    # The drafter's own members, read through.
    args = property(lambda self: self.drafter.args)
    target_layer_ids = property(lambda self: self.drafter.target_layer_ids)
    max_drafts = property(lambda self: self.drafter.max_drafts)
    block_size = property(lambda self: self.drafter.block_size)
    confidence_threshold = property(lambda self: self.drafter.confidence_threshold)
    auto_draft_length = property(lambda self: getattr(self.drafter, "auto_draft_length", True))
    source = property(lambda self: f"{getattr(self.drafter, 'source', self.drafter.kind)} + {spec_of(self.settings)}")

    def __getattr__(self, name):  # borrow_embeddings, parameters, ...
        if name == "drafter":
            raise AttributeError(name)
        return getattr(self.drafter, name)

    def make_cache(self) -> list:
        return self.drafter.make_cache() + [LookupIndex(self.settings.n, self.drafter.max_drafts)]

    def add_context(self, cache: list, features: mx.array, start: int, tokens: mx.array) -> None:
        self.drafter.add_context(cache[:-1], features, start, tokens)
        self.extend_index(cache, start, tokens)

    def propose(self, cache: list, anchor: mx.array, start: int, num_drafts: int, choose=None):
        index = cache[-1]
        token = _read_anchor(anchor)
        index.judge_last(token)
        found, name = self.lookup(index, token, start, num_drafts)
        rival = drafter_rate(index.rates_of("drafter").rates(), num_drafts, self.lengths)
        cap = lookup_cap(index.rates_of(name).rates(), len(found), self.lengths, rival)
        self.sized = cap > 0
        if self.sized:
            index.remember(name, start, found[:cap])
            # The context update a drafter round would have computed.
            mx.async_eval([c.state for c in cache[:-1] if hasattr(c, "state")])
            return mx.array(found[:cap], dtype=mx.uint32), None, None
        drafts, confidence, q = self.drafter.propose(cache[:-1], anchor, start, num_drafts, choose)
        index.remember("drafter", start, drafts)  # read when judged: by then the round evaluated it
        return drafts, confidence, q
