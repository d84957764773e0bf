"""The speculative round loop: prefill, propose, verify, accept, roll back.

It replaces mlx-lm's ``speculative_generate_step`` when the draft model is a
DSpark/DFlash drafter, with the same call signature and the same yields:
``(token, logprobs, from_draft)`` per generated token.

``decode`` is the loop every host shares.  Each round ``Rounds`` cuts the
proposal queued last round (``cut``), verifies it (``verify``: the round's
sync), commits the accepted part (``commit``: rollback of the rest) and
queues the next proposal before handing the tokens over, so the device
drafts while the caller consumes them.  Rounds that draft nothing run as
pipelined plain steps (``undrafted_rounds``); on close ``settle`` leaves the
caches holding exactly prompt + yielded tokens.  The pieces: ``TokenHistory``
(what logits processors see), ``Acceptor`` (the sampler's acceptance rule),
``RoundClock`` (host, graph and wait time; the automatic cap's timing),
``DrafterContext`` (committed positions queued for the drafter) and
``Positions``.
"""

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, List, Optional, Tuple

import mlx.core as mx
from mlx_lm.generate import generate_step, generation_stream, maybe_quantize_kv_cache

from . import early
from .cost import CostModel, load_or_measure, save
from .protocol import DrafterProtocol
from .session import Session, session_for
from .sampling import GREEDY, PQ, accept_pq, distribution, greedy_sampler, rule_for, sample, settings_of
from .target import TargetAdapter, cache_length, check_rollback, rollback, single_step_masks

DEFAULT_PREFILL_STEP_SIZE = 2048  # mlx-lm's generate_step default
# Plain decoding's default (mlx-lm 0.32: 5000, 0.31: 0), so both quantize alike.
DEFAULT_QUANTIZED_KV_START = inspect.signature(generate_step).parameters["quantized_kv_start"].default
CONTEXT_BATCH = 64  # committed positions queued at most before the drafter context takes them


