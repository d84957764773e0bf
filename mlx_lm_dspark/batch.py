"""Speculative decoding of several sequences together: one target verify
per round for the whole batch.

``BatchSpeculative`` keeps the target's caches as mlx-lm's batch caches
(``BatchKVCache``: rows left-padded, so each row's newest position sits at
the same column), and the drafter's contexts alike.  A round
proposes drafts for every row, verifies the rows' blocks [anchor, drafts,
padding] in one forward of width max(drafts) + 1, keeps each row's drafts
by its own rule, and rolls each row back by its own rejected tail:
the batch cache is trimmed by the smallest tail and every other row is
shifted right by what it has beyond (mlx-lm's ``right_padding`` +
``finalize``), which keeps the rows right-aligned.  Sequences join after
their own prefill (as ``BatchGenerator`` merges prompt caches) and leave
between rounds (``filter``).  Each row's tokens are what plain decoding of
that prompt alone gives: the same tokens greedily, the same distribution
when sampling.

Batched rounds need caches every row can roll back on its own: plain KV
caches, sliding windows (Gemma-4's ``RotatingKVCache`` without kept
positions), which the batch holds as plain batch caches masked to the
window (mlx-lm's windowed causal mask) and hands back as the rotating cache
plain decoding holds, and the recurrent state of hybrid targets
(``ArraysCache``: each row replayed to its own length, ``recurrent.py``);
quantized and other caches are refused (``unbatchable``).  Each row has its own logits processors (their
history grown per row) and keeps drafts by its own sampler's rule (greedy
matching, DSpark's p/q rule, sample-and-match).  The DSpark/DFlash network
drafts for every row in one forward over the rows' contexts, held as batch
caches like the target's (``Drafter.propose_rows``); so does EAGLE3, one
forward per draft for every row (``Eagle3Drafter.propose_rows``, its
contexts as batch caches through ``batch_entries``); other proposers
(lookup) draft row by row within the round's graph.
"""

import itertools
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import mlx.core as mx
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import ArraysCache, BatchKVCache, KVCache, RotatingKVCache

from . import recurrent
from .autocap import PROBE_BACKOFF, PROBE_BUDGET, PROBE_EVERY
from .session import session_for
from .sampling import greedy_sampler
from .speculative import (CONTEXT_BATCH, DEFAULT_PREFILL_STEP_SIZE, Acceptor, KVQuantization, SpeculativeStats,
                          TokenHistory, cost_model, prefill)
from .target import UnsupportedCacheError


def unbatchable(target_cache: list) -> Optional[str]:
    """Why a target whose prompt cache is ``target_cache`` cannot decode in
    batched rounds (None: it can)."""
    for i, c in enumerate(target_cache):
        if type(c) is KVCache or (type(c) is RotatingKVCache and c.keep == 0) or type(c) is ArraysCache:
            continue
        kind = f"RotatingKVCache keeping {c.keep} positions" if type(c) is RotatingKVCache else type(c).__name__
        return (f"cache entry {i} is {kind}; batched speculative rounds roll back plain KV caches, "
                "sliding windows (RotatingKVCache without kept positions) and recurrent state (ArraysCache) only")
    return None


def _batch_row(c) -> BatchKVCache:
    """One sequence's cache entry as a one-row ``BatchKVCache``.  A sliding
    window's entry keeps only its latest positions: the row's offset (its
    positions, for RoPE) is then larger than its entries, which the left
    padding records as negative (every entry valid)."""
    if type(c) is KVCache:
        return BatchKVCache.merge([c])
    if type(c) is ArraysCache:  # a recurrent state: rows are its arrays' first axis
        row = ArraysCache(len(c.cache))
        row.cache = list(c.cache)
        return row
    row = BatchKVCache([0])
    if c.keys is not None:
        # oldest first, as mlx-lm orders the buffer before a multi-token update
        row.keys, row.values = c._temporal_order(c.keys), c._temporal_order(c.values)
        row._idx = row.keys.shape[2]
    row.offset = mx.array([c.offset])
    row.left_padding = mx.array([row._idx - c.offset])
    return row


def _sequence_entry(c: BatchKVCache, index: int, window: Optional[int], drop: int):
    """Row ``index`` of a batch entry as one sequence's cache, less its last
    ``drop`` positions: a ``KVCache``, or for a sliding window of ``window``
    positions the ``RotatingKVCache`` plain decoding holds (its latest
    ``window`` entries, oldest first)."""
    if type(c) is ArraysCache:
        if drop:
            raise ValueError(f"a recurrent state cannot give back fewer positions than it holds ({drop} fewer).")
        return c.extract(index)
    if window is None:  # a full layer's rows are never cut: mlx-lm's own extract
        entry = c.extract(index)
        entry.trim(drop)
        return entry
    padding = max(0, c.left_padding[index].item())
    end = c._idx - drop
    positions = c.offset[index].item() - drop
    keys, values = c.keys[index : index + 1, :, padding:end], c.values[index : index + 1, :, padding:end]
    entry = RotatingKVCache(max_size=window, keep=0)
    kept = min(window, keys.shape[2])
    entry.keys, entry.values = mx.contiguous(keys[..., keys.shape[2] - kept :, :]), mx.contiguous(values[..., values.shape[2] - kept :, :])
    entry.offset, entry._idx = positions, kept
    return entry


