"""The drafter protocol: what the round loop, ``bind`` and the pair check
read from a drafter, whatever its kind.

A kind's ``build(config)`` (``kinds.py``) returns an object with these
members; DSpark/DFlash's ``Drafter`` is one, the test and benchmark oracles
are others.  ``isinstance(x, DrafterProtocol)`` checks that every member is
present (not their signatures), which is what ``is_drafter`` asks.
"""

from typing import Any, List, Optional, Protocol, Tuple, runtime_checkable

import mlx.core as mx


@runtime_checkable
class DrafterProtocol(Protocol):
    """A drafter as mlx-lm-dspark drives it.  Every method is lazy: it builds
    graphs and evaluates nothing, so a proposal can be queued while the
    caller consumes the previous round.

    ``args`` holds what ``bind`` and ``validate_pair`` read: ``family``
    ("qwen3" or "gemma4"), ``vocab_size``, ``hidden_size``,
    ``num_target_layers`` (None: any), ``has_embeddings`` (False: the
    drafter borrows the target's through ``borrow_embeddings(embed, head,
    factors)``, factors being what the target applies around them)
    and ``block_size`` (the trained block).
    """

    kind: str  # the registered kind that built it ("dspark", "dflash", ...)
    args: Any  # the settings the pair check reads (see above)
    target_layer_ids: List[int]  # target layers whose outputs, concatenated in this order, are its context
    max_drafts: int  # the most drafts one proposal may ask for
    block_size: int  # the block it proposes in (at most the trained one)
    confidence_threshold: Optional[float]  # cut each proposal at the first confidence below it (None: never)

    def make_cache(self) -> list:
        """A fresh, empty drafter context (a list of cache entries with
        ``offset`` and ``trim(n)``)."""
        ...

    def add_context(self, cache: list, features: mx.array, start: int, tokens: mx.array) -> None:
        """Add the target's tapped states ``features`` [1, L, taps * H] of
        positions ``start`` ... ``start + L - 1`` to ``cache``, with
        ``tokens`` [L], the token ids the target read at those positions
        (EAGLE3 pairs each position's state with the token after it; a
        drafter that reads states alone ignores them)."""
        ...

    def propose(self, cache: list, anchor: mx.array, start: int, num_drafts: int,
                choose=None) -> Tuple[mx.array, Optional[mx.array], Optional[mx.array]]:
        """Drafts [num_drafts] for the positions after ``anchor`` [1] (at
        ``start``), their confidences [num_drafts] (None without an estimate)
        and, when ``choose(k, logits_row) -> (token, q_row)`` samples them,
        the distributions q [num_drafts, V] they were drawn from (else None)."""
        ...