@dataclass
class SpeculativeStats:
    """Acceptance statistics of the most recent generation with a drafter."""

    rule: str = "greedy"
    proposal_lengths: List[int] = field(default_factory=list)  # drafts verified per round
    accepted_lengths: List[int] = field(default_factory=list)
    declined: List[int] = field(default_factory=list)  # rounds whose proposal was made, then none of it verified
    cap: Optional[int] = None  # the fixed cap, or None when chosen per round
    host_seconds: float = 0.0  # loop time outside waits for the device (and outside the caller)
    graph_seconds: float = 0.0  # ... of which building the target's and drafter's graphs
    wait_seconds: float = 0.0  # time blocked on device results
    syncs: int = 0  # reads that block on the device (evaluations waited for)
    hand_offs: int = 0  # graphs queued without waiting (async evaluations, early starts included)
    time_scale: Optional[List[float]] = None  # automatic cap: learned (undrafted, drafted) round time over the cost model's

    @property
    def host_ms_per_round(self) -> float:
        return 1000 * self.host_seconds / self.rounds if self.rounds else 0.0

    @property
    def syncs_per_round(self) -> float:
        return self.syncs / self.rounds if self.rounds else 0.0

    @property
    def hand_offs_per_round(self) -> float:
        return self.hand_offs / self.rounds if self.rounds else 0.0

    @property
    def loop_ms_per_round(self) -> float:
        """Host time per round beyond building the two networks' graphs: what
        the round loop itself adds (bookkeeping, acceptance, rollback)."""
        return 1000 * (self.host_seconds - self.graph_seconds) / self.rounds if self.rounds else 0.0

    @property
    def rounds(self) -> int:
        return len(self.accepted_lengths)

    @property
    def drafted(self) -> int:
        return sum(self.proposal_lengths)

    @property
    def accepted(self) -> int:
        return sum(self.accepted_lengths)

    @property
    def mean_acceptance_length(self) -> float:
        """τ: tokens per target forward of the rounds (accepted drafts + 1,
        averaged).  Before any round the one token so far came from the
        prefill's forward: 1.0."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 1.0

    def as_dict(self) -> dict:
        """The statistics as JSON-ready values (the server's ``usage``)."""
        return {
            "acceptance_rule": self.rule,
            "rounds": self.rounds,
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "mean_acceptance_length": round(self.mean_acceptance_length, 4),
            "draft_cap": self.cap if self.cap is not None else "auto",
        }

    def summary(self) -> str:
        rate = self.accepted / self.drafted if self.drafted else 0.0
        if self.cap is not None:
            caps = f"draft cap {self.cap}"
        elif self.rounds:
            counts = {}
            for n in self.proposal_lengths:
                counts[n] = counts.get(n, 0) + 1
            spread = " ".join(f"{n}:{counts[n]}" for n in sorted(counts))
            caps = f"draft cap auto (mean {self.drafted / self.rounds:.2f}; cap:rounds {spread})"
        else:
            caps = "draft cap auto"
        return (
            f"Speculative: τ={self.mean_acceptance_length:.2f} over {self.rounds} rounds, "
            f"drafted {self.drafted}, accepted {self.accepted} ({rate:.1%}), acceptance rule: {self.rule}, "
            f"{caps}"
        )


def is_drafter(model) -> bool:
    """True for drafters of any kind: objects with every member of the
    drafter protocol (``protocol.py``)."""
    return isinstance(model, DrafterProtocol)


def bind(drafter, model) -> TargetAdapter:
    """Tap ``model`` for ``drafter`` (once per pair) and validate the pair."""
    return session_for(drafter, model).target


def cost_model(drafter, target: TargetAdapter, refresh: bool = False, measured: Optional[CostModel] = None):
    """The pair's cost model (cached on disk; measured on first use, or now
    with ``refresh``; ``measured``: one the caller measured, cached and used
    from now on)."""
    session = session_for(drafter, target.model)
    if measured is not None:
        save(target, drafter, measured)
        session.cost = measured
    elif session.cost is None or refresh:
        session.cost = load_or_measure(target, drafter, refresh)
    return session.cost


def _split_cache(prompt_cache, session: Session, drafter):
    target = session.target
    if prompt_cache is None:
        return target.make_cache(), drafter.make_cache()
    n = target.num_cache_entries
    if len(prompt_cache) > n:
        draft_cache = list(prompt_cache[n:])
        expected = len(drafter.make_cache())
        if len(draft_cache) != expected:
            raise ValueError(
                f"prompt_cache has {len(prompt_cache)} entries: expected {n} for the target "
                f"(+{expected} for the drafter)."
            )
        return list(prompt_cache[:n]), draft_cache
    if len(prompt_cache) != n:
        raise ValueError(f"prompt_cache has {len(prompt_cache)} entries; the target needs {n}.")
    key = prompt_cache[0]
    draft_cache = session.draft_contexts.get(key)
    if draft_cache is None:
        draft_cache = session.draft_contexts[key] = drafter.make_cache()
    return prompt_cache, draft_cache


def _trim_drafter(draft_cache, n: int) -> None:
    if n > 0:
        for c in draft_cache:
            c.trim(n)


def speculative_generate_step(
    prompt: mx.array,
    model,
    draft_model,
    stream=generation_stream,
    *,
    num_draft_tokens: Optional[int] = None,
    max_tokens: int = 256,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[List[Callable]] = None,
    prompt_cache: Optional[Any] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
) -> Generator[Tuple[int, mx.array, bool], None, None]:
    """Speculative decoding with a DSpark/DFlash drafter.

    Greedy decoding keeps drafts while they equal the target's argmax.  With a
    sampler made by mlx-lm's ``make_sampler`` the drafter samples from its
    processed distribution q and DSpark's p/q rule keeps or replaces each
    draft; with any other sampler a draft is kept when it equals the token the
    sampler draws from the target (sample-and-match).  Every rule yields an
    exact sample of what plain decoding would produce.  ``num_draft_tokens``
    caps the drafts per round; not given, each round's cap is chosen from the
    machine's cost model and the drafter's confidence (``autocap.py``).
    """
    drafter = draft_model
    session = session_for(drafter, model)
    target = session.target
    sampler = sampler or greedy_sampler
    if num_draft_tokens is not None and num_draft_tokens < 0:
        raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}.")
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError("prompt must be a non-empty 1-D array of token ids.")

    target_cache, draft_cache = _split_cache(prompt_cache, session, drafter)
    check_rollback(target_cache)

    # The drafter context must cover the same positions as the target cache.
    position = cache_length(target_cache)
    _trim_drafter(draft_cache, draft_cache[0].offset - position)

    kv = KVQuantization(kv_bits, kv_group_size, quantized_kv_start)

    history = TokenHistory(logits_processors)
    with mx.stream(stream):
        logits, position = prefill(target, drafter, prompt, target_cache, draft_cache, position, history, kv,
                                   prefill_step_size)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        anchor = sampler(logprobs).astype(mx.uint32)
        mx.eval(anchor, logprobs)

    try:
        yield from decode(
            target, drafter, target_cache, draft_cache, anchor, logprobs[0], position,
            stream=stream, num_draft_tokens=num_draft_tokens, max_tokens=max_tokens, sampler=sampler,
            logits_processors=logits_processors, history=history.tokens, kv=kv,
        )
    finally:
        if prompt_cache is not None:
            # KV quantization may have replaced target entries: hand them back
            # to the caller's list and keep the drafter context attached.
            prompt_cache[: len(target_cache)] = target_cache
            if len(prompt_cache) == len(target_cache):
                session.draft_contexts[target_cache[0]] = draft_cache


