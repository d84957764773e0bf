"""The speculative round loop: prefill, propose, verify, accept, roll back.

It replaces mlx-lm's ``speculative_generate_step`` when the draft model is a
DSpark/DFlash drafter, with the same call signature and the same yields:
``(token, logprobs, from_draft)`` per generated token.
"""

import inspect
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, List, Optional, Tuple

import mlx.core as mx
from mlx_lm.generate import generate_step, generation_stream, maybe_quantize_kv_cache

from . import early
from .autocap import draft_length_for
from .cost import CostModel, load_or_measure, save
from .sampling import GREEDY, PQ, accept_pq, distribution, greedy_sampler, rule_for, sample, settings_of
from .target import (
    TargetAdapter,
    cache_length,
    check_rollback,
    rollback,
    validate_pair,
)

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
    time_scale: Optional[List[float]] = None  # automatic cap: learned (undrafted, drafted) round time over the cost model's

    @property
    def host_ms_per_round(self) -> float:
        return 1000 * self.host_seconds / self.rounds if self.rounds else 0.0

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
        """τ: mean over rounds of accepted drafts + 1."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

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
    """True for drafters built by one of the registered kinds."""
    return all(hasattr(model, a) for a in ("propose", "add_context", "make_cache", "kind"))


def bind(drafter, model) -> TargetAdapter:
    """Tap ``model`` for ``drafter`` (once per pair) and validate the pair."""
    bound = getattr(drafter, "_bound_target", None)
    if bound is not None and bound[0]() is model:
        return bound[1]
    target = TargetAdapter(model, drafter.target_layer_ids)
    validate_pair(drafter, target)
    if not drafter.args.has_embeddings:
        drafter.borrow_embeddings(*target.embedding_functions())
    drafter._bound_target = (weakref.ref(model), target)
    return target


def cost_model(drafter, target: TargetAdapter, refresh: bool = False, measured: Optional[CostModel] = None):
    """The pair's cost model (cached on disk; measured on first use, or now
    with ``refresh``; ``measured``: one the caller measured, cached and used
    from now on)."""
    memo = getattr(drafter, "_cost_model", None)
    if measured is not None:
        save(target, drafter, measured)
        cost = measured
    elif memo is not None and memo[0]() is target.model and not refresh:
        return memo[1]
    else:
        cost = load_or_measure(target, drafter, refresh)
    drafter._cost_model = (weakref.ref(target.model), cost)
    return cost


# Drafter context that travels with a target-only prompt cache the caller
# reuses across calls (keyed by the cache's first entry).
_draft_caches = weakref.WeakKeyDictionary()


def _split_cache(prompt_cache, target: TargetAdapter, drafter):
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
    draft_cache = _draft_caches.get(key)
    if draft_cache is None:
        draft_cache = drafter.make_cache()
        _draft_caches[key] = draft_cache
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
    target = bind(drafter, model)
    sampler = sampler or greedy_sampler
    if num_draft_tokens is not None and num_draft_tokens < 0:
        raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}.")
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError("prompt must be a non-empty 1-D array of token ids.")

    target_cache, draft_cache = _split_cache(prompt_cache, target, drafter)
    check_rollback(target_cache)

    # The drafter context must cover the same positions as the target cache.
    position = cache_length(target_cache)
    _trim_drafter(draft_cache, draft_cache[0].offset - position)

    def quantize_cache():
        maybe_quantize_kv_cache(target_cache, quantized_kv_start, kv_group_size, kv_bits)

    history = None  # token history for logits processors (mirrors generate_step)
    with mx.stream(stream):
        # Prefill exactly like generate_step: prompt[:-1] in chunks, then the
        # last token alone (keeps logits bit-identical to plain decoding).
        prompt = prompt.astype(mx.uint32)
        total = prompt.size
        done = 0
        while total - done > 1:
            n = min(prefill_step_size, total - done - 1)
            chunk = prompt[done : done + n]
            _, features = target(chunk[None], target_cache)
            quantize_cache()
            drafter.add_context(draft_cache, features, position)
            if logits_processors:
                history = mx.concatenate([history, chunk]) if history is not None else chunk
            mx.eval([c.state for c in target_cache] + [c.state for c in draft_cache])
            position += n
            done += n
            mx.clear_cache()
        last = prompt[done:]
        logits, features = target(last[None], target_cache)
        quantize_cache()
        drafter.add_context(draft_cache, features, position)
        logits = logits[0]
        if logits_processors:
            history = mx.concatenate([history, last]) if history is not None else last
            for processor in logits_processors:
                logits = processor(history, logits)
        position += 1
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        anchor = sampler(logprobs).astype(mx.uint32)
        mx.eval(anchor, logprobs)

    try:
        yield from decode(
            target, drafter, target_cache, draft_cache, anchor, logprobs[0], position,
            stream=stream, num_draft_tokens=num_draft_tokens, max_tokens=max_tokens, sampler=sampler,
            logits_processors=logits_processors, history=history, after_forward=quantize_cache,
        )
    finally:
        if prompt_cache is not None:
            # KV quantization may have replaced target entries: hand them back
            # to the caller's list and keep the drafter context attached.
            prompt_cache[: len(target_cache)] = target_cache
            if len(prompt_cache) == len(target_cache):
                _draft_caches[target_cache[0]] = draft_cache


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
    after_forward: Callable[[], None] = lambda: None,
) -> Generator[Tuple[int, mx.array, bool], None, None]:
    """The round loop after a prefill, shared by every host.

    ``target_cache`` and the drafter context hold ``position`` positions;
    ``anchor`` [1] is the token sampled after them (with ``logprobs``, its
    distribution) and is yielded first.  ``history`` is the token history the
    logits processors have seen so far.  On close the caches hold exactly the
    positions of everything yielded.
    """
    sampler = sampler or greedy_sampler
    max_drafts = drafter.max_drafts
    if num_draft_tokens is None:
        cap = max_drafts
    elif num_draft_tokens < 0:
        raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}.")
    else:
        cap = min(int(num_draft_tokens), max_drafts)
    threshold = drafter.confidence_threshold
    settings = settings_of(sampler)
    rule = rule_for(sampler)
    auto = num_draft_tokens is None and max_drafts > 0 and getattr(drafter, "auto_draft_length", True)
    # Caps never change greedy output, so only greedy decoding lets them
    # follow wall-clock timing and earlier generations; with sampling they
    # decide which random draws are made, and a seed must reproduce the text.
    learn = rule == GREEDY
    lengths = draft_length_for(drafter, cost_model(drafter, target), max_drafts, learn) if auto else None
    stats = SpeculativeStats(rule=rule, cap=None if auto else cap, time_scale=lengths.time_scale if auto else None)
    drafter.stats = stats

    def built(began, queued_before):
        """Count the time since ``began`` as graph building, except what
        queueing the graph's first layers spent (time on the device)."""
        nonlocal built_s
        queued = early.seconds() - queued_before
        stats.wait_seconds += queued
        built_s += time.perf_counter() - began - queued

    def forward(tokens, start):
        """Target forward over a verify block (not yet committed)."""
        began, queued = time.perf_counter(), early.seconds()
        logits, features = target(tokens[None], target_cache, start_early=True)
        after_forward()
        built(began, queued)
        return logits[0], features

    def process(logits, inputs):
        """Apply logits processors position by position, as plain decoding would."""
        nonlocal history
        if not logits_processors:
            return logits
        rows = []
        for k in range(inputs.size):
            history = mx.concatenate([history, inputs[k : k + 1]]) if history is not None else inputs[: k + 1]
            row = logits[k : k + 1]
            for processor in logits_processors:
                row = processor(history, row)
            rows.append(row)
        return mx.concatenate(rows, axis=0)

    cached = position  # positions held by the target cache (and drafter context)
    last_pos = position  # position of the last token yielded
    produced = 0
    in_round = False  # mid-round the caches are in flux and must not be settled

    def drafter_sampling():
        """For the p/q rule the drafter samples from its processed q, with the
        token history plain decoding would have at each drafted position."""
        if rule != PQ:
            return None
        drafted = [history, anchor] if history is not None else []

        def choose(k, row):
            if logits_processors:
                context = mx.concatenate(drafted)
                for processor in logits_processors:
                    row = processor(context, row)
            q = distribution(row - mx.logsumexp(row, axis=-1, keepdims=True), settings)
            token = sample(q)
            drafted.append(token)
            return token, q

        return choose

    def waited(since):
        """Count the time since ``since`` as waiting for the device."""
        now = time.perf_counter()
        stats.wait_seconds += now - since
        return now

    def waited_for(read):
        """(time after, value) of a call that blocks on the device."""
        start = time.perf_counter()
        value = read()
        return waited(start), value

    caller_s = 0.0  # time spent in the caller between our yields
    built_s = 0.0  # time spent building the networks' graphs (host time counts it per round)
    open_round = []  # [start time, drafts verified, caller_s at start, drafter ran] of the round under way

    def round_begins():
        """Start timing a round (closing the previous one; a drafted round
        sets its draft count later): the automatic cap learns what rounds
        really cost beyond its measured pieces."""
        now = time.perf_counter()
        if lengths is not None and learn and open_round:
            t0, n0, c0, proposed = open_round
            lengths.observe(n0, 1000 * ((now - t0) - (caller_s - c0)), proposed)
        open_round[:] = [now, 0, caller_s, False]

    pending = []  # (features, start) committed but not yet in the drafter context
    pending_positions = 0

    def commit_context(features, start, flush=False):
        """Queue committed positions for the drafter context; they are added
        in one batch when the drafter next drafts (rounds that skip drafting
        then cost no drafter work) or when the queue grows long."""
        nonlocal pending_positions, built_s
        if features is not None:
            pending.append((features, start))
            pending_positions += features.shape[1]
        if pending and (flush or pending_positions >= CONTEXT_BATCH):
            began = time.perf_counter()
            joined = mx.concatenate([f for f, _ in pending], axis=1) if len(pending) > 1 else pending[0][0]
            drafter.add_context(draft_cache, joined, pending[0][1])
            built_s += time.perf_counter() - began
            pending.clear()
            pending_positions = 0

    def propose(produced_after):
        """Queue the next round's drafts (they depend only on committed state)
        so the device works while the caller consumes this round's tokens."""
        if 0 <= max_tokens <= produced_after:
            return 0, None
        remaining = max_tokens - produced_after if max_tokens >= 0 else cap + 1
        n = min(cap, remaining - 1)
        if lengths is not None:
            lengths.at(position)
        if n <= 0 or (lengths is not None and not lengths.should_draft()):
            return 0, None
        with mx.stream(stream):
            commit_context(None, None, flush=True)
            began, queued = time.perf_counter(), early.seconds()
            proposal = drafter.propose(draft_cache, anchor, position, n, drafter_sampling())
            built(began, queued)
        start = time.perf_counter()
        mx.async_eval(*(x for x in proposal if x is not None))
        waited(start)
        return n, proposal

    def accept(logprobs, drafts, q):
        """(number of drafts kept, the target's token after them), on device."""
        n = 0 if drafts is None else drafts.size
        if rule == PQ:
            return accept_pq(distribution(logprobs, settings), q, drafts if n else mx.zeros((0,), mx.uint32))
        sampled = sampler(logprobs)
        if sampled.dtype != mx.uint32:
            sampled = sampled.astype(mx.uint32)
        if n == 0:
            return mx.array(0), sampled if sampled.shape[0] == 1 else sampled[:1]
        accepted = mx.cumprod((sampled[:n] == drafts).astype(mx.int32)).sum()
        return accepted, mx.take(sampled, accepted[None])

    def queue_plain_step(token, start):
        """Forward one token and sample the next, lazily (a round without drafts)."""
        nonlocal cached
        with mx.stream(stream):
            logits, features = forward(token, start)
            cached += 1
            logits = process(logits, token)
            step_logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            _, following = accept(step_logprobs, None, None)
            commit_context(features, start)
        start = time.perf_counter()
        mx.async_eval(following, step_logprobs)
        waited(start)
        return following, step_logprobs

    def undrafted_rounds():
        """Rounds without drafts (drafting paused, or a cap of 0), pipelined
        like plain decoding: the next forward is queued before this round's
        token is read, so the device never waits on Python."""
        nonlocal anchor, position, produced, last_pos, n, proposal, caller_s
        step = queue_plain_step(anchor, position)
        while True:
            round_begins()
            round_start = time.perf_counter()
            wait_before, built_before = stats.wait_seconds, built_s
            following, step_logprobs = step
            start = position
            position += 1
            anchor = following
            stats.proposal_lengths.append(0)
            stats.accepted_lengths.append(0)
            n, proposal = propose(produced + 1)
            more = max_tokens < 0 or produced + 1 < max_tokens
            if more and n == 0:
                step = queue_plain_step(anchor, position)
            end = waited_for(following.item)
            token = end[1]
            stats.host_seconds += (end[0] - round_start) - (stats.wait_seconds - wait_before)
            stats.graph_seconds += built_s - built_before
            produced += 1
            last_pos = start + 1
            before = time.perf_counter()
            yield token, step_logprobs[0], False
            caller_s += time.perf_counter() - before
            if stats.rounds % 256 == 0:
                mx.clear_cache()
            if not (more and n == 0):
                return

    try:
        n, proposal = propose(1)
        produced += 1
        yield anchor.item(), logprobs, False
        while max_tokens < 0 or produced < max_tokens:
            if n == 0:
                yield from undrafted_rounds()
                continue
            in_round = True
            round_begins()
            round_start = time.perf_counter()
            wait_before, built_before = stats.wait_seconds, built_s
            with mx.stream(stream):
                drafts = q = scores = confidence = None
                proposed = 0  # drafts the automatic cap chooses from
                if n > 0:
                    drafts, confidence, q = proposal
                    if threshold is not None and confidence is not None:
                        below = waited_for((confidence < threshold).tolist)[1]
                        n = below.index(True) if True in below else n
                        drafts, q = drafts[:n], (q[:n] if q is not None else None)
                    proposed = n
                    if lengths is not None and n > 0:
                        # The proposal was queued last round; reading its
                        # confidences waits for it (skipped while typical
                        # ones choose as well: ``reads_confidence``).
                        if confidence is None:
                            chosen = lengths.choose(n)
                        elif lengths.reads_confidence():
                            scores = waited_for(confidence.tolist)[1][:n]
                            chosen = lengths.choose(n, scores)
                        else:
                            chosen = lengths.choose(n, lengths.typical_confidence())
                        if chosen < n:
                            n = chosen
                            drafts, q = drafts[:n], (q[:n] if q is not None else None)
                    if n == 0:
                        drafts = q = None
                verify_in = mx.concatenate([anchor, drafts]) if n > 0 else anchor
                logits, features = forward(verify_in, position)
                logits = process(logits, verify_in)
                cached += n + 1
                logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                accepted, next_token = accept(logprobs, drafts, q)
                # The round's sync (its second when the automatic cap read the confidences first).
                judged = confidence if lengths is not None and scores is None else None  # read after it
                outputs = [accepted, next_token, verify_in] + ([judged] if judged is not None else [])
                waited_for(lambda: mx.eval(*outputs))
            a = accepted.item()
            tokens = verify_in.tolist()[1 : a + 1] + next_token.tolist()  # both evaluated: no slicing op
            # Keep anchor + accepted drafts; drop the rejected tail everywhere.
            rejected = n - a
            rollback(target_cache, rejected)
            cached -= rejected
            # Only the now-committed positions (anchor + accepted) enter the
            # drafter context; their projection is queued with the next proposal.
            with mx.stream(stream):
                commit_context(features[:, : a + 1], position)
            if logits_processors and rejected:
                history = history[: history.size - rejected]
            stats.proposal_lengths.append(n)
            stats.accepted_lengths.append(a)
            if n == 0:
                stats.declined.append(stats.rounds - 1)
            open_round[1], open_round[3] = n, True  # a proposal was made (and maybe declined)
            if lengths is not None and proposed > 0:
                if judged is not None:
                    scores = judged.tolist()[:proposed]  # evaluated: no slicing op
                lengths.update(n, a, scores)
                if scores is not None:
                    lengths.judge(scores, proposed)
            anchor = next_token
            start = position
            position += a + 1
            in_round = False
            n, proposal = propose(produced + a + 1)
            stats.host_seconds += (time.perf_counter() - round_start) - (stats.wait_seconds - wait_before)
            stats.graph_seconds += built_s - built_before
            before = time.perf_counter()
            for k in range(a + 1):
                produced += 1
                last_pos = start + 1 + k
                yield tokens[k], logprobs[k], k < a
            caller_s += time.perf_counter() - before
            if stats.rounds % 256 == 0:
                mx.clear_cache()
    finally:
        if not in_round:
            # Leave the caches holding exactly prompt + yielded tokens, so a
            # caller that reuses them continues correctly.
            excess = cached - (last_pos + 1)
            with mx.stream(stream):
                commit_context(None, None, flush=True)
                if excess > 0:
                    rollback(target_cache, excess)
                    _trim_drafter(draft_cache, excess)
                elif excess == -1:
                    _, features = forward(anchor, last_pos)
                    drafter.add_context(draft_cache, features, last_pos)
                mx.eval([c.state for c in target_cache] + [c.state for c in draft_cache])
