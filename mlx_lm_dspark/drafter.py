"""The DSpark / DFlash drafter network in MLX.

One network for both algorithms: DFlash is DSpark without the Markov and
confidence heads (``markov_rank == 0``).  ``family`` selects the Qwen3 or the
Gemma-4 layer variant.  The drafter reads target hidden states (tapped at
``target_layer_ids``) as context: they are projected once into per-layer K/V
that stay cached across rounds, and a block ``[anchor, mask, …]`` attends to
that context and bidirectionally to itself to propose the next tokens.

Layers whose type is in ``causal_layer_types`` attend causally inside the
block (z-lab's sliding-window layers: their reference masks a sliding layer
causally unless the config says ``is_causal: false``); a sliding layer sees
keys fewer than ``sliding_window`` positions back.
"""

import math
from dataclasses import dataclass
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs, scaled_dot_product_attention
from mlx_lm.models.cache import KVCache
from mlx_lm.models.rope_utils import initialize_rope

from . import early
from .config import MARKOV_HEAD_TYPES
from .sampling import choose_rows
from .vocab import DraftVocabulary, sanitize

LAYER_TYPES = ("full_attention", "sliding_attention")

# Gemma-4's RoPE per attention type when a config leaves it out (mlx-lm's
# gemma4_text uses the same defaults, so drafter and target agree).
GEMMA4_ROPE = {
    "full_attention": {"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 0.25},
    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
}


@dataclass
class ModelArgs(BaseModelArgs):
    family: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    vocab_size: int
    block_size: int
    target_layer_ids: list
    mask_token_id: int
    num_target_layers: Optional[int] = None
    markov_rank: int = 0
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool = False
    shifted_alignment: bool = False
    has_embeddings: bool = True
    layer_types: Optional[list] = None
    sliding_window: Optional[int] = None
    rope_theta: float = 1e6
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 32768
    # Gemma-4 only
    global_head_dim: Optional[int] = None
    num_global_key_value_heads: Optional[int] = None
    attention_k_eq_v: bool = False
    final_logit_softcapping: Optional[float] = None
    rope_parameters: Optional[dict] = None
    markov_head_type: str = "vanilla"
    draft_vocab_size: Optional[int] = None  # a reduced draft vocabulary (speculators' d2t), else the target's
    causal_layer_types: tuple = ()  # layer types that attend causally inside the block
    # z-lab: factors on the borrowed embedding / head (Qwen3-style drafters of any target)
    input_embedding_scale: Optional[float] = None
    output_multiplier: Optional[float] = None

    def __post_init__(self):
        if self.family not in ("qwen3", "gemma4"):
            raise ValueError(f"Unknown drafter family {self.family!r} (expected qwen3 or gemma4).")
        if self.markov_head_type not in MARKOV_HEAD_TYPES:
            raise ValueError(
                f"Unsupported markov_head_type {self.markov_head_type!r} (DeepSpec's are {list(MARKOV_HEAD_TYPES)})."
            )
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if len(self.layer_types) < self.num_hidden_layers:
            raise ValueError(
                f"Drafter config lists {len(self.layer_types)} layer_types for "
                f"{self.num_hidden_layers} layers."
            )
        unknown = sorted(set(self.layer_types[: self.num_hidden_layers]) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"Unsupported drafter layer_types {unknown} (expected {list(LAYER_TYPES)}).")
        self.markov_rank = int(self.markov_rank or 0)


class RMSNormNoScale(nn.Module):
    """Gemma-4's value norm: RMS-normalise without a learned scale."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, None, self.eps)


class Attention(nn.Module):
    """Queries from the block; keys/values from [cached context ; block]."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        gemma = args.family == "gemma4"
        self.layer_type = args.layer_types[layer_idx]
        sliding = self.layer_type == "sliding_attention"
        # Like transformers, a sliding layer without a window attends to everything.
        self.window = args.sliding_window if sliding else None
        self.causal = self.layer_type in args.causal_layer_types
        full_gemma = gemma and not sliding
        self.head_dim = args.global_head_dim if full_gemma and args.global_head_dim else args.head_dim
        self.k_eq_v = full_gemma and args.attention_k_eq_v
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = (
            args.num_global_key_value_heads
            if self.k_eq_v and args.num_global_key_value_heads
            else args.num_key_value_heads
        )
        self.scale = 1.0 if gemma else self.head_dim**-0.5

        dim, hd = args.hidden_size, self.head_dim
        self.q_proj = nn.Linear(dim, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=False)
        if not self.k_eq_v:
            self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=False)
        self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.v_norm = RMSNormNoScale(args.rms_norm_eps) if gemma else None

        if gemma:
            params = (args.rope_parameters or {}).get(self.layer_type) or GEMMA4_ROPE[self.layer_type]
            self.rope = initialize_rope(
                hd,
                base=params.get("rope_theta", 10000.0),
                traditional=False,
                scaling_config=params,
                max_position_embeddings=args.max_position_embeddings,
            )
        else:
            self.rope = initialize_rope(
                hd,
                base=args.rope_theta,
                traditional=False,
                scaling_config=args.rope_scaling,
                max_position_embeddings=args.max_position_embeddings,
            )

    def keys_values(self, x: mx.array, start: int):
        """K/V of the rows of x at positions start, start+1, ... (RoPE applied)."""
        B, L, _ = x.shape
        raw = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        values = raw if self.k_eq_v else self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        keys = self.rope(self.k_norm(raw).transpose(0, 2, 1, 3), offset=start)
        if self.v_norm is not None:
            values = self.v_norm(values)
        return keys, values.transpose(0, 2, 1, 3)

    def visible(self, q_pos: mx.array, k_pos: mx.array) -> Optional[mx.array]:
        """Which keys at ``k_pos`` queries at ``q_pos`` attend to (None: all)."""
        mask = None
        if self.causal:
            mask = k_pos <= q_pos
        if self.window is not None:
            near = (q_pos - k_pos) < self.window
            mask = near if mask is None else mask & near
        return mask

    def batch_visible(self, cache, L: int) -> mx.array:
        """The [B, 1, L, K] mask of a block of L rows in a left-padded batch
        cache (``BatchKVCache``, every row's newest entry in the same column):
        a row's queries see its own entries, through this layer's causal and
        window rules."""
        first = cache._idx  # the block's first column
        columns = mx.arange(first + L)[None, None, None]
        queries = (first + mx.arange(L))[None, None, :, None]
        mask = columns >= cache.left_padding[:, None, None, None]
        if self.causal:
            mask = mask & (columns <= queries)
        if self.window is not None:
            mask = mask & ((queries - columns) < self.window)
        return mask

    def __call__(self, x: mx.array, cache: KVCache, start) -> mx.array:
        """The block ``x`` at positions start… attending to the cached context
        and to itself.  The block's K/V are written after the context in the
        cache's spare room and left there uncommitted (``offset`` grows by L):
        ``Drafter.block_hidden`` trims them, so no round copies the context.
        Several sequences at once: ``start`` [B] their positions, ``cache`` a
        left-padded batch cache."""
        B, L, _ = x.shape
        queries = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim)
        queries = self.rope(self.q_norm(queries).transpose(0, 2, 1, 3), offset=start)
        if isinstance(start, mx.array):
            mask = self.batch_visible(cache, L)
            keys, values = cache.update_and_fetch(*self.keys_values(x, start))
            out = scaled_dot_product_attention(queries, keys, values, cache=None, scale=self.scale, mask=mask)
            return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))
        context = cache.offset
        keys, values = cache.update_and_fetch(*self.keys_values(x, start))
        mask = None
        if self.window is not None or self.causal:
            # The context is every committed position before the block, so its
            # rows sit at positions start-context … start-1.
            mask = self.visible(mx.arange(start, start + L)[:, None], mx.arange(start - context, start + L)[None])
        out = scaled_dot_product_attention(queries, keys, values, cache=None, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, gelu: bool):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.gelu = gelu

    def __call__(self, x):
        gate = self.gate_proj(x)
        gate = nn.gelu_approx(gate) if self.gelu else nn.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.gemma = args.family == "gemma4"
        eps = args.rms_norm_eps
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(args.hidden_size, args.intermediate_size, gelu=self.gemma)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=eps)
        if self.gemma:
            self.pre_feedforward_layernorm = nn.RMSNorm(args.hidden_size, eps=eps)
            self.post_feedforward_layernorm = nn.RMSNorm(args.hidden_size, eps=eps)
            self.layer_scalar = mx.ones((1,))

    def __call__(self, h: mx.array, cache: KVCache, start: int) -> mx.array:
        return self.around(h, lambda x: self.self_attn(x, cache, start))

    def around(self, h: mx.array, attend) -> mx.array:
        """The layer with ``attend(normed h)`` as its attention (training
        attends many blocks at once through the same norms and MLP)."""
        attn = attend(self.input_layernorm(h))
        if not self.gemma:
            h = h + attn
            return h + self.mlp(self.post_attention_layernorm(h))
        h = h + self.post_attention_layernorm(attn)
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h * self.layer_scalar