def prefill(target: TargetAdapter, drafter, prompt: mx.array, target_cache: list, draft_cache: list, position: int,
            history: "TokenHistory", kv: "KVQuantization", prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
            release: bool = True):
    """Feed ``prompt`` after ``position`` cached positions exactly like
    ``generate_step`` (all but its last token in chunks, then the last alone:
    logits bit-identical to plain decoding), the drafter context and the
    processors' history alongside.  ``release``: hand MLX's buffer cache back
    after each chunk, as ``generate_step`` does (not while a batch decodes
    around the prompt: its rounds would allocate their buffers anew).
    Returns (the last token's processed logits [1, V], the positions cached now)."""
    prompt = prompt.astype(mx.uint32)
    total, done = prompt.size, 0
    while total - done > 1:
        n = min(prefill_step_size, total - done - 1)
        chunk = prompt[done : done + n]
        _, features = target(chunk[None], target_cache)
        kv.apply(target_cache)
        drafter.add_context(draft_cache, features, position, chunk)
        history.extend(chunk)
        mx.eval([c.state for c in target_cache] + [c.state for c in draft_cache])
        position += n
        done += n
        if release:
            mx.clear_cache()
    last = prompt[done:]
    logits, features = target(last[None], target_cache)
    kv.apply(target_cache)
    drafter.add_context(draft_cache, features, position, last)
    return history.process(logits[0], last), position + 1


# ---------------------------------------------------------------- the round loop's pieces


@dataclass(frozen=True)
class KVQuantization:
    """mlx-lm's KV-cache quantization (``kv_bits``, ``kv_group_size``,
    ``quantized_kv_start``), done where plain decoding does it.

    ``generate_step`` converts the cache after a forward that leaves it
    holding at least ``start`` positions, so every position from ``start``
    on is computed through the quantized cache and every one before through
    the float cache.  The round loop converts only on committed positions
    (after rollback) and ends a verify block before ``start`` when it would
    cross it."""

    bits: Optional[int] = None
    group_size: int = 64
    start: int = 0

    def apply(self, cache: list) -> None:
        """Convert ``cache`` if it now holds ``start`` committed positions or more."""
        maybe_quantize_kv_cache(cache, self.start, self.group_size, self.bits)

    def widest_verify(self, anchor: int, n: int) -> int:
        """How many of ``n`` drafts a verify from position ``anchor`` can
        take without computing positions on both sides of ``start``."""
        if self.bits is None or anchor >= self.start:
            return n
        return min(n, self.start - anchor - 1)


class TokenHistory:
    """The token history the logits processors see, as plain decoding builds
    it: the prompt and every token fed to the target since."""

    def __init__(self, processors: Optional[List[Callable]], tokens: Optional[mx.array] = None):
        self.processors = processors or None
        self.tokens = tokens

    def extend(self, tokens: mx.array) -> None:
        """Add prompt tokens the target saw without sampling after them."""
        if self.processors is not None:
            self.tokens = mx.concatenate([self.tokens, tokens]) if self.tokens is not None else tokens

    def process(self, logits: mx.array, inputs: mx.array) -> mx.array:
        """Apply the processors to ``logits`` [L, V] of ``inputs`` [L] row by
        row, each row seeing the history up to and including its input."""
        if self.processors is None:
            return logits
        grown = mx.concatenate([self.tokens, inputs]) if self.tokens is not None else inputs
        before, last = grown.size - inputs.size, inputs.size - 1
        rows = []
        for k in range(inputs.size):
            seen = grown if k == last else grown[: before + k + 1]
            row = logits[k : k + 1]
            for processor in self.processors:
                row = processor(seen, row)
            rows.append(row)
        self.tokens = grown
        return mx.concatenate(rows, axis=0)

    def drop(self, n: int) -> None:
        """Forget the last ``n`` tokens (rejected drafts)."""
        if self.processors is not None and n:
            self.tokens = self.tokens[: self.tokens.size - n]

    def drafting(self, anchor: mx.array) -> list:
        """The pieces of the history a drafter sampling after ``anchor`` grows."""
        return [self.tokens, anchor] if self.tokens is not None else []


