"""The oracle drafter: proposes from a known continuation, right or wrong
at each position as chosen, so tests and the benchmark control acceptance.

It proposes the target's own plain-decoding continuation (the prompt and the
plain run's tokens: ``continuation`` or ``set_continuation``).  Whether the
draft for a position is right is either ``right(position)`` (tests choose
exact patterns) or a hash of (seed, the continuation, the trial, position)
compared with ``acceptance`` (the benchmark: runs of one trial, the caps
compared on it, see the same pattern, while other trials and prompts see
independent ones, so no fixed cap is fitted in hindsight to one pattern).
A wrong draft is the right token + 1.  ``confidence``, when given, is the
per-slot confidence it reports (the benchmark gives ``acceptance``: what the
automatic cap should expect).  When sampling, its q is a point mass on its
draft (a deterministic drafter).

Wrapping a real drafter (``inner``) keeps that drafter's work in every round
(context updates and the full proposal are computed, then its tokens
replaced), so timings include a realistic drafting cost; without one the
oracle costs almost nothing.  It is meant for greedy decoding: with a
sampler the speculative run leaves the plain continuation and the drafts
stop matching it.
"""

import struct
import zlib
from types import SimpleNamespace
from typing import Callable, List, Optional

import mlx.core as mx

MASK64 = (1 << 64) - 1


def uniform(seed: int, position: int) -> float:
    """A deterministic value in [0, 1) for (seed, position) (splitmix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 1) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    return z / 2.0**64


class PositionCache:
    """The oracle's drafter context: only a count of positions."""

    def __init__(self):
        self.offset = 0

    @property
    def state(self):
        return []

    @property
    def nbytes(self) -> int:
        return 0

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n


def target_settings(target_args: dict, block_size: int) -> SimpleNamespace:
    """What the pair check reads, taken from the target's own settings (a
    drafter of any target)."""
    from mlx_lm_dspark.config import family_of_model_type

    return SimpleNamespace(
        family=family_of_model_type(target_args.get("model_type")),
        vocab_size=target_args["vocab_size"],
        hidden_size=target_args["hidden_size"],
        num_target_layers=None,
        has_embeddings=True,
        block_size=block_size,
    )


class OracleDrafter:
    """Proposes the continuation, each position right as ``right`` or
    ``acceptance`` says (see the module docstring)."""

    kind = "oracle"

    def __init__(self, target_args: Optional[dict], continuation=(), *, right: Optional[Callable[[int], bool]] = None,
                 acceptance: Optional[float] = None, confidence: Optional[float] = None, block_size: int = 7,
                 inner=None, seed: int = 0):
        if (right is None) == (acceptance is None):
            raise ValueError("give either right(position) or acceptance.")
        if acceptance is not None and not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"acceptance must be between 0 and 1, got {acceptance}.")
        self.acceptance = acceptance
        self.confidence = confidence
        self.seed = int(seed)
        self.inner = inner
        self.salt = 0
        self.continuation: List[int] = [int(t) for t in continuation]
        if right is not None:
            self.right = right
        self.confidence_threshold = None
        if inner is not None:
            self.args = inner.args
            self.target_layer_ids = list(inner.target_layer_ids)
            self.max_drafts = inner.max_drafts
        else:
            self.args = target_settings(target_args, block_size)
            self.target_layer_ids = [0]
            self.max_drafts = block_size
        self.block_size = self.max_drafts

    def set_continuation(self, tokens, trial: int = 0) -> None:
        """The sequence to draft from (prompt + the plain run's tokens), and
        the trial whose right/wrong pattern to use."""
        self.continuation = [int(t) for t in tokens]
        packed = struct.pack(f"<{len(self.continuation) + 1}q", int(trial), *self.continuation)
        self.salt = zlib.crc32(packed)

    def right(self, position: int) -> bool:
        return uniform(self.seed + (self.salt << 20), position) < self.acceptance

    def drafts(self, start: int, num_drafts: int) -> List[int]:
        """The tokens proposed for positions start + 1 ... start + num_drafts."""
        vocab = self.args.vocab_size
        out = []
        for pos in range(start + 1, start + 1 + num_drafts):
            true = self.continuation[pos] if pos < len(self.continuation) else 0
            out.append(true if self.right(pos) else (true + 1) % vocab)
        return out

    # The drafter protocol -------------------------------------------------

    def make_cache(self) -> list:
        return self.inner.make_cache() if self.inner is not None else [PositionCache()]

    def add_context(self, cache: list, features: mx.array, start: int, tokens: Optional[mx.array] = None) -> None:
        if self.inner is not None:
            self.inner.add_context(cache, features, start, tokens)
        else:
            cache[0].offset += features.shape[1]

    def propose(self, cache: list, anchor: mx.array, start: int, num_drafts: int, choose=None):
        tokens = mx.array(self.drafts(start, num_drafts), dtype=mx.uint32)
        confidence = None
        if self.confidence is not None:
            confidence = mx.full((num_drafts,), self.confidence, dtype=mx.float32)
        if self.inner is not None:
            # Keep the real drafter's work in the graph (its tokens are replaced).
            inner_tokens, inner_confidence, _ = self.inner.propose(cache, anchor, start, num_drafts)
            tokens = mx.where(inner_tokens >= 0, tokens, inner_tokens)
            if inner_confidence is not None and confidence is not None:
                confidence = confidence + 0 * inner_confidence
        q = None
        if choose is not None:  # a deterministic drafter: q is a point mass on its draft
            point = mx.arange(self.args.vocab_size)[None] == tokens[:, None]
            q = mx.where(point, 0.0, -mx.inf)
        return tokens, confidence, q

    def borrow_embeddings(self, embed, head, factors=None) -> None:
        self.inner.borrow_embeddings(embed, head, factors)

    def parameters(self) -> dict:
        return self.inner.parameters() if self.inner is not None else {}