class MarkovHead(nn.Module):
    """DeepSpec's correction chaining the block on the previous token:
    ``w2(latent)`` with ``latent`` = ``w1(previous)`` ("vanilla"), that
    embedding gated by the slot's hidden state ("gated"), or the output of a
    GRU-like state carried along the block ("rnn")."""

    def __init__(self, vocab_size: int, rank: int, hidden_size: int, head_type: str = "vanilla",
                 out_size: Optional[int] = None):
        super().__init__()
        self.head_type, self.rank = head_type, rank
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, out_size or vocab_size, bias=False)
        if head_type == "gated":
            self.gate_proj = nn.Linear(hidden_size + rank, rank)
        elif head_type == "rnn":
            self.joint_proj = nn.Linear(2 * rank + hidden_size, 3 * rank)

    def step(self, embedding: mx.array, hidden: mx.array, state: Optional[mx.array]):
        """(bias, next state) of slots with previous-token ``embedding``
        [..., r] and final-normed ``hidden`` [..., H]; ``state`` [..., r]
        (rnn only; None: the block's first slot)."""
        if self.head_type == "vanilla":
            return self.markov_w2(embedding), None
        hidden = hidden.astype(embedding.dtype)
        if self.head_type == "gated":
            gate = mx.sigmoid(self.gate_proj(mx.concatenate([hidden, embedding], axis=-1)))
            return self.markov_w2(gate * embedding), None
        if state is None:
            state = mx.zeros_like(embedding)
        gate, candidate, output = mx.split(
            self.joint_proj(mx.concatenate([state, embedding, hidden], axis=-1)), 3, axis=-1)
        gate = mx.sigmoid(gate)
        state = gate * state + (1.0 - gate) * mx.tanh(candidate)
        return self.markov_w2(mx.tanh(output)), state

    def block(self, embedding: mx.array, hidden: mx.array) -> mx.array:
        """Biases of whole blocks (slots on axis -2), previous tokens known."""
        if self.head_type != "rnn":
            return self.step(embedding, hidden, None)[0]
        state, biases = None, []
        for k in range(embedding.shape[-2]):
            bias, state = self.step(embedding[..., k, :], hidden[..., k, :], state)
            biases.append(bias)
        return mx.stack(biases, axis=-2)


