"""A reduced draft vocabulary mapped back to the target's.

vLLM speculators checkpoints may draft over a subset of the target's
vocabulary: their LM head has one row per draft token and ``d2t`` holds, for
draft row i, the offset to its target id (target id = i + d2t[i]); ``t2d``
marks the target ids that have a draft row.  Drafts are target ids, and the
draft distribution q is over the full target vocabulary, zero outside the
subset, so the p/q acceptance rule is unchanged.
"""

import mlx.core as mx
import mlx.nn as nn


class DraftVocabulary(nn.Module):
    """The ``d2t`` / ``t2d`` mapping, loaded with the drafter's weights under
    those names (``vocab.d2t`` in the module tree; ``sanitize`` renames)."""

    def __init__(self, draft_size: int, target_size: int):
        super().__init__()
        self.draft_size, self.target_size = draft_size, target_size
        self.d2t = mx.zeros((draft_size,), dtype=mx.int64)
        self.t2d = mx.zeros((target_size,), dtype=mx.bool_)

    def target_ids(self) -> mx.array:
        """The target id of each draft row [draft_size]."""
        return mx.arange(self.draft_size, dtype=mx.int64) + self.d2t

    def expand(self, draft_logits: mx.array) -> mx.array:
        """[..., draft_size] logits -> [..., target_size], -inf outside the draft vocabulary."""
        full = mx.full(draft_logits.shape[:-1] + (self.target_size,), -mx.inf, dtype=draft_logits.dtype)
        full[..., self.target_ids()] = draft_logits
        return full

    def problem(self):
        """What is wrong with the loaded mapping, or None: every draft row
        maps to a distinct target id inside the vocabulary, the ones ``t2d``
        marks."""
        ids = self.target_ids()
        if mx.any((ids < 0) | (ids >= self.target_size)).item():
            return f"d2t maps draft rows outside the target vocabulary (0..{self.target_size - 1})"
        marked = self.t2d.astype(mx.int32)
        if marked.sum().item() != self.draft_size or not mx.all(marked[ids] == 1).item():
            return "t2d does not mark exactly the target ids d2t maps to (duplicate or inconsistent rows)"
        return None


def sanitize(weights: dict) -> dict:
    """Checkpoint names (``d2t``, ``t2d`` at the top level) -> module names."""
    return {(f"vocab.{k}" if k in ("d2t", "t2d") else k): v for k, v in weights.items()}
