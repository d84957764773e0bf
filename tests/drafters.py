"""Test-only drafters built on the oracle drafter (``mlx_lm_dspark_tools.oracle``).

``ModelDrafter`` drafts with the target model itself (a perfect drafter, or
one whose logits are distorted on purpose); ``TableDrafter`` drafts from a
bigram table.  Both sample their drafts through the round loop's ``choose``
when it samples, so the p/q rule meets a real q.
"""

import mlx.core as mx

from mlx_lm_dspark_tools.oracle import OracleDrafter


class ModelDrafter(OracleDrafter):
    """A test-only drafter that drafts with the target model itself.

    Each draft is the target's next-token logits after the committed tokens
    and the drafts before it, passed through ``distort`` and then through the
    round loop's ``choose`` (the processed q it samples from).  With the
    identity, q equals the target's processed p: a perfect drafter.  The
    committed sequence is rebuilt from the prompt, the anchors and the
    drafter's own previous drafts, so a run must start with ``reset``.
    """

    kind = "model-oracle"
    auto_draft_length = False  # it tracks one generation; the cost model cannot probe it

    def __init__(self, model, target_args: dict, block_size=3, distort=lambda logits: logits):
        super().__init__(target_args, right=lambda pos: True, block_size=block_size)
        from mlx_lm.models.cache import make_prompt_cache

        self.model = model
        self.distort = distort
        self._make_model_cache = lambda: make_prompt_cache(model)

    def reset(self, prompt):
        self.committed = [int(t) for t in prompt]  # tokens before the next anchor
        self.last = None  # (start, anchor, drafts) of the previous proposal
        self.cached = []  # tokens the model cache holds
        self.model_cache = self._make_model_cache()

    def _catch_up(self, anchor, start):
        if self.last is not None:
            last_start, last_anchor, last_drafts = self.last
            last_drafts = last_drafts.tolist()  # evaluated by the round that verified them
            if last_drafts:
                self.cached = self.committed + [last_anchor] + last_drafts[:-1]
            kept = start - last_start - 1
            if not 0 <= kept <= len(last_drafts):
                raise RuntimeError("ModelDrafter lost track of the committed tokens")
            self.committed += [last_anchor] + last_drafts[:kept]
        if len(self.committed) != start:
            raise RuntimeError(f"ModelDrafter expected the anchor at {len(self.committed)}, got {start}")
        return self.committed + [int(anchor.item())]

    def propose(self, cache, anchor, start, num_drafts, choose=None):
        sequence = self._catch_up(anchor, start)
        common = 0
        while common < min(len(self.cached), len(sequence)) and self.cached[common] == sequence[common]:
            common += 1
        common = min(common, len(sequence) - 1)  # the anchor's logits are always recomputed
        for c in self.model_cache:
            c.trim(c.offset - common)
        self.cached = sequence[:common]
        feed = mx.array(sequence[common:], dtype=mx.uint32)
        tokens, q_rows = [], []
        for k in range(num_drafts):
            row = self.distort(self.model(feed[None], self.model_cache)[0, -1:].astype(mx.float32))
            if choose is None:
                token = mx.argmax(row, axis=-1).astype(mx.uint32)
            else:
                token, q = choose(k, row)
                q_rows.append(q)
            tokens.append(token.reshape(1).astype(mx.uint32))
            feed = tokens[-1]
        tokens = mx.concatenate(tokens) if tokens else mx.zeros((0,), mx.uint32)
        # The model cache now holds sequence + drafts[:-1]; the drafts stay
        # lazy until the next call (no extra host sync in the round).
        self.last = (start, sequence[-1], tokens)
        return tokens, None, (mx.concatenate(q_rows) if q_rows else None)


class TableDrafter(OracleDrafter):
    """A cheap test-only drafter whose logits depend only on the previous
    token (``table[prev]``, a [V, V] array): right where the target is
    nearly bigram-like, wrong elsewhere.  Drafts go through the round loop's
    ``choose`` (sampling from the processed q) or are the argmax."""

    kind = "table-oracle"

    def __init__(self, table: mx.array, target_args: dict, block_size=3):
        super().__init__(target_args, right=lambda pos: True, block_size=block_size)
        self.table = table.astype(mx.float32)

    def propose(self, cache, anchor, start, num_drafts, choose=None):
        prev = anchor.reshape(1).astype(mx.uint32)
        tokens, q_rows = [], []
        for k in range(num_drafts):
            row = self.table[prev]
            if choose is None:
                token = mx.argmax(row, axis=-1).astype(mx.uint32)
            else:
                token, q = choose(k, row)
                q_rows.append(q)
            prev = token.reshape(1).astype(mx.uint32)
            tokens.append(prev)
        tokens = mx.concatenate(tokens) if tokens else mx.zeros((0,), mx.uint32)
        return tokens, None, (mx.concatenate(q_rows) if q_rows else None)


class TokenLog:
    """A drafter context that records the tokens it was given."""

    def __init__(self):
        self.tokens = []

    @property
    def offset(self) -> int:
        return len(self.tokens)

    @property
    def state(self):
        return []

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(len(self.tokens), n)
        del self.tokens[len(self.tokens) - n :]
        return n


class ContinuationDrafter(OracleDrafter):
    """An oracle for several sequences at once: it knows each prompt's plain
    continuation, recognises the sequence from the tokens its context was
    given, and drafts the true next tokens, each right with probability
    ``acceptance`` (seeded per sequence and position)."""

    kind = "continuation-oracle"
    auto_draft_length = False

    def __init__(self, continuations, target_args: dict, acceptance: float, block_size=7, seed=0):
        super().__init__(target_args, acceptance=acceptance, block_size=block_size, seed=seed)
        self.continuations = [[int(t) for t in c] for c in continuations]

    def make_cache(self) -> list:
        return [TokenLog()]

    def add_context(self, cache, features, start, tokens=None) -> None:
        log = cache[0]
        assert start == log.offset, (start, log.offset)
        log.tokens.extend(tokens.tolist())

    def propose(self, cache, anchor, start, num_drafts, choose=None):
        seen = cache[0].tokens + anchor.tolist()
        matches = [i for i, c in enumerate(self.continuations) if c[: len(seen)] == seen]
        assert matches, "a sequence the drafter was not given"
        self.continuation = self.continuations[matches[0]]
        self.salt = matches[0] + 1
        return mx.array(self.drafts(start, num_drafts), dtype=mx.uint32), None, None