class BatchCap:
    """The batch's drafts per round when none is given: the number K that
    gives the most expected tokens per millisecond for B rows, a round
    costing a verify of B x (K + 1) rows (the pair's cost model, extrapolated
    linearly past the widths it measured) plus one drafter round per row.
    Each draft is taken as kept with the probability the batch's rounds
    show (a draft kept given the ones before it were).  While no K pays, a
    round now and then probes one draft, so that estimate can rise: the
    first at once, then spaced to cost at most ``PROBE_BUDGET`` of the
    undrafted rounds' time, further apart (up to ``PROBE_BACKOFF`` times)
    while probes keep nothing; none where a drafter always right would not
    pay.  One per pair, kept across batches (``Session``)."""

    def __init__(self, cost, max_drafts: int):
        self.cost, self.max_drafts = cost, max_drafts
        self.kept, self.missed = 1.0, 1.0  # a prior of one half
        self.undrafted = None  # undrafted rounds since the last probe (None: none yet)
        self.backoff = 1  # the probes' spacing over the shortest the budget allows
        self.probing = None  # during a probe round: whether a row kept its draft

    def verify_ms(self, cost, rows: int) -> float:
        widths = cost.verify_ms
        if rows <= len(widths):
            return widths[rows - 1]
        slope = widths[-1] - widths[-2] if len(widths) > 1 else widths[-1]
        return widths[-1] + slope * (rows - len(widths))

    def best(self, cost, rows: int, accept: float) -> int:
        """The K of most expected tokens per ms when each draft is kept with ``accept``."""
        best, best_rate = 0, rows / self.verify_ms(cost, rows)
        for k in range(1, self.max_drafts + 1):
            tokens = rows * cost.expected_tokens([accept] * k, k)
            rate = tokens / (self.verify_ms(cost, rows * (k + 1)) + rows * cost.draft_ms_for(k))
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def probe_every(self, cost, rows: int) -> int:
        """Undrafted rounds between probes: a probe's extra time (a verify of
        two positions per row, a drafter round, the overlap it loses) within
        the budget."""
        undrafted = self.verify_ms(cost, rows)
        extra = self.verify_ms(cost, 2 * rows) + rows * cost.draft_ms_for(1)
        shortest = max(PROBE_EVERY, math.ceil(extra / (PROBE_BUDGET * undrafted)))
        return shortest * self.backoff

    def choose(self, rows: int, context: int) -> int:
        if self.probing is not None:  # the last round probed: space the next by what it found
            self.backoff = 1 if self.probing else min(2 * self.backoff, PROBE_BACKOFF)
            self.probing = None
        cost = self.cost.at(context)
        best = self.best(cost, rows, self.kept / (self.kept + self.missed))
        if best or self.best(cost, rows, 1.0) == 0:
            return best
        if self.undrafted is not None and self.undrafted < self.probe_every(cost, rows):
            self.undrafted += 1
            return 0
        self.undrafted, self.probing = 0, False
        return 1

    def update(self, drafted: int, accepted: int) -> None:
        """A row's round: ``accepted`` of ``drafted`` drafts kept."""
        self.kept += accepted
        self.missed += 1 if accepted < drafted else 0
        if self.probing is not None:
            self.probing = self.probing or accepted > 0


@dataclass
class Row:
    """One sequence of the batch."""

    uid: int
    draft_cache: list  # the drafter context (positions before the anchor)
    anchor: mx.array  # [1] the token after the committed positions, not yet fed to the target
    position: int  # committed positions (the anchor's position)
    max_tokens: int
    logprobs: mx.array  # [1, V] the anchor's distribution (handed out with it)
    acceptor: Acceptor  # the row's sampler and its acceptance rule
    history: TokenHistory  # what its logits processors see
    cap: Optional[int] = None  # its own drafts per round, or None: the batch's
    produced: int = 0  # tokens handed out
    stats: SpeculativeStats = field(default_factory=SpeculativeStats)

    @property
    def drafted(self) -> List[int]:
        return self.stats.proposal_lengths

    @property
    def accepted(self) -> List[int]:
        return self.stats.accepted_lengths

    def remaining(self) -> int:
        return self.max_tokens - self.produced


@dataclass
class Emitted:
    """A sequence's tokens from one round, with their log-probabilities."""

    uid: int
    tokens: List[int]
    logprobs: mx.array  # [len(tokens), V]
    finished: bool  # max_tokens reached (the sequence has left the batch)