class Acceptor:
    """Which drafts the target keeps, by the sampler's rule (``sampling.py``):
    greedy matching, DSpark's p/q rule, or sample-and-match."""

    def __init__(self, sampler: Callable[[mx.array], mx.array]):
        self.sampler = sampler
        self.settings = settings_of(sampler)
        self.rule = rule_for(sampler)

    def accept(self, logprobs: mx.array, drafts: Optional[mx.array], q: Optional[mx.array]):
        """(number of drafts kept, the target's token after them), on device."""
        n = 0 if drafts is None else drafts.size
        if self.rule == PQ:
            return accept_pq(distribution(logprobs, self.settings), q, drafts if n else mx.zeros((0,), mx.uint32))
        sampled = self.sampler(logprobs)
        if sampled.dtype != mx.uint32:
            sampled = sampled.astype(mx.uint32)
        if n == 0:
            return mx.array(0), sampled if sampled.shape[0] == 1 else sampled[:1]
        accepted = mx.cumprod((sampled[:n] == drafts).astype(mx.int32)).sum()
        return accepted, mx.take(sampled, accepted[None])

    def drafter_sampling(self, history: TokenHistory, anchor: mx.array):
        """For the p/q rule the drafter samples from its processed q, with the
        token history plain decoding would have at each drafted position
        (None for the other rules: the drafter proposes its argmax)."""
        if self.rule != PQ:
            return None
        drafted = history.drafting(anchor)
        processors, settings = history.processors, self.settings

        def choose(k, row):
            if processors:
                context = mx.concatenate(drafted)
                for processor in processors:
                    row = processor(context, row)
            q = distribution(row - mx.logsumexp(row, axis=-1, keepdims=True), settings)
            token = sample(q)
            drafted.append(token)
            return token, q

        return choose


@dataclass(slots=True)
class OpenRound:
    """The round under way, as the automatic cap's timing sees it."""

    began: float
    caller_s: float  # the caller's time before the round began
    drafts: int = 0  # drafts verified (a drafted round sets them)
    proposed: bool = False  # whether the drafter proposed (even if all drafts were declined)


class RoundClock:
    """Where a generation's time goes: the host (graph building included),
    waits for the device, and the caller between yields.  Feeds the
    statistics' host/graph/wait seconds and, through ``observe``, what rounds
    really cost to the automatic cap (beyond its measured pieces)."""

    def __init__(self, stats: SpeculativeStats, observe: Optional[Callable] = None):
        self.stats = stats
        self.observe = observe
        self.caller_s = 0.0  # time spent in the caller between our yields
        self.built_s = 0.0  # time spent building the networks' graphs
        self.open: Optional[OpenRound] = None
        self.began = self.wait_before = self.built_before = 0.0
        self.handed = 0.0

    def begin(self) -> None:
        """Start timing a round (closing the previous one for ``observe``)."""
        if self.observe is not None:
            now = time.perf_counter()
            last = self.open
            if last is not None:
                self.observe(last.drafts, 1000 * ((now - last.began) - (self.caller_s - last.caller_s)), last.proposed)
            self.open = OpenRound(now, self.caller_s)
        self.began = time.perf_counter()
        self.wait_before, self.built_before = self.stats.wait_seconds, self.built_s

    def drafted(self, n: int) -> None:
        """The round under way verified ``n`` drafts of a proposal."""
        if self.open is not None:
            self.open.drafts, self.open.proposed = n, True

    def end(self, now: Optional[float] = None) -> None:
        """Book the round's host time up to ``now``."""
        stats = self.stats
        now = time.perf_counter() if now is None else now
        stats.host_seconds += (now - self.began) - (stats.wait_seconds - self.wait_before)
        stats.graph_seconds += self.built_s - self.built_before

    def built(self, began: float, queued_before: float, starts_before: int) -> None:
        """Count the time since ``began`` as graph building, except what
        queueing the graph's first layers spent (time on the device)."""
        queued = early.seconds() - queued_before
        self.stats.wait_seconds += queued
        self.stats.hand_offs += early.starts() - starts_before
        self.built_s += time.perf_counter() - began - queued

    def queued(self, *arrays) -> None:
        """Hand ``arrays`` to the device without waiting for them (the time
        the backend blocks in it counted as waiting)."""
        self.stats.hand_offs += 1
        began = time.perf_counter()
        mx.async_eval(*arrays)
        self.waited(began)

    def waited(self, since: float) -> float:
        """Count the time since ``since`` as waiting for the device; returns now."""
        now = time.perf_counter()
        self.stats.wait_seconds += now - since
        return now

    def wait_for(self, read: Callable, *args):
        """The value of a call that blocks on the device, its time counted as waiting."""
        self.stats.syncs += 1
        began = time.perf_counter()
        value = read(*args)
        self.waited(began)
        return value

    def to_caller(self) -> None:
        self.handed = time.perf_counter()

    def from_caller(self) -> None:
        self.caller_s += time.perf_counter() - self.handed