class ConfidenceHead(nn.Module):
    """Per-slot acceptance estimate, used to cut the proposal short."""

    def __init__(self, dims: int):
        super().__init__()
        self.proj = nn.Linear(dims, 1, bias=True)


class Drafter(nn.Module):
    """DSpark / DFlash drafter.  All methods are lazy (nothing is evaluated)
    so the caller can queue a proposal while it consumes the last round."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        H, V = args.hidden_size, args.vocab_size
        V_draft = args.draft_vocab_size or V
        if args.has_embeddings:
            self.embed_tokens = nn.Embedding(V, H)
            self.lm_head = nn.Linear(H, V_draft, bias=False)
        self.vocab = DraftVocabulary(V_draft, V) if V_draft != V else None
        self.fc = nn.Linear(len(args.target_layer_ids) * H, H, bias=False)
        self.hidden_norm = nn.RMSNorm(H, eps=args.rms_norm_eps)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(H, eps=args.rms_norm_eps)
        if args.markov_rank > 0:
            self.markov_head = MarkovHead(V, args.markov_rank, H, args.markov_head_type, V_draft)
        if args.enable_confidence_head:
            with_markov = args.confidence_head_with_markov and args.markov_rank > 0
            self.confidence_head = ConfidenceHead(H + (args.markov_rank if with_markov else 0))
        self._borrowed = None
        self._block_size = args.block_size
        self.confidence_threshold = None

    # Run-time policy -------------------------------------------------------

    @property
    def block_size(self) -> int:
        """Effective block length (<= the trained block)."""
        return self._block_size

    @block_size.setter
    def block_size(self, value: int):
        if not 1 <= int(value) <= self.args.block_size:
            raise ValueError(
                f"block_size must be between 1 and the trained block ({self.args.block_size}), got {value}."
            )
        self._block_size = int(value)

    @property
    def max_drafts(self) -> int:
        # z-lab's alignment spends the anchor slot: a block of B gives B-1 drafts.
        return self._block_size - (1 if self.args.shifted_alignment else 0)

    @property
    def target_layer_ids(self) -> List[int]:
        return list(self.args.target_layer_ids)

    def sanitize(self, weights: dict) -> dict:
        """Checkpoint names -> module names (a reduced vocabulary's d2t/t2d)."""
        if self.vocab is None:
            return {k: v for k, v in weights.items() if k not in ("d2t", "t2d")}
        return sanitize(weights)

    # Embeddings ------------------------------------------------------------

    def borrow_embeddings(self, embed, head, factors: Optional[dict] = None) -> None:
        """Use the target's embedding and LM head (z-lab drafters ship none).
        ``factors``: what the target applies around them itself
        (``input_embedding_scale``, ``final_logit_softcapping``), used where
        the drafter's config names none.  Kept outside the module tree so
        they are neither saved nor quantized."""
        object.__setattr__(self, "_borrowed", (embed, head, dict(factors or {})))

    def _embed_and_head(self):
        if self.args.has_embeddings:
            return self.embed_tokens, self.lm_head
        if self._borrowed is None:
            raise RuntimeError(
                "This drafter borrows its target's embeddings and LM head; bind it to a target "
                "first (speculative generation does this) or call borrow_embeddings()."
            )
        return self._borrowed[:2]

    def factor(self, name: str) -> Optional[float]:
        """``input_embedding_scale`` or ``final_logit_softcapping``: the
        config's value, else (a borrowing drafter) the target's."""
        value = getattr(self.args, name)
        if value is None and not self.args.has_embeddings and self._borrowed is not None:
            value = self._borrowed[2].get(name)
        return value

    def embed(self, ids: mx.array) -> mx.array:
        h = self._embed_and_head()[0](ids)
        scale = math.sqrt(self.args.hidden_size) if self.args.family == "gemma4" else self.factor("input_embedding_scale")
        if scale is not None:
            h = h * mx.array(scale, dtype=h.dtype)
        return h

    def base_logits(self, normed: mx.array) -> mx.array:
        """Logits of final-normed hidden states (what ``block_hidden`` returns),
        before the Markov correction; soft-capped when the config says so
        (Gemma-4 like its target; z-lab drafters of capped targets)."""
        logits = self._embed_and_head()[1](normed)
        if self.args.output_multiplier is not None:
            logits = logits * self.args.output_multiplier
        cap = self.factor("final_logit_softcapping")
        if cap:
            logits = mx.tanh(logits / cap) * cap
        return self.full_vocabulary(logits)

    def full_vocabulary(self, draft_logits: mx.array) -> mx.array:
        """Logits over the draft vocabulary as logits over the target's
        (-inf outside a reduced draft vocabulary)."""
        return draft_logits if self.vocab is None else self.vocab.expand(draft_logits)

    # Context ---------------------------------------------------------------

    def make_cache(self) -> list:
        """Per drafter layer, the K/V of the committed context positions."""
        return [KVCache() for _ in self.layers]

    def add_context(self, cache: list, features: mx.array, start: int, tokens: Optional[mx.array] = None) -> None:
        """Project target features of new positions start… into the context."""
        # In the drafter's dtype (norms are never quantized), so fp32 taps
        # don't promote the whole context cache.
        c = self.hidden_norm(self.fc(features.astype(self.hidden_norm.weight.dtype)))
        for layer, layer_cache in zip(self.layers, cache):
            layer_cache.update_and_fetch(*layer.self_attn.keys_values(c, start))

    # Heads -----------------------------------------------------------------
    # DSpark's two heads read a draft slot's state and the token before the
    # slot: training gives them the true previous tokens (teacher forcing),
    # inference the tokens it drafted.  One definition serves both.

    def draft_rows(self, num_drafts: int) -> slice:
        """The block rows whose states propose the first ``num_drafts``
        drafts: z-lab's shifted alignment spends the anchor's row."""
        return slice(1, 1 + num_drafts) if self.args.shifted_alignment else slice(0, num_drafts)

    def markov_correction(self, logits: mx.array, previous: mx.array, hidden: Optional[mx.array] = None):
        """(corrected logits, Markov embedding of ``previous``): ``logits``
        [..., B, V] of whole blocks plus the Markov head's correction for the
        tokens ``previous`` [..., B] before their slots, whose final-normed
        states are ``hidden`` [..., B, H] (read by the gated and rnn heads).
        Without a Markov head, (``logits``, None)."""
        if self.args.markov_rank <= 0:
            return logits, None
        head = self.markov_head
        embedding = head.markov_w1(previous)
        return logits + self.full_vocabulary(head.block(embedding, hidden)), embedding

    def markov_step(self, logits: mx.array, previous: mx.array, hidden: mx.array, state):
        """``markov_correction`` of one slot while drafting: (corrected
        logits, embedding, the rnn head's state for the next slot)."""
        head = self.markov_head
        embedding = head.markov_w1(previous)
        bias, state = head.step(embedding, hidden, state)
        return logits + self.full_vocabulary(bias), embedding, state

    def confidence_logits(self, hidden: mx.array, embedding: Optional[mx.array]) -> Optional[mx.array]:
        """Pre-sigmoid confidence [...] of slots with final-normed ``hidden``
        [..., H] whose previous tokens have the Markov ``embedding`` [..., r]
        (read with ``confidence_head_with_markov``); None without a
        confidence head."""
        head = getattr(self, "confidence_head", None)
        if head is None:
            return None
        features = hidden
        if self.args.confidence_head_with_markov and self.args.markov_rank > 0:
            features = mx.concatenate([hidden, embedding.astype(hidden.dtype)], axis=-1)
        return head.proj(features)[..., 0]

    def heads(self, logits: mx.array, hidden: mx.array, previous: mx.array):
        """(corrected logits, confidence logits or None) of slots with base
        ``logits``, final-normed ``hidden`` and the tokens ``previous``
        before them, all known (teacher forcing).  ``draft_block`` applies
        the same two heads while it drafts the previous tokens itself."""
        corrected, embedding = self.markov_correction(logits, previous, hidden)
        return corrected, self.confidence_logits(hidden, embedding)

    # Block -----------------------------------------------------------------

    def block_hidden(self, cache: list, block_ids: mx.array, start: int) -> mx.array:
        """Final-normed hidden states of the block at positions start…"""
        h = self.embed(block_ids)
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, layer_cache, start)
        for layer_cache in cache:  # the block is not committed context
            layer_cache.trim(block_ids.shape[1])
        return self.norm(h)

    def draft_block(self, cache: list, anchor: mx.array, start: int, num_drafts: Optional[int] = None,
                    choose=None, start_early: bool = False):
        """Everything one proposal computes (lazily).

        Returns a dict with ``hidden`` and ``base_logits`` for the whole block,
        and, for the first ``num_drafts`` draft slots, ``corrected_logits``
        (Markov-corrected), ``confidence_logits`` (pre-sigmoid, or None) and
        the drafted ``tokens``.  Drafts are the argmax unless ``choose(k,
        logits_row) -> (token [1], q_logprobs_row)`` picks them (sampling);
        its q rows are returned as ``q_logprobs``.  The Markov head chains
        each slot on the token actually drafted before it (the heads are
        those training applies teacher-forced: ``heads``).  ``start_early``
        queues the block's hidden states as soon as they are built, so the
        device computes them while Python builds the heads and the chain.
        """
        B = self._block_size
        num_drafts = self.max_drafts if num_drafts is None else num_drafts
        if not 0 <= num_drafts <= self.max_drafts:
            raise ValueError(f"num_drafts must be between 0 and {self.max_drafts}, got {num_drafts}.")
        ids = mx.concatenate(
            [anchor.reshape(1).astype(mx.uint32), mx.full((B - 1,), self.args.mask_token_id, mx.uint32)]
        )[None]
        hidden = self.block_hidden(cache, ids, start)
        if start_early:
            early.start(hidden)
        logits = self.base_logits(hidden)  # the whole block's, lazy: a proposal evaluates its slots' only
        slots = self.draft_rows(num_drafts)
        slot_hidden = hidden[0, slots]
        slot_logits = logits[0, slots] if num_drafts == self.max_drafts else self.base_logits(slot_hidden)
        markov = self.args.markov_rank > 0
        V = logits.shape[-1]

        # Only the token choice is sequential (each slot is corrected by the
        # token drafted before it); the confidence head then runs once over
        # all slots.
        prev = anchor.reshape(1).astype(mx.uint32)
        embedding = None
        if not markov and choose is None:
            corrected = slot_logits
            tokens = mx.argmax(corrected, axis=-1).astype(mx.uint32) if num_drafts else prev[:0]
            q_rows = []
        else:
            rows, chosen, q_rows, embs = [], [], [], []
            state = None
            for k in range(num_drafts):
                row = slot_logits[k : k + 1]
                if markov:
                    row, emb, state = self.markov_step(row, prev, slot_hidden[k : k + 1], state)
                    embs.append(emb)
                if choose is None:
                    token = mx.argmax(row, axis=-1).astype(mx.uint32)
                else:
                    token, q_row = choose(k, row)
                    q_rows.append(q_row)
                rows.append(row)
                chosen.append(token.reshape(1).astype(mx.uint32))
                prev = chosen[-1]
            corrected = mx.concatenate(rows) if rows else mx.zeros((0, V), logits.dtype)
            tokens = mx.concatenate(chosen) if chosen else mx.zeros((0,), mx.uint32)
            if markov:
                embedding = mx.concatenate(embs) if embs else mx.zeros((0, self.args.markov_rank), slot_hidden.dtype)

        return {
            "hidden": hidden,
            "base_logits": logits,
            "corrected_logits": corrected,
            "confidence_logits": self.confidence_logits(slot_hidden, embedding),
            "tokens": tokens,
            "q_logprobs": mx.concatenate(q_rows) if q_rows else None,
        }

    def propose_rows(self, cache: list, anchors: mx.array, starts: mx.array, num_drafts: int, chooses=None):
        """``propose`` for several sequences in one forward: ``cache`` their
        contexts as left-padded batch caches (``BatchKVCache`` per layer),
        ``anchors`` and ``starts`` [B].  Returns drafts [B, num_drafts],
        confidences [B, num_drafts] (or None) and, when ``chooses`` (one
        ``choose`` or None per row) samples some rows, their q rows
        [B, num_drafts, V] (a greedy row's are a point mass on its draft)."""
        B, L = anchors.shape[0], self._block_size
        ids = mx.concatenate(
            [anchors.reshape(B, 1).astype(mx.uint32), mx.full((B, L - 1), self.args.mask_token_id, mx.uint32)], axis=1)
        hidden = self.block_hidden(cache, ids, starts)
        early.start(hidden)
        slots = self.draft_rows(num_drafts)
        slot_hidden = hidden[:, slots]
        slot_logits = self.base_logits(slot_hidden)
        markov = self.args.markov_rank > 0
        chooses = chooses if chooses is not None and any(c is not None for c in chooses) else None
        prev = anchors.reshape(B).astype(mx.uint32)
        state, chosen, q_rows, embs = None, [], [], []
        for k in range(num_drafts):
            row = slot_logits[:, k]
            if markov:
                row, emb, state = self.markov_step(row, prev, slot_hidden[:, k], state)
                embs.append(emb)
            token, q_row = choose_rows(k, row, chooses)
            if q_row is not None:
                q_rows.append(q_row)
            chosen.append(token)
            prev = token
        drafts = mx.stack(chosen, axis=1) if chosen else mx.zeros((B, 0), mx.uint32)
        embedding = mx.stack(embs, axis=1) if markov and embs else None
        conf = self.confidence_logits(slot_hidden, embedding) if num_drafts else None
        confidence = mx.sigmoid(conf.astype(mx.float32)) if conf is not None else None
        q = mx.stack(q_rows, axis=1) if q_rows else None
        return drafts, confidence, q

    def propose(self, cache: list, anchor: mx.array, start: int, num_drafts: int, choose=None):
        """Drafts for the next ``num_drafts`` positions, their confidences
        (None without a confidence head) and, when ``choose`` samples them,
        the distributions they were sampled from (else None)."""
        out = self.draft_block(cache, anchor, start, num_drafts, choose, start_early=True)
        conf = out["confidence_logits"]
        confidence = mx.sigmoid(conf.astype(mx.float32)) if conf is not None else None
        return out["tokens"], confidence, out["q_logprobs"]