class BatchSpeculative:
    """Greedy speculative decoding of a changing batch of prompts.

    ``insert`` prefills a prompt alone and returns its uid; ``step`` runs one
    round for every sequence and returns what each produced (a new
    sequence's first token comes from its prefill); a sequence that reached
    its ``max_tokens`` leaves at the next step; ``remove`` drops one between
    rounds (a stop word, a client gone) and ``extract`` takes its cache out."""

    def __init__(self, model, drafter, *, num_draft_tokens: Optional[int] = None,
                 prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE, stream=generation_stream):
        self.session = session_for(drafter, model)
        self.target, self.drafter, self.stream = self.session.target, drafter, stream
        entries = self.target.make_cache()
        problem = unbatchable(entries)
        if problem is not None:
            raise UnsupportedCacheError(f"This target cannot decode in batched speculative rounds: {problem}.")
        # Whether ``extract`` can give a sequence's cache back shorter than it
        # is (not with recurrent state).
        self.trimmable = not any(type(c) is ArraysCache for c in entries)
        if num_draft_tokens is not None and num_draft_tokens < 0:
            raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}.")
        self.cap = None if num_draft_tokens is None else min(int(num_draft_tokens), drafter.max_drafts)
        self.auto = None
        if self.cap is None and not getattr(drafter, "auto_draft_length", True):
            self.cap = drafter.max_drafts  # a drafter the cost model cannot price
        if self.cap is None:
            cost = cost_model(drafter, self.target)
            auto = self.session.batch_cap
            if auto is None or auto.cost is not cost or auto.max_drafts != drafter.max_drafts:
                auto = self.session.batch_cap = BatchCap(cost, drafter.max_drafts)
            self.auto = auto  # what earlier batches of this pair learned
        self.prefill_step_size = prefill_step_size
        self.rows: List[Row] = []
        self.cache: Optional[List[BatchKVCache]] = None
        self.windows: List[Optional[int]] = []  # per cache entry: its sliding window, or None
        # A drafter network that proposes for every row in one forward keeps
        # the rows' contexts as batch caches too; other proposers keep one per row.
        self.batched_drafter = callable(getattr(drafter, "propose_rows", None))
        self.draft_cache: Optional[List[BatchKVCache]] = None
        self.joining: List[Tuple[Row, list]] = []  # prefilled, merged at the next round
        self._uids = itertools.count()
        self._left: List[Row] = []  # rows that left lately (their statistics stay readable)
        self._ahead: Optional[Dict[int, tuple]] = None  # a queued undrafted round, not yet read (by uid)
        # Undrafted rounds' (features, starts, tokens) not yet in the batched
        # drafter contexts: added together before the next proposal.
        self._unadded: List[Tuple[mx.array, mx.array, mx.array]] = []
        self._chosen: Optional[int] = None  # the automatic cap already chosen for the next round
        self._last_choice: Optional[int] = None

    def __len__(self) -> int:
        return len(self.rows) + len(self.joining) + bool(self._ahead and not self.rows)

    def held(self, uid: int) -> int:
        """The positions sequence ``uid``'s cache holds now."""
        return next(row.position for row in self.rows if row.uid == uid)

    # Joining and leaving ---------------------------------------------------

    def insert(self, prompt: List[int], max_tokens: int = 256, cache: Optional[list] = None, cached: int = 0,
               uid: Optional[int] = None, sampler=None, logits_processors=None,
               before: Optional[List[int]] = None, num_draft_tokens: Optional[int] = None) -> int:
        """Prefill ``prompt`` (as ``generate_step`` does: all but the last
        token in chunks, then the last alone) and queue it to join.  ``cache``:
        a prompt cache (the target's entries, then the drafter's) already
        holding ``cached`` positions before ``prompt`` (the tokens
        ``before``, which ``logits_processors`` see).  ``sampler``: the row's
        (greedy when None); its drafts are kept by the rule the one-sequence
        loop applies for it (``Acceptor``), after the processors.
        ``num_draft_tokens``: the row's own cap (None: the batch's)."""
        if not prompt:
            raise ValueError("prompt must hold at least one token.")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}.")
        target, drafter = self.target, self.drafter
        cache, draft_cache = self._split(cache, cached)
        if num_draft_tokens is not None and num_draft_tokens < 0:
            raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}.")
        if logits_processors and before is None and cached:
            raise ValueError("logits processors need the tokens before the prompt (before=)")
        history = TokenHistory(logits_processors, mx.array(before, mx.uint32) if before else None)
        with mx.stream(self.stream):
            logits, position = prefill(target, drafter, mx.array(prompt), cache, draft_cache, cached, history,
                                       KVQuantization(), self.prefill_step_size, release=False)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            acceptor = Acceptor(sampler or greedy_sampler)
            anchor = acceptor.sampler(logprobs).astype(mx.uint32)
            mx.eval(anchor, logprobs, [c.state for c in cache] + [c.state for c in draft_cache])
        row = Row(next(self._uids) if uid is None else uid, draft_cache, anchor, position, max_tokens,
                  logprobs, acceptor, history)
        if num_draft_tokens is not None:
            row.cap = min(int(num_draft_tokens), drafter.max_drafts)
        row.stats.cap = row.cap if row.cap is not None else self.cap
        row.stats.rule = acceptor.rule
        self.joining.append((row, cache))
        return row.uid

    def _split(self, cache: Optional[list], cached: int):
        """(target entries, drafter context) of a prompt cache holding ``cached`` positions."""
        n = self.target.num_cache_entries
        if cache is None:
            if cached:
                raise ValueError("cached positions without a cache")
            return self.target.make_cache(), self.drafter.make_cache()
        if len(cache) != n + len(self.drafter.make_cache()):
            raise ValueError(f"the prompt cache has {len(cache)} entries: expected the target's {n} and the drafter's.")
        target_cache, draft_cache = list(cache[:n]), list(cache[n:])
        problem = unbatchable(target_cache)
        if problem is not None:
            raise UnsupportedCacheError(f"This prompt cache cannot decode in batched speculative rounds: {problem}.")
        for c in target_cache:
            if type(c) is not ArraysCache and c.offset != cached:
                raise ValueError(f"the prompt cache holds {c.offset} positions, not {cached}.")
        excess = draft_cache[0].offset - cached
        if excess < 0:
            raise ValueError(f"the drafter context holds {draft_cache[0].offset} positions, fewer than {cached}.")
        if excess:
            for c in draft_cache:
                c.trim(excess)
        return target_cache, draft_cache

    def extract(self, uid: int, length: int) -> list:
        """Sequence ``uid``'s prompt cache (the target's entries, then the
        drafter's) holding its first ``length`` positions; it leaves the batch."""
        index = next(i for i, row in enumerate(self.rows) if row.uid == uid)
        row = self.rows[index]
        self._add_unadded()
        excess = row.position - length
        if excess < 0:
            raise ValueError(f"sequence {uid} holds {row.position} positions, fewer than {length}.")
        caches = [_sequence_entry(c, index, w, excess) for c, w in zip(self.cache, self.windows)]
        if self.batched_drafter:
            draft_cache = [_sequence_entry(c, index, None, excess) for c in self.draft_cache]
            if hasattr(self.drafter, "from_batch_entries"):
                draft_cache = self.drafter.from_batch_entries(draft_cache, length)
        else:
            draft_cache = list(row.draft_cache)
            if excess:
                for c in draft_cache:
                    c.trim(excess)
        self._keep([i for i in range(len(self.rows)) if i != index])
        if self._ahead:
            self._ahead.pop(uid, None)  # its queued token is never handed out
        return caches + draft_cache

    def stats_of(self, uid: int) -> Optional[SpeculativeStats]:
        for row in self.rows + [r for r, _ in self.joining] + self._left:
            if row.uid == uid:
                return row.stats
        return None

    @property
    def nbytes(self) -> int:
        total = sum(c.nbytes for c in self.cache or [])
        total += sum(c.nbytes for c in self.draft_cache or [])
        total += sum(getattr(c, "nbytes", 0) for row in self.rows for c in row.draft_cache or [])
        return total + sum(c.nbytes for _, cache in self.joining for c in cache)

    def remove(self, uid: int) -> None:
        """Drop sequence ``uid`` from the batch (between rounds)."""
        self.joining = [(row, c) for row, c in self.joining if row.uid != uid]
        keep = [i for i, row in enumerate(self.rows) if row.uid != uid]
        if len(keep) < len(self.rows):
            self._keep(keep)
        if self._ahead:
            self._ahead.pop(uid, None)

    def abandon(self) -> List[int]:
        """End every sequence after a round that raised (what the round left
        in the batch caches is in no known state): their uids."""
        gone = list(dict.fromkeys([row.uid for row in self.rows] + [row.uid for row, _ in self.joining]))
        self._left = (self.rows + [row for row, _ in self.joining] + self._left)[:64]
        self.rows, self.joining = [], []
        self.cache = self.draft_cache = None
        self._ahead = self._chosen = None
        self._unadded = []
        return gone

    def _keep(self, indices: List[int]) -> None:
        self._left = ([self.rows[i] for i in range(len(self.rows)) if i not in indices] + self._left)[:64]
        self.rows = [self.rows[i] for i in indices]
        if not self.rows:
            self.cache = self.draft_cache = None
            self._unadded = []
            return
        kept = mx.array(indices)
        for c in self.cache + (self.draft_cache or []):
            c.filter(kept)
        self._unadded = [(f[kept], p[kept], t[kept]) for f, p, t in self._unadded]

    def _join(self) -> List[Emitted]:
        """Merge the prefilled sequences into the batch; their first tokens."""
        events = []
        if self.joining:
            self._add_unadded()  # the batch contexts grow rows: the queued positions are the old rows'
        for row, cache in self.joining:
            merged = [_batch_row(c) for c in cache]
            drafter_rows = None
            if self.batched_drafter:
                entries = row.draft_cache
                if hasattr(self.drafter, "batch_entries"):  # a context that is not one KV cache per layer
                    entries = self.drafter.batch_entries(entries)
                drafter_rows, row.draft_cache = [_batch_row(c) for c in entries], None
            if self.cache is None:
                self.cache, self.draft_cache = merged, drafter_rows
                self.windows = [c.max_size if type(c) is RotatingKVCache else None for c in cache]
            else:
                for c, new in zip(self.cache + (self.draft_cache or []), merged + (drafter_rows or [])):
                    c.extend(new)
            self.rows.append(row)
            row.produced = 1
            events.append(Emitted(row.uid, row.anchor.tolist(), row.logprobs, row.remaining() == 0))
        self.joining = []
        return events

    # One round -------------------------------------------------------------

    def _propose(self, caps: List[int]) -> Tuple[List[int], List[Optional[mx.array]], List[Optional[mx.array]]]:
        """Each row's number of drafts (at most its cap), drafts and (a
        sampling row) the distributions they were sampled from, lazily."""
        if self.batched_drafter:
            return self._propose_rows(caps)
        counts, drafts, qs = [], [], []
        for row, n in zip(self.rows, caps):
            d = q = None
            if n > 0:
                choose = row.acceptor.drafter_sampling(row.history, row.anchor)
                d, _, q = self.drafter.propose(row.draft_cache, row.anchor, row.position, n, choose)
            if d is not None and d.shape[0] < n:  # a proposer may find fewer (a lookup without a long match)
                n = d.shape[0]
                d, q = (d, q) if n else (None, None)
            counts.append(n)
            drafts.append(d)
            qs.append(q)
        return counts, drafts, qs

    def _propose_rows(self, counts: List[int]):
        """``_propose`` with one drafter forward for every row."""
        widest = max(counts)
        if widest == 0:
            return counts, [None] * len(counts), [None] * len(counts)
        chooses = [row.acceptor.drafter_sampling(row.history, row.anchor) for row in self.rows]
        anchors = mx.concatenate([row.anchor for row in self.rows])
        starts = mx.array([row.position for row in self.rows])
        tokens, _, q = self.drafter.propose_rows(self.draft_cache, anchors, starts, widest, chooses)
        drafts = [tokens[i, :n] if n else None for i, n in enumerate(counts)]
        qs = [q[i, :n] if q is not None and n and chooses[i] is not None else None for i, n in enumerate(counts)]
        return counts, drafts, qs

    def _blocks(self, counts: List[int], drafts: List[Optional[mx.array]]) -> mx.array:
        """[B, W] rows [anchor, drafts, padding]: W = most drafts + 1 (a row
        with fewer drafts repeats its anchor; what follows them is rejected)."""
        width = max(counts) + 1
        blocks = []
        for row, n, d in zip(self.rows, counts, drafts):
            pieces = [row.anchor] + ([d] if n > 0 else [])
            if width - 1 - n > 0:
                pieces.append(mx.repeat(row.anchor, width - 1 - n))
            blocks.append(mx.concatenate(pieces))
        return mx.stack(blocks)

    def _verify(self, blocks: mx.array, counts: List[int], drafts: list, qs: list):
        """The batch's forward; per row the drafts its rule keeps and the
        target's token after them, evaluated."""
        logits, features = self.target(blocks, self.cache)
        kept, following, rows_logprobs = [], [], []
        for i, (row, n) in enumerate(zip(self.rows, counts)):
            processed = row.history.process(logits[i, : n + 1], blocks[i, : n + 1])
            logprobs = processed - mx.logsumexp(processed, axis=-1, keepdims=True)
            a, token = row.acceptor.accept(logprobs, drafts[i], qs[i])
            kept.append(a.reshape(1))
            following.append(token.reshape(1).astype(mx.uint32))
            rows_logprobs.append(logprobs)
        accepted, following = mx.concatenate(kept), mx.concatenate(following)
        mx.eval(accepted, following, blocks)
        return accepted.tolist(), following, features, rows_logprobs

    @staticmethod
    def _roll_back(caches: List[BatchKVCache], rejected: List[int]) -> None:
        """Remove each row's last ``rejected[i]`` positions from the batch
        caches: trim the common part, shift the rest out to the left padding."""
        common = min(rejected)
        for c in caches:
            if type(c) is ArraysCache:
                recurrent.rollback_rows(c, rejected)
                continue
            if common:
                c.trim(common)
            extra = [r - common for r in rejected]
            if max(extra) > 0:
                c.prepare(right_padding=extra)
                c.finalize()

    def _forget_outside_windows(self) -> None:
        """Drop the entries of sliding-window layers that no row's later
        query can see (older than the window), once there are enough of them
        to be worth a copy."""
        for c, window in zip(self.cache, self.windows):
            if window is None or c.keys is None:
                continue
            unseen = c._idx - window
            if unseen >= BatchKVCache.step:
                c.keys, c.values = c.keys[..., unseen:, :], c.values[..., unseen:, :]
                c._idx -= unseen
                c.left_padding = c.left_padding - unseen

    def _leave_finished(self) -> None:
        """Rows at their max_tokens leave, once their last round was read."""
        unread = self._ahead or {}
        done = [i for i, row in enumerate(self.rows) if row.remaining() == 0 and row.uid not in unread]
        if done:
            self._keep([i for i in range(len(self.rows)) if i not in done])

    def _caps(self) -> List[int]:
        """Each row's drafts this round (a proposer may find fewer)."""
        cap = self.cap
        if cap is None and any(row.cap is None for row in self.rows):
            cap, self._chosen = self._chosen, None
            if cap is None:
                cap = self.auto.choose(len(self.rows), sum(row.position for row in self.rows) // len(self.rows))
            self._last_choice = cap
        return [max(0, min(cap if row.cap is None else row.cap, row.remaining() - 1)) for row in self.rows]

    def step(self) -> List[Emitted]:
        """One round for every sequence: what each produced.  Rounds that
        draft for no row run one ahead, as ``generate_step`` runs the next
        token: such a round is queued, and the round after it built, before
        its tokens are read (with a network drafter, whose context upkeep
        stays on the device)."""
        with mx.stream(self.stream):
            events = self._join()
            self._leave_finished()
            if self._ahead is None:
                if not self.rows:
                    return events
                caps = self._caps()
                if any(caps) or not self.batched_drafter:
                    return events + self._round(caps)
                self._ahead = self._queue_undrafted()
            ahead, self._ahead = self._ahead, None
            # A row that finishes in the queued round stays until it is read
            # (its cache is taken out then): no round is queued past it.
            if self.rows and all(row.remaining() > 0 for row in self.rows):
                caps = self._caps()
                if any(caps):
                    self._chosen = self._last_choice  # kept for the round it chose, run at the next call
                else:
                    self._ahead = self._queue_undrafted()
            return events + self._read(ahead)

    def _queue_undrafted(self) -> Dict[int, tuple]:
        """A round that drafts for no row, queued on the device: each row's
        token, log-probabilities and whether it finishes, lazily, by uid."""
        blocks = mx.concatenate([row.anchor for row in self.rows])[:, None]
        starts = mx.array([row.position for row in self.rows])
        logits, features = self.target(blocks, self.cache)
        self._forget_outside_windows()
        self._unadded.append((features, starts, blocks))
        if len(self._unadded) >= CONTEXT_BATCH:
            self._add_unadded()
        entries = {}
        for i, row in enumerate(self.rows):
            processed = row.history.process(logits[i, :1], blocks[i])
            logprobs = processed - mx.logsumexp(processed, axis=-1, keepdims=True)
            _, token = row.acceptor.accept(logprobs, None, None)
            row.anchor = token.reshape(1).astype(mx.uint32)
            row.position += 1
            row.produced += 1
            row.stats.proposal_lengths.append(0)
            row.stats.accepted_lengths.append(0)
            entries[row.uid] = (row.anchor, logprobs, row.remaining() == 0)
        mx.async_eval([e[0] for e in entries.values()], [e[1] for e in entries.values()])
        return entries

    def _add_unadded(self) -> None:
        """Add the positions of the undrafted rounds since the last
        proposal to the drafter contexts, in one forward (queued)."""
        if not self._unadded:
            return
        entries, self._unadded = self._unadded, []
        features = mx.concatenate([f for f, _, _ in entries], axis=1)
        tokens = mx.concatenate([t for _, _, t in entries], axis=1)
        self.drafter.add_context(self.draft_cache, features, entries[0][1], tokens)
        mx.async_eval([c.state for c in self.draft_cache])

    @staticmethod
    def _read(entries: Dict[int, tuple]) -> List[Emitted]:
        """The tokens of a queued round (of the rows still there to take them)."""
        tokens = mx.concatenate([e[0] for e in entries.values()]).tolist() if entries else []
        return [Emitted(uid, [t], logprobs, finished) for t, (uid, (_, logprobs, finished)) in zip(tokens, entries.items())]

    def _round(self, caps: List[int]) -> List[Emitted]:
        """A round with drafts, evaluated: what each row produced."""
        events = []
        self._add_unadded()
        counts, drafts, qs = self._propose(caps)
        blocks = self._blocks(counts, drafts)
        accepted, following, features, logprobs = self._verify(blocks, counts, drafts, qs)
        width = blocks.shape[1]
        rejected = [width - 1 - a for a in accepted]
        self._roll_back(self.cache, rejected)
        self._forget_outside_windows()
        if self.batched_drafter:  # every row's block enters the context, the rejected tails leave it
            starts = mx.array([row.position for row in self.rows])
            self.drafter.add_context(self.draft_cache, features, starts, blocks)
            self._roll_back(self.draft_cache, rejected)
        rows_tokens = blocks.tolist()
        for i, (row, n, a) in enumerate(zip(self.rows, counts, accepted)):
            if not self.batched_drafter:
                self.drafter.add_context(row.draft_cache, features[i : i + 1, : a + 1], row.position,
                                         blocks[i, : a + 1])
            tokens = rows_tokens[i][1 : a + 1] + following[i : i + 1].tolist()
            row.anchor = following[i : i + 1]
            row.position += a + 1
            row.produced += len(tokens)
            row.history.drop(n - a)
            row.stats.proposal_lengths.append(n)
            row.stats.accepted_lengths.append(a)
            if self.auto is not None and row.cap is None:
                self.auto.update(n, a)
            events.append(Emitted(row.uid, tokens, logprobs[i][: a + 1], row.remaining() == 0))
        # Queued, not waited for: the device updates the drafter contexts
        # while the caller takes this round's tokens.
        if self.batched_drafter:
            mx.async_eval([c.state for c in self.draft_cache or []])
        else:
            mx.async_eval([c.state for row in self.rows for c in row.draft_cache])
        return events


def batch_generate(model, drafter, prompts: List[List[int]], *, max_tokens=256,
                   num_draft_tokens: Optional[int] = None, sampler=None, logits_processors=None) -> List[List[int]]:
    """The tokens of each prompt (``max_tokens`` one number or one per
    prompt), decoded together in batched speculative rounds (greedy, or with
    ``sampler`` for every row; ``logits_processors`` for every row)."""
    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    batch = BatchSpeculative(model, drafter, num_draft_tokens=num_draft_tokens)
    uids = [batch.insert(p, m, sampler=sampler, logits_processors=logits_processors) for p, m in zip(prompts, limits)]
    out: Dict[int, List[int]] = {uid: [] for uid in uids}
    while len(batch):
        for emitted in batch.step():
            out[emitted.uid].extend(emitted.tokens)
    return [out[uid] for uid in uids]


@dataclass
class _Request:
    prompt: List[int]  # every prompt token (cached ones included)
    matcher: Any  # its stop sequences' matcher
    emitted: List[int] = field(default_factory=list)


class ServerBatch:
    """mlx-lm's ``BatchGenerator`` as ``mlx_lm.server`` drives it
    (``insert_segments``, ``next``, ``remove``, ``extract_cache``,
    ``prompt_cache_nbytes``, ``close``), decoding with a drafter in batched
    rounds.  Prompt caches in and out hold the target's entries, then the
    drafter's (the server's layout for draft models); a finished sequence's
    cache holds every token but its last, named by ``all_tokens``."""

    def __init__(self, model, drafter, *, num_draft_tokens: Optional[int] = None,
                 prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE, stream=None, **_batch_options):
        self.engine = BatchSpeculative(model, drafter, num_draft_tokens=num_draft_tokens,
                                       prefill_step_size=prefill_step_size, stream=stream or generation_stream)
        self.stream = self.engine.stream
        self.pending = deque()  # (uid, prompt rest, max_tokens, cache, cached tokens, sampler, processors)
        self.requests: Dict[int, _Request] = {}
        self._uids = itertools.count()
        self.inserted: Optional[Callable[[int], None]] = None  # told each uid as it is inserted
        self.caps: Dict[int, int] = {}  # a request's own num_draft_tokens, set by its uid before it is prefilled
        self.finished: Optional[Callable[[int, SpeculativeStats], None]] = None  # told each uid's statistics at its end
        # Told each uid that ends with an error (its prefill or a round it was
        # in raised); the sequence's last response then has no finish reason,
        # and this callback must stop it (the server's ``ctx.stop()``).
        self.failed: Optional[Callable[[int, Exception], None]] = None

    def close(self) -> None:
        self.pending.clear()

    def insert_segments(self, segments, max_tokens=None, caches=None, all_tokens=None, samplers=None,
                        logits_processors=None, stop_sequences=None) -> List[int]:
        n = len(segments)
        max_tokens = max_tokens or [256] * n
        caches = caches or [None] * n
        all_tokens = all_tokens or [[] for _ in range(n)]
        stop_sequences = stop_sequences or [None] * n
        samplers = samplers or [None] * n
        for name, values in (("max_tokens", max_tokens), ("caches", caches), ("all_tokens", all_tokens),
                             ("stop_sequences", stop_sequences), ("samplers", samplers)):
            if len(values) != n:
                raise ValueError(f"Option {name} must have one entry per segment: expected {n}, got {len(values)}.")
        uids = []
        processors = logits_processors or [None] * n
        if len(processors) != n:
            raise ValueError(f"Option logits_processors must have one entry per segment: expected {n}.")
        for parts, m, cache, before, stops, sampler, procs in zip(segments, max_tokens, caches, all_tokens,
                                                                  stop_sequences, samplers, processors):
            rest = [t for part in parts for t in part]
            if not rest:
                raise ValueError("A sequence has an empty prompt.")
            if m <= 0:
                raise ValueError("A sequence's max_tokens must be > 0.")
            uid = next(self._uids)
            self.pending.append((uid, rest, m, cache, list(before), sampler, procs or None))
            self.requests[uid] = _Request(list(before) + rest, stops.matcher() if stops is not None else None)
            if self.inserted is not None:
                self.inserted(uid)
            uids.append(uid)
        return uids

    def extract_cache(self, uids) -> dict:
        return {}  # prompts are prefilled whole: no segment ends to cache

    def remove(self, uids, return_prompt_caches: bool = False) -> dict:
        for uid in uids:
            self.pending = deque(p for p in self.pending if p[0] != uid)
            self.caps.pop(uid, None)
            stats = self.engine.stats_of(uid)
            self.engine.remove(uid)
            if self.requests.pop(uid, None) is not None and self.finished is not None and stats is not None:
                self.finished(uid, stats)
        return {}

    @property
    def prompt_cache_nbytes(self) -> int:
        held = sum(c.nbytes for p in self.pending if p[3] is not None for c in p[3] if hasattr(c, "nbytes"))
        return self.engine.nbytes + held

    def next(self):
        """(prompt responses, generation responses), as ``BatchGenerator.next``.
        A sequence whose prefill or round raises ends with an error
        (``failed``); the batch goes on with the others."""
        from mlx_lm.generate import PromptProcessingBatch

        prompt_responses, responses, failures = [], [], []
        with mx.stream(self.stream):
            while self.pending:
                uid, rest, m, cache, before, sampler, procs = self.pending.popleft()
                try:
                    self.engine.insert(rest, m, cache, len(before), uid=uid, sampler=sampler, logits_processors=procs,
                                       before=before, num_draft_tokens=self.caps.pop(uid, None))
                except Exception as e:  # its own prefill: it alone fails
                    failures.append((uid, e))
                    continue
                total = len(self.requests[uid].prompt)
                prompt_responses.append(PromptProcessingBatch.Response(uid, (total, total), True, True))
            try:
                produced = self.engine.step()
            except Exception as e:  # a round shared by every sequence in it
                produced = []
                failures += [(uid, e) for uid in self.engine.abandon()]
            for emitted in produced:
                if emitted.uid not in self.requests:
                    continue
                try:
                    responses += self._answer(emitted)
                except Exception as e:
                    self.engine.remove(emitted.uid)
                    failures.append((emitted.uid, e))
            responses += [self._failure(uid, e) for uid, e in failures if uid in self.requests]
        return prompt_responses, responses

    def _answer(self, emitted: Emitted) -> list:
        """The generation responses of what a sequence produced in a round,
        up to its end (its length or a stop sequence)."""
        from mlx_lm.generate import GenerationBatch

        request = self.requests[emitted.uid]
        responses, last = [], len(emitted.tokens) - 1
        for k, token in enumerate(emitted.tokens):
            request.emitted.append(token)
            reason = "length" if emitted.finished and k == last else None
            if request.matcher is not None and request.matcher.advance(token):
                reason = "stop"
            if reason is None:
                responses.append(GenerationBatch.Response(emitted.uid, token, emitted.logprobs[k], None, None, None))
                continue
            kept = request.prompt + request.emitted[:-1]  # what the cache holds
            if not self.engine.trimmable:  # recurrent state: the cache as it is, named by what it holds
                kept = (request.prompt + request.emitted + emitted.tokens[k + 1 :])[: self.engine.held(emitted.uid)]
            cache = self.engine.extract(emitted.uid, len(kept))
            responses.append(GenerationBatch.Response(emitted.uid, token, emitted.logprobs[k], reason, cache, kept))
            stats = self.engine.stats_of(emitted.uid)
            del self.requests[emitted.uid]
            if self.finished is not None and stats is not None:
                self.finished(emitted.uid, stats)
            break
        return responses

    def _failure(self, uid: int, error: Exception):
        """The response ending sequence ``uid`` with ``error``: the server
        takes it for a token of a stopped request, and drops the request."""
        from mlx_lm.generate import GenerationBatch

        logging.error(f"Sequence {uid} failed: {type(error).__name__}: {error}",
                      exc_info=(type(error), error, error.__traceback__))
        del self.requests[uid]
        self.caps.pop(uid, None)
        if self.failed is not None:
            self.failed(uid, error)
        placeholder = mx.zeros((max(self.engine.target.vocab_size or 0, 16),))  # top_logprobs reads up to 11
        return GenerationBatch.Response(uid, 0, placeholder, None, None, None)