class DrafterContext:
    """The drafter's context cache and the committed positions queued for
    it.  They are added in one batch when the drafter next drafts (rounds
    that skip drafting then cost no drafter work) or when the queue grows
    long."""

    def __init__(self, drafter, cache: list, clock: RoundClock):
        self.drafter = drafter
        self.cache = cache
        self.clock = clock
        self.pending = []  # (features, tokens, start) committed but not yet in the cache
        self.pending_positions = 0

    def commit(self, features: mx.array, tokens: mx.array, start: int) -> None:
        """Queue the target's ``features`` and the ``tokens`` it read at
        positions ``start``… (committed: accepted)."""
        self.pending.append((features, tokens, start))
        self.pending_positions += features.shape[1]
        if self.pending_positions >= CONTEXT_BATCH:
            self.flush()

    def flush(self) -> None:
        pending = self.pending
        if not pending:
            return
        began = time.perf_counter()
        if len(pending) > 1:
            features = mx.concatenate([f for f, _, _ in pending], axis=1)
            tokens = mx.concatenate([t for _, t, _ in pending])
        else:
            features, tokens, _ = pending[0]
        self.drafter.add_context(self.cache, features, pending[0][2], tokens)
        self.clock.built_s += time.perf_counter() - began
        self.pending = []
        self.pending_positions = 0


@dataclass(slots=True)
class Positions:
    """A generation's position bookkeeping (positions count from the start
    of the sequence)."""

    first: int  # of the first token yielded (the anchor decoding starts from)
    anchor: int  # of the current anchor: every position before it is committed
    cached: int  # positions the target cache holds (past ``anchor`` while a step or a verify is in flight)
    produced: int = 0  # tokens yielded

    def yielded_end(self) -> int:
        """Positions the caches hold when they hold prompt + yielded tokens."""
        return self.first + max(self.produced, 1)


@dataclass(slots=True)
class Proposal:
    """The drafter's queued proposal for the next round."""

    n: int  # drafts asked for
    drafts: mx.array  # [n]
    confidence: Optional[mx.array]  # [n] per-draft acceptance estimates, or None
    q: Optional[mx.array]  # [n, V] the distributions the drafts were sampled from, or None
    sized: bool = False  # the proposer chose its length: the automatic cap neither cuts nor learns from it


@dataclass(slots=True)
class Block:
    """A round's drafts to verify after the anchor, cut from its proposal."""

    n: int  # drafts verified
    drafts: Optional[mx.array]  # [n], None when n == 0
    q: Optional[mx.array]
    proposed: int  # drafts the automatic cap chose from (after the confidence threshold)
    confidence: Optional[mx.array]  # the whole proposal's
    scores: Optional[list]  # confidences read before the verify, or None
    sized: bool = False  # see ``Proposal.sized``


@dataclass(slots=True)
class Verified:
    """A verified block, evaluated: what the round commits."""

    block: Block
    inputs: mx.array  # [anchor, drafts]
    logprobs: mx.array  # [n + 1, V] the target's
    features: mx.array  # [1, n + 1, taps * H] the target's tapped states
    accepted: mx.array  # number of drafts kept
    next_token: mx.array  # [1] the target's token after them
    judged: Optional[mx.array]  # confidences the automatic cap judges after the verify


