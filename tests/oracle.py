"""A test-only drafter that proposes from a known continuation.

It follows the drafter protocol the round loop uses, so acceptance patterns
can be chosen exactly: ``right`` decides, per absolute position, whether the
proposed token is the continuation's (from the plain run) or a wrong one.
"""

from types import SimpleNamespace

import mlx.core as mx
from mlx_lm.models.cache import KVCache


class OracleDrafter:
    kind = "oracle"

    def __init__(self, target_args: dict, sequence, block_size=7, right=lambda pos: True, confidence=0.0):
        self.args = SimpleNamespace(
            family={"qwen3": "qwen3"}.get(target_args["model_type"], "gemma4"),
            vocab_size=target_args["vocab_size"],
            hidden_size=target_args["hidden_size"],
            num_target_layers=None,
            has_embeddings=True,
            block_size=block_size,
        )
        self.sequence = list(sequence)  # prompt + plain continuation
        self.right = right
        self.target_layer_ids = [0]
        self.max_drafts = block_size
        self.block_size = block_size
        self.confidence_threshold = None
        self.context_starts = []  # (start, length) of every add_context call
        # When sampling (p/q rule): q = confidence * point mass on the
        # proposal + the rest spread uniformly, and drafts are drawn from q.
        self.confidence = confidence

    def make_cache(self):
        return [KVCache()]

    def add_context(self, cache, features, start):
        n = features.shape[1]
        self.context_starts.append((start, n))
        cache[0].update_and_fetch(mx.zeros((1, 1, n, 1)), mx.zeros((1, 1, n, 1)))

    def propose(self, cache, anchor, start, num_drafts, choose=None):
        tokens = []
        for pos in range(start + 1, start + 1 + num_drafts):
            true = self.sequence[pos] if pos < len(self.sequence) else 0
            tokens.append(true if self.right(pos) else (true + 1) % self.args.vocab_size)
        tokens = mx.array(tokens, dtype=mx.uint32)
        q = None
        if choose is not None:
            V = self.args.vocab_size
            point = (mx.arange(V)[None] == tokens[:, None]).astype(mx.float32)
            if self.confidence:
                q = mx.log(self.confidence * point + (1 - self.confidence) / V)
                tokens = mx.random.categorical(q).astype(mx.uint32)
            else:  # a deterministic drafter: q is a point mass on its draft
                q = mx.where(point > 0, 0.0, -mx.inf)
        return tokens, None, q