class Rounds:
    """One generation's state after its prefill, and the steps of its round
    loop: propose, cut, verify, commit, plain (undrafted) steps, settle."""

    def __init__(self, target: TargetAdapter, drafter, target_cache: list, draft_cache: list, anchor: mx.array,
                 position: int, *, stream, num_draft_tokens: Optional[int], max_tokens: int,
                 sampler: Optional[Callable], logits_processors: Optional[List[Callable]],
                 history: Optional[mx.array], kv: KVQuantization = KVQuantization()):
        max_drafts = drafter.max_drafts
        if num_draft_tokens is None:
            self.cap = max_drafts
        elif num_draft_tokens < 0:
            raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}.")
        else:
            self.cap = min(int(num_draft_tokens), max_drafts)
        self.target, self.drafter, self.target_cache = target, drafter, target_cache
        self.stream, self.max_tokens, self.kv = stream, max_tokens, kv
        self.threshold = drafter.confidence_threshold
        self.acceptor = Acceptor(sampler or greedy_sampler)
        auto = num_draft_tokens is None and max_drafts > 0 and getattr(drafter, "auto_draft_length", True)
        # Caps never change greedy output, so only greedy decoding lets them
        # follow wall-clock timing and earlier generations; with sampling they
        # decide which random draws are made, and a seed must reproduce the text.
        learn = self.acceptor.rule == GREEDY
        session = session_for(drafter, target.model)
        self.lengths = session.draft_length(cost_model(drafter, target), max_drafts, learn) if auto else None
        self.stats = SpeculativeStats(rule=self.acceptor.rule, cap=None if auto else self.cap,
                                      time_scale=self.lengths.time_scale if auto else None)
        session.record(self.stats)
        plan_with = getattr(drafter, "plan_with", None)
        self.sizes_itself = plan_with is not None  # a proposer that sizes some proposals itself (``lookup.py``)
        if plan_with is not None:
            plan_with(self.lengths)
        self.clock = RoundClock(self.stats, self.lengths.observe if auto and learn else None)
        self.history = TokenHistory(logits_processors, history)
        self.context = DrafterContext(drafter, draft_cache, self.clock)
        self.at = Positions(first=position, anchor=position, cached=position)
        self.anchor = anchor  # [1] the token after the committed positions
        self.in_round = False  # mid-round the caches are in flux and must not be settled

    def more(self, produced: int) -> bool:
        """Whether tokens are still wanted after ``produced``."""
        return self.max_tokens < 0 or produced < self.max_tokens

    def forward(self, tokens: mx.array):
        """Target forward over ``tokens`` after the cached positions (lazy)."""
        began, queued, starts = time.perf_counter(), early.seconds(), early.starts()
        with single_step_masks(self.target_cache, tokens.size):
            logits, features = self.target(tokens[None], self.target_cache, start_early=True)
        self.clock.built(began, queued, starts)
        return logits[0], features

    def propose(self, produced_after: int) -> Optional[Proposal]:
        """Queue the next round's drafts (they depend only on committed state)
        so the device works while the caller consumes this round's tokens;
        None when the next round drafts nothing."""
        if 0 <= self.max_tokens <= produced_after:
            return None
        remaining = self.max_tokens - produced_after if self.max_tokens >= 0 else self.cap + 1
        n = min(self.cap, remaining - 1)
        lengths = self.lengths
        if lengths is not None:
            lengths.at(self.at.anchor)
        # A proposer sizing its own proposals asks the cap itself whether its drafter should run.
        if n <= 0 or (lengths is not None and not self.sizes_itself and not lengths.should_draft()):
            return None
        if lengths is not None and lengths.cost.sequential:
            n = lengths.proposal_length(n)  # each draft costs a drafter forward: ask only for those verified
            if n == 0:
                return None
        with mx.stream(self.stream):
            self.context.flush()
            choose = self.acceptor.drafter_sampling(self.history, self.anchor)
            began, queued, starts = time.perf_counter(), early.seconds(), early.starts()
            drafts, confidence, q = self.drafter.propose(self.context.cache, self.anchor, self.at.anchor, n, choose)
            self.clock.built(began, queued, starts)
        if drafts.shape[0] < n:  # a proposer may find fewer (a lookup without a long match): none, no round
            if drafts.shape[0] == 0:
                return None
            n = drafts.shape[0]
        if self.threshold is None and lengths is None:
            confidence = None  # nothing reads it (a fixed cap, no threshold): not computed
        self.clock.queued(*(x for x in (drafts, confidence, q) if x is not None))
        return Proposal(n, drafts, confidence, q, getattr(self.drafter, "sized", False))

    def cut(self, proposal: Proposal) -> Block:
        """The drafts to verify: the proposal up to its first confidence below
        the drafter's threshold, then as many as the automatic cap chooses."""
        n, drafts, confidence, q = proposal.n, proposal.drafts, proposal.confidence, proposal.q
        scores = None
        with mx.stream(self.stream):
            if self.threshold is not None and confidence is not None:
                below = self.clock.wait_for((confidence < self.threshold).tolist)
                n = below.index(True) if True in below else n
                drafts, q = drafts[:n], (q[:n] if q is not None else None)
            proposed = n
            lengths = None if proposal.sized else self.lengths
            if lengths is not None and n > 0:
                # The proposal was queued last round; reading its confidences
                # waits for it (skipped while typical ones choose as well:
                # ``reads_confidence``).
                if confidence is None:
                    chosen = lengths.choose(n)
                elif lengths.reads_confidence():
                    scores = self.clock.wait_for(confidence.tolist)[:n]
                    chosen = lengths.choose(n, scores)
                else:
                    chosen = lengths.choose(n, lengths.typical_confidence())
                if chosen < n:
                    n = chosen
                    drafts, q = drafts[:n], (q[:n] if q is not None else None)
            kv_limit = self.kv.widest_verify(self.at.anchor, n)
            if kv_limit < n:
                n = kv_limit
                drafts, q = drafts[:n], (q[:n] if q is not None else None)
        if n == 0:
            drafts = q = None
        return Block(n, drafts, q, proposed, confidence, scores, proposal.sized)

    def verify(self, block: Block) -> Verified:
        """The target's forward over [anchor, drafts] and, on device, how many
        drafts it keeps; evaluated in the round's one sync (its second when
        the automatic cap read the confidences first)."""
        with mx.stream(self.stream):
            inputs = mx.concatenate([self.anchor, block.drafts]) if block.n > 0 else self.anchor
            logits, features = self.forward(inputs)
            logits = self.history.process(logits, inputs)
            self.at.cached += block.n + 1
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            accepted, next_token = self.acceptor.accept(logprobs, block.drafts, block.q)
            judged = block.confidence if self.lengths is not None and block.scores is None else None  # read after it
            outputs = [accepted, next_token, inputs] + ([judged] if judged is not None else [])
            self.clock.wait_for(mx.eval, *outputs)
        return Verified(block, inputs, logprobs, features, accepted, next_token, judged)

    def commit(self, verified: Verified) -> List[int]:
        """Keep the anchor and the accepted drafts, drop the rejected tail
        everywhere, and record the round; returns its tokens (the accepted
        drafts, then the target's next token)."""
        block, a = verified.block, verified.accepted.item()
        tokens = verified.inputs.tolist()[1 : a + 1] + verified.next_token.tolist()  # both evaluated: no slicing op
        rejected = block.n - a
        rollback(self.target_cache, rejected)
        self.at.cached -= rejected
        self.kv.apply(self.target_cache)
        # Only the now-committed positions (anchor + accepted) enter the
        # drafter context; their projection is queued with the next proposal.
        with mx.stream(self.stream):
            self.context.commit(verified.features[:, : a + 1], verified.inputs[: a + 1], self.at.anchor)
        self.history.drop(rejected)
        stats = self.stats
        stats.proposal_lengths.append(block.n)
        stats.accepted_lengths.append(a)
        if block.n == 0:
            stats.declined.append(stats.rounds - 1)
        self.clock.drafted(block.n)
        if self.lengths is not None and block.proposed > 0 and not block.sized:
            scores = block.scores
            if verified.judged is not None:
                scores = verified.judged.tolist()[: block.proposed]  # evaluated: no slicing op
            self.lengths.update(block.n, a, scores)
            if scores is not None:
                self.lengths.judge(scores, block.proposed)
        self.anchor = verified.next_token
        self.at.anchor += a + 1
        return tokens

    def hand_over(self, tokens: List[int], logprobs: mx.array):
        """Yield a drafted round's tokens: the accepted drafts, then the target's."""
        last = len(tokens) - 1
        self.clock.to_caller()
        for k in range(last + 1):
            self.at.produced += 1
            yield tokens[k], logprobs[k], k < last
        self.clock.from_caller()
        if self.stats.rounds % 256 == 0:
            mx.clear_cache()

    def plain_step(self):
        """Forward the anchor and sample the token after it, lazily (a round
        without drafts): (that token [1], its log-probabilities [1, V])."""
        token, start = self.anchor, self.at.anchor
        with mx.stream(self.stream):
            logits, features = self.forward(token)
            self.kv.apply(self.target_cache)
            self.at.cached += 1
            logits = self.history.process(logits, token)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            _, following = self.acceptor.accept(logprobs, None, None)
            self.context.commit(features, token, start)
        self.clock.queued(following, logprobs)
        return following, logprobs

    def undrafted_rounds(self):
        """Rounds without drafts (drafting paused, or a cap of 0), pipelined
        like plain decoding: the next forward is queued before this round's
        token is read, so the device never waits on Python.  Returns the
        proposal that ends them (None at the end of the generation)."""
        at, clock, stats = self.at, self.clock, self.stats
        step = self.plain_step()
        while True:
            clock.begin()
            following, logprobs = step
            at.anchor += 1
            self.anchor = following
            stats.proposal_lengths.append(0)
            stats.accepted_lengths.append(0)
            proposal = self.propose(at.produced + 1)
            plain_next = self.more(at.produced + 1) and proposal is None
            if plain_next:
                step = self.plain_step()
            began = time.perf_counter()
            token = following.item()
            stats.syncs += 1
            clock.end(clock.waited(began))
            at.produced += 1
            clock.to_caller()
            yield token, logprobs[0], False
            clock.from_caller()
            if stats.rounds % 256 == 0:
                mx.clear_cache()
            if not plain_next:
                return proposal

    def settle(self) -> None:
        """Leave the caches holding exactly prompt + yielded tokens, so a
        caller that reuses them continues correctly."""
        end = self.at.yielded_end()
        excess = self.at.cached - end
        cache = self.context.cache
        with mx.stream(self.stream):
            self.context.flush()
            if excess > 0:
                rollback(self.target_cache, excess)
                _trim_drafter(cache, excess)
            elif excess == -1:
                _, features = self.forward(self.anchor)
                self.kv.apply(self.target_cache)
                self.drafter.add_context(cache, features, end - 1, self.anchor)
            mx.eval([c.state for c in self.target_cache] + [c.state for c in cache])


def decode(
    target: TargetAdapter,
    drafter,
    target_cache: list,
    draft_cache: list,
    anchor: mx.array,
    logprobs: mx.array,
    position: int,
    *,
    stream=generation_stream,
    num_draft_tokens: Optional[int] = None,
    max_tokens: int = 256,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[List[Callable]] = None,
    history: Optional[mx.array] = None,
    kv: KVQuantization = KVQuantization(),
) -> Generator[Tuple[int, mx.array, bool], None, None]:
    """The round loop after a prefill, shared by every host.

    ``target_cache`` and the drafter context hold ``position`` positions;
    ``anchor`` [1] is the token sampled after them (with ``logprobs``, its
    distribution) and is yielded first.  ``history`` is the token history the
    logits processors have seen so far; ``kv`` the KV-cache quantization
    plain decoding would do.  On close the caches hold exactly the positions
    of everything yielded.
    """
    rounds = Rounds(
        target, drafter, target_cache, draft_cache, anchor, position, stream=stream,
        num_draft_tokens=num_draft_tokens, max_tokens=max_tokens, sampler=sampler,
        logits_processors=logits_processors, history=history, kv=kv,
    )
    at, clock = rounds.at, rounds.clock
    try:
        proposal = rounds.propose(1)
        at.produced += 1
        yield anchor.item(), logprobs, False
        while rounds.more(at.produced):
            if proposal is None:
                proposal = yield from rounds.undrafted_rounds()
                continue
            rounds.in_round = True
            clock.begin()
            verified = rounds.verify(rounds.cut(proposal))
            tokens = rounds.commit(verified)
            rounds.in_round = False
            proposal = rounds.propose(at.produced + len(tokens))
            clock.end()
            yield from rounds.hand_over(tokens, verified.logprobs)
    finally:
        if not rounds.in_round:
            rounds.settle()
