"""DeepSpec's EAGLE3 drafter network in MLX.

One network for the Qwen3 and Gemma-4 flavours (``family``).  Each drafter
row pairs a hidden state with a token: the fused target feature of position p
(``fc`` over the concatenated taps) with the token at p+1, or, while drafting,
the drafter's own previous output with the token it just drafted.  A single
decoder layer attends over ``[normed embedding ; normed hidden]`` with its own
KV cache, and drafts autoregressively up to ``ttt_length`` tokens per round.

State across rounds (as DeepSpec's evaluator keeps it): the cache holds one
row per committed position, each built from the *target's* feature of that
position and the committed token after it, plus the output of the last row,
which seeds the next proposal.  The rows a proposal appends while drafting are
dropped before ``propose`` returns, so the next round continues from committed
state only, whatever the target accepted.  The last committed position's row
needs the token after it, which is only known when the next proposal's anchor
is: it waits in the cache until then (``Eagle3Cache.pending``).
"""

import math
from dataclasses import dataclass
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs, create_causal_mask, scaled_dot_product_attention
from mlx_lm.models.cache import BatchKVCache, KVCache
from mlx_lm.models.rope_utils import initialize_rope

from .config import EAGLE3_ARCHITECTURES, FAMILY_OF_MODEL_TYPE, speculators_args, speculators_type
from .drafter import GEMMA4_ROPE, MLP, RMSNormNoScale
from .sampling import choose_rows
from .vocab import DraftVocabulary, sanitize

_REQUIRED = ("target_layer_ids", "ttt_length")


def eagle3_args(config: dict) -> dict:
    """The dict ``ModelArgs.from_dict`` takes, from an EAGLE3 config.json
    (DeepSpec's layout, or vLLM speculators' rewritten into it)."""
    if speculators_type(config) is not None:
        config = speculators_args(config)
    args = dict(config)
    family = next((EAGLE3_ARCHITECTURES[a] for a in config.get("architectures") or () if a in EAGLE3_ARCHITECTURES),
                  FAMILY_OF_MODEL_TYPE.get(config.get("model_type")))
    if family is None:
        raise ValueError(
            f"Unsupported EAGLE3 drafter: model_type {config.get('model_type')!r}. "
            f"mlx-lm-dspark runs EAGLE3 drafters for {sorted(set(EAGLE3_ARCHITECTURES.values()))} targets."
        )
    args["family"] = family
    missing = [k for k in _REQUIRED if config.get(k) is None]
    if missing:
        raise ValueError(f"EAGLE3 drafter config is missing {', '.join(missing)}.")
    layers = config.get("draft_num_hidden_layers", config.get("num_hidden_layers", 1))
    if layers != 1:
        raise ValueError(
            f"EAGLE3 drafter with {layers} layers: only single-layer EAGLE3 drafters can be run "
            "(DeepSpec's inference is defined for exactly one)."
        )
    args["num_hidden_layers"] = 1
    args["target_layer_ids"] = [int(i) for i in config["target_layer_ids"]]
    if args.get("head_dim") is None:
        args["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    rope = config.get("rope_parameters") or {}
    if family == "qwen3":
        if args.get("rope_theta") is None:
            args["rope_theta"] = rope.get("rope_theta", 1e6)
        if args.get("rope_scaling") is None and rope:
            args["rope_scaling"] = rope
    else:
        if config.get("enable_moe_block") or config.get("hidden_size_per_layer_input"):
            raise ValueError(
                "Gemma-4 EAGLE3 drafter with a MoE block or per-layer inputs: DeepSpec's EAGLE3 "
                "drafters have neither, and this one cannot be run."
            )
        # Per attention type; a stray top-level rope_type/rope_theta sits beside them.
        args["rope_parameters"] = rope.get("full_attention") or GEMMA4_ROPE["full_attention"]
    return args


@dataclass
class ModelArgs(BaseModelArgs):
    family: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    vocab_size: int
    target_layer_ids: list
    ttt_length: int
    num_hidden_layers: int = 1
    num_target_layers: Optional[int] = None
    has_embeddings: bool = True
    attention_bias: bool = False
    rope_theta: float = 1e6
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 32768
    # Gemma-4 only
    global_head_dim: Optional[int] = None
    num_global_key_value_heads: Optional[int] = None
    attention_k_eq_v: bool = False
    final_logit_softcapping: Optional[float] = None
    rope_parameters: Optional[dict] = None  # the full-attention entry
    # vLLM speculators variants
    draft_vocab_size: Optional[int] = None  # a reduced draft vocabulary (d2t), else the target's
    norm_before_residual: bool = False  # the layer's residual is the normed hidden

    def __post_init__(self):
        if self.family not in ("qwen3", "gemma4"):
            raise ValueError(f"Unknown EAGLE3 drafter family {self.family!r} (expected qwen3 or gemma4).")
        if self.num_hidden_layers != 1:
            raise ValueError(f"EAGLE3 drafters have one layer, got num_hidden_layers={self.num_hidden_layers}.")
        if int(self.ttt_length) < 1:
            raise ValueError(f"ttt_length must be >= 1, got {self.ttt_length}.")
        self.ttt_length = int(self.ttt_length)

    @property
    def block_size(self) -> int:
        """The trained proposal length (the drafter protocol's name for it)."""
        return self.ttt_length


class Attention(nn.Module):
    """Attention over ``[normed embedding ; normed hidden]`` (2H wide)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        gemma = args.family == "gemma4"
        self.head_dim = hd = args.global_head_dim if gemma and args.global_head_dim else args.head_dim
        self.k_eq_v = gemma and args.attention_k_eq_v
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = (
            args.num_global_key_value_heads
            if self.k_eq_v and args.num_global_key_value_heads
            else args.num_key_value_heads
        )
        self.scale = 1.0 if gemma else hd**-0.5
        dim, bias = 2 * args.hidden_size, args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=bias)
        if not self.k_eq_v:
            self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, args.hidden_size, bias=bias)
        self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.v_norm = RMSNormNoScale(args.rms_norm_eps) if gemma else None
        if gemma:
            params = args.rope_parameters or GEMMA4_ROPE["full_attention"]
            base, scaling = params.get("rope_theta", 1e6), params
        else:
            base, scaling = args.rope_theta, args.rope_scaling
        self.rope = initialize_rope(
            hd, base=base, traditional=False, scaling_config=scaling,
            max_position_embeddings=args.max_position_embeddings,
        )

    def keys_values(self, x: mx.array, start: int):
        """K (after k_norm and RoPE) and V of the rows of x at positions start…"""
        B, L, _ = x.shape
        raw = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        values = raw if self.k_eq_v else self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        keys = self.rope(self.k_norm(raw).transpose(0, 2, 1, 3), offset=start)
        if self.v_norm is not None:
            values = self.v_norm(values)
        return keys, values.transpose(0, 2, 1, 3)

    def queries(self, x: mx.array, start: int) -> mx.array:
        B, L, _ = x.shape
        queries = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim)
        return self.rope(self.q_norm(queries).transpose(0, 2, 1, 3), offset=start)

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, mask) -> mx.array:
        B, _, L, _ = queries.shape
        out = scaled_dot_product_attention(queries, keys, values, cache=None, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def __call__(self, x: mx.array, cache: KVCache, start: int) -> mx.array:
        """Rows at positions start… attend to the cache and, causally, to each other."""
        L = x.shape[1]
        keys, values = cache.update_and_fetch(*self.keys_values(x, start))
        mask = create_causal_mask(L, keys.shape[2] - L) if L > 1 else None
        return self.attend(self.queries(x, start), keys, values, mask)


class DecoderLayer(nn.Module):
    """The single EAGLE3 layer: its residual stream is the un-normed hidden."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gemma = args.family == "gemma4"
        self.norm_before_residual = args.norm_before_residual
        H, eps = args.hidden_size, args.rms_norm_eps
        self.hidden_norm = nn.RMSNorm(H, eps=eps)
        self.input_layernorm = nn.RMSNorm(H, eps=eps)
        self.self_attn = Attention(args)
        self.mlp = MLP(H, args.intermediate_size, gelu=self.gemma)
        self.post_attention_layernorm = nn.RMSNorm(H, eps=eps)
        if self.gemma:
            self.pre_feedforward_layernorm = nn.RMSNorm(H, eps=eps)
            self.post_feedforward_layernorm = nn.RMSNorm(H, eps=eps)
            self.layer_scalar = mx.ones((1,))

    def attention_input(self, h: mx.array, e: mx.array) -> mx.array:
        """Embedding half first, then the hidden half."""
        return mx.concatenate([self.input_layernorm(e), self.hidden_norm(h)], axis=-1)

    def __call__(self, h: mx.array, e: mx.array, cache: KVCache, start: int) -> mx.array:
        return self.around(h, e, lambda x: self.self_attn(x, cache, start))

    def around(self, h: mx.array, e: mx.array, attend) -> mx.array:
        """The layer with ``attend(attention input)`` as its attention
        (training attends all unrolled steps at once through the same layer)."""
        attn = attend(self.attention_input(h, e))
        if self.norm_before_residual:
            h = self.hidden_norm(h)
        if not self.gemma:
            h = h + attn
            return h + self.mlp(self.post_attention_layernorm(h))
        h = h + self.post_attention_layernorm(attn)
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h * self.layer_scalar


class Eagle3Cache:
    """The drafter's state over the committed positions 0…offset-1.

    ``kv`` holds one K/V row per position whose following token is known; the
    last position's row waits (``pending``) until the next proposal's anchor
    completes it.  ``hidden`` is the output of the last completed row (the
    first proposal hidden).  The fused target features of every position are
    kept so that a trim can re-open the new last row.
    """

    def __init__(self):
        self.kv = KVCache()
        self.fused: List[mx.array] = []  # [1, L, H] chunks, in position order
        self.positions = 0
        self.origin = 0  # the first position held (a context started past a reused prompt cache)
        self.hidden: Optional[mx.array] = None

    def start_at(self, start: int) -> None:
        """An empty context whose first row will be at ``start``: the target
        cache already holds positions the drafter never saw (fewer drafts are
        kept, never a wrong token)."""
        self.origin = self.positions = start

    @property
    def offset(self) -> int:
        """Positions covered (the target cache length it must follow)."""
        return self.positions

    @property
    def pending(self) -> bool:
        return self.kv.offset < self.positions - self.origin

    @property
    def nbytes(self) -> int:
        """Bytes held (mlx-lm's prompt cache sizes its entries by this)."""
        return self.kv.nbytes + sum(f.nbytes for f in self.fused) + (self.hidden.nbytes if self.hidden is not None else 0)

    def last_fused(self) -> mx.array:
        return self.fused[-1][:, -1:]

    def append(self, fused: mx.array) -> None:
        self.fused.append(fused)
        self.positions += fused.shape[1]
        self.hidden = None

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Forget the last n positions; the new last row waits for its token again."""
        n = min(max(int(n), 0), self.positions - self.origin)
        if n == 0:
            return 0
        self.positions -= n
        drop = n
        while drop:
            chunk = self.fused[-1]
            if chunk.shape[1] <= drop:
                drop -= chunk.shape[1]
                self.fused.pop()
            else:
                self.fused[-1] = chunk[:, : chunk.shape[1] - drop]
                drop = 0
        self.kv.trim(self.kv.offset - max(self.positions - self.origin - 1, 0))
        self.hidden = None
        return n

    @property
    def state(self) -> list:
        keys, values = (self.kv.keys, self.kv.values) if self.kv.keys is not None else (None, None)
        return [x for x in (keys, values, self.hidden, *self.fused) if x is not None]


class Eagle3Drafter(nn.Module):
    """DeepSpec's EAGLE3 drafter.  All methods are lazy (nothing is evaluated)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        H, V = args.hidden_size, args.vocab_size
        self.embed_tokens = nn.Embedding(V, H)
        self.fc = nn.Linear(len(args.target_layer_ids) * H, H, bias=False)
        self.layers = [DecoderLayer(args)]
        self.norm = nn.RMSNorm(H, eps=args.rms_norm_eps)
        V_draft = args.draft_vocab_size or V
        self.lm_head = nn.Linear(H, V_draft, bias=False)
        self.vocab = DraftVocabulary(V_draft, V) if V_draft != V else None
        self._block_size = args.ttt_length
        self.confidence_threshold = None  # EAGLE3 has no confidence head
        self.sequential_drafts = True  # one forward per draft: the cost model times it per draft

    # Run-time policy -------------------------------------------------------

    @property
    def block_size(self) -> int:
        """Drafts per proposal (<= ttt_length)."""
        return self._block_size

    @block_size.setter
    def block_size(self, value: int):
        if not 1 <= int(value) <= self.args.ttt_length:
            raise ValueError(
                f"block_size must be between 1 and the drafter's ttt_length ({self.args.ttt_length}), got {value}."
            )
        self._block_size = int(value)

    @property
    def max_drafts(self) -> int:
        return self._block_size

    @property
    def target_layer_ids(self) -> List[int]:
        return list(self.args.target_layer_ids)

    # Network pieces --------------------------------------------------------

    def embed(self, ids: mx.array) -> mx.array:
        e = self.embed_tokens(ids)
        if self.args.family == "gemma4":
            e = e * mx.array(math.sqrt(self.args.hidden_size), dtype=e.dtype)
        return e

    def logits(self, hidden: mx.array) -> mx.array:
        """Logits of drafter outputs (final norm, LM head, Gemma-4's softcap)."""
        logits = self.lm_head(self.norm(hidden))
        cap = self.args.final_logit_softcapping
        if self.args.family == "gemma4" and cap:
            logits = mx.tanh(logits / cap) * cap
        return logits if self.vocab is None else self.vocab.expand(logits)

    def sanitize(self, weights: dict) -> dict:
        """Checkpoint names -> module names (a reduced vocabulary's d2t/t2d)."""
        if self.vocab is None:
            return {k: v for k, v in weights.items() if k not in ("d2t", "t2d")}
        return sanitize(weights)

    def fuse(self, features: mx.array) -> mx.array:
        """Tapped target features [1, L, taps*H] -> the drafter's hidden [1, L, H]."""
        # In the drafter's dtype (norms are never quantized), so fp32 taps
        # don't promote the drafter's state.
        return self.fc(features.astype(self.norm.weight.dtype))

    def forward(self, hidden: mx.array, tokens: mx.array, kv: KVCache, start: int) -> mx.array:
        """Outputs of rows (hidden [1, L, H], tokens [1, L]) at positions
        start…, appending their K/V to ``kv`` (causal among the rows)."""
        return self.layers[0](hidden, self.embed(tokens), kv, start)

    def ttt_forward(self, features: mx.array, step_ids: mx.array) -> List[mx.array]:
        """DeepSpec's training forward: ``len(step_ids)`` drafting steps
        unrolled over every row at once (test-time training).

        features [B, S, taps*H] are the target's tapped features of positions
        0…S-1; step_ids [K, B, S] the token each row reads at step k (the
        token at i+1+k).  Step 0 is the causal prefill; at step k row i sees
        the step-0 rows j <= i and its own rows of steps 1…k, at RoPE
        position i+k, and carries its step k-1 output as hidden.  Returns the
        K step outputs [B, S, H] (rows i >= S-k of step k have no training
        target: they are computed but meaningless).
        """
        layer, attn = self.layers[0], self.layers[0].self_attn
        S = features.shape[1]
        pos = mx.arange(S)
        causal, own = pos[:, None] >= pos[None], pos[:, None] == pos[None]
        h, keys, values, outputs = self.fuse(features), [], [], []
        for k in range(step_ids.shape[0]):
            def attend(x, k=k):
                key, value = attn.keys_values(x, k)
                keys.append(key)
                values.append(value)
                mask = mx.concatenate([causal] + [own] * k, axis=1)
                return attn.attend(attn.queries(x, k), mx.concatenate(keys, axis=2),
                                   mx.concatenate(values, axis=2), mask)

            h = layer.around(h, self.embed(step_ids[k]), attend)
            outputs.append(h)
        return outputs

    # Round-loop protocol ---------------------------------------------------

    def make_cache(self) -> list:
        return [Eagle3Cache()]

    def add_context(self, cache: list, features: mx.array, start: int, tokens: Optional[mx.array] = None) -> None:
        """Commit positions start… with their target features and ``tokens``,
        the tokens the target read at those positions.  Each position's row
        pairs its feature with the token after it, so ``tokens[0]`` completes
        the previous position's row and the last row waits for the next one."""
        if isinstance(start, mx.array):  # a batch's rows (``batch_entries``)
            return self._add_context_rows(cache, features, start, tokens)
        state = cache[0]
        if tokens is None:
            raise ValueError(
                "An EAGLE3 drafter needs the committed tokens with the target features: "
                "call add_context(cache, features, start, tokens)."
            )
        tokens = tokens.reshape(-1).astype(mx.uint32)
        L = features.shape[1]
        if tokens.size != L:
            raise ValueError(f"add_context got {L} feature rows but {tokens.size} tokens.")
        if state.positions == 0 and start > 0:
            state.start_at(start)
        if start != state.offset:
            raise ValueError(f"add_context at position {start}, but the drafter holds {state.offset} positions.")
        fused = self.fuse(features)
        if state.pending:
            rows, row_tokens, row_start = mx.concatenate([state.last_fused(), fused[:, :-1]], axis=1), tokens, start - 1
        else:
            rows, row_tokens, row_start = fused[:, :-1], tokens[1:], start
        if rows.shape[1]:
            # One layer: a context row only contributes its K/V; outputs are
            # needed for the last row alone, computed when it is completed.
            attn = self.layers[0].self_attn
            x = self.layers[0].attention_input(rows, self.embed(row_tokens[None]))
            state.kv.update_and_fetch(*attn.keys_values(x, row_start))
        state.append(fused)

    def draft(self, cache: list, anchor: mx.array, start: int, num_drafts: Optional[int] = None,
              choose=None, final_forward: bool = False) -> dict:
        """Everything one proposal computes (lazily).

        Completes the pending context row with ``anchor`` (the token at
        ``start``), then drafts ``num_drafts`` tokens: draft j+1 comes from the
        logits of h_j, and forward j (at position start+j) turns (h_j, d_{j+1})
        into h_{j+1}.  The forward after the last draft is skipped unless
        ``final_forward``.  Returns ``hidden`` [1, n(+1), H] (h_0…), ``logits``
        [n, V], ``tokens`` [n] uint32, ``q_logprobs`` (the rows ``choose(k,
        logits_row) -> (token, q_row)`` returned, or None for argmax drafts) and
        ``keys``/``values``, the K/V the last forward attended over.  The
        drafted rows are dropped from the cache before returning.
        """
        num_drafts = self.max_drafts if num_drafts is None else num_drafts
        if not 0 <= num_drafts <= self.max_drafts:
            raise ValueError(f"num_drafts must be between 0 and {self.max_drafts}, got {num_drafts}.")
        state = cache[0]
        if start != state.offset or start == 0:
            raise ValueError(
                f"propose at position {start}, but the drafter holds {state.offset} committed positions "
                "(it must hold every position before the anchor, at least one)."
            )
        anchor = anchor.reshape(1, 1).astype(mx.uint32)
        kv = state.kv
        keys = values = None
        if state.pending:
            state.hidden = self.forward(state.last_fused(), anchor, kv, start - 1)
        h = state.hidden
        hidden, rows, chosen, q_rows = [h], [], [], []
        forwards = num_drafts if final_forward else max(num_drafts - 1, 0)
        for j in range(num_drafts):
            row = self.logits(h[0])
            if choose is None:
                token = mx.argmax(row, axis=-1).astype(mx.uint32)
            else:
                token, q_row = choose(j, row)
                q_rows.append(q_row)
            token = token.reshape(1).astype(mx.uint32)
            rows.append(row)
            chosen.append(token)
            if j < forwards:
                h = self.forward(h, token[None], kv, start + j)
                hidden.append(h)
        if forwards:
            keys, values = kv.keys[..., : kv.offset, :], kv.values[..., : kv.offset, :]
            kv.trim(forwards)
        return {
            "hidden": mx.concatenate(hidden, axis=1),
            "logits": mx.concatenate(rows) if rows else mx.zeros((0, self.args.vocab_size), h.dtype),
            "tokens": mx.concatenate(chosen) if chosen else mx.zeros((0,), mx.uint32),
            "q_logprobs": mx.concatenate(q_rows) if q_rows else None,
            "keys": keys,
            "values": values,
        }

    # Batched rounds ----------------------------------------------------------
    # A batch holds its rows' contexts as two left-padded ``BatchKVCache``s,
    # rolled back, filtered and extended like the target's: the K/V of the
    # completed rows, and the fused feature of every position (as keys, with
    # zero-width values), whose newest column is each row's pending row.

    def batch_entries(self, cache: list) -> list:
        """One sequence's context as the two plain caches a batch merges: its
        completed K/V rows and its fused features [1, 1, L, H]."""
        state = cache[0]
        if not state.pending or not state.fused:
            raise ValueError("a batch row's EAGLE3 context must hold a position waiting for its next token.")
        fused = mx.concatenate(state.fused, axis=1)[:, None]
        rows = KVCache()
        rows.keys, rows.values = fused, mx.zeros((*fused.shape[:3], 0), fused.dtype)
        rows.offset = fused.shape[2]
        kv = KVCache()
        if state.kv.keys is not None:
            kv.keys, kv.values, kv.offset = state.kv.keys, state.kv.values, state.kv.offset
        return [kv, rows]

    def from_batch_entries(self, entries: list, positions: int) -> list:
        """A sequence's context from what ``batch_entries`` gave for it (each
        cut to ``positions``): the cache ``add_context`` would have built."""
        kv, rows = entries
        state = Eagle3Cache()
        held = rows.offset
        state.start_at(positions - held)
        state.append(rows.keys[:, 0, :held])
        if kv.offset:
            state.kv.update_and_fetch(kv.keys[..., : kv.offset, :], kv.values[..., : kv.offset, :])
        return [state]

    def _forward_rows(self, hidden: mx.array, tokens: mx.array, kv: BatchKVCache, starts: mx.array) -> mx.array:
        """``forward`` for one row per sequence (hidden [B, 1, H], tokens
        [B, 1]) at positions ``starts`` [B], over left-padded contexts."""
        layer = self.layers[0]
        attn = layer.self_attn

        def attend(x):
            mask = kv.make_mask(1)  # a row sees its own entries only
            keys, values = kv.update_and_fetch(*attn.keys_values(x, starts))
            return attn.attend(attn.queries(x, starts), keys, values, mask)

        return layer.around(hidden, self.embed(tokens), attend)

    def propose_rows(self, cache: list, anchors: mx.array, starts: mx.array, num_drafts: int, chooses=None):
        """``propose`` for several sequences, one forward per draft for all:
        ``cache`` their contexts as a batch holds them (``batch_entries``),
        ``anchors`` and ``starts`` [B].  Returns drafts [B, num_drafts], None
        (no confidence head) and, when ``chooses`` (one ``choose`` or None per
        row) samples some rows, their q rows [B, num_drafts, V] (a greedy
        row's are a point mass on its draft).  The contexts are left as they
        were: ``add_context`` completes the pending rows."""
        kv, rows = cache
        B = anchors.shape[0]
        chooses = chooses if chooses is not None and any(c is not None for c in chooses) else None
        last = rows.keys[:, 0, rows._idx - 1 : rows._idx]
        h = self._forward_rows(last, anchors.reshape(B, 1).astype(mx.uint32), kv, starts - 1)
        forwards, chosen, q_rows = 1, [], []
        for j in range(num_drafts):
            row = self.logits(h[:, 0])
            token, q_row = choose_rows(j, row, chooses)
            if q_row is not None:
                q_rows.append(q_row)
            chosen.append(token)
            if j < num_drafts - 1:
                h = self._forward_rows(h, token[:, None], kv, starts + j)
                forwards += 1
        kv.trim(forwards)
        drafts = mx.stack(chosen, axis=1) if chosen else mx.zeros((B, 0), mx.uint32)
        return drafts, None, mx.stack(q_rows, axis=1) if q_rows else None

    def _add_context_rows(self, cache: list, features: mx.array, starts: mx.array, tokens: mx.array) -> None:
        """``add_context`` of a block [B, W] per sequence at ``starts`` [B]:
        each row's pending row is completed by the block's first token."""
        kv, rows = cache
        fused = self.fuse(features)
        last = rows.keys[:, 0, rows._idx - 1 : rows._idx]
        attn = self.layers[0].self_attn
        x = self.layers[0].attention_input(mx.concatenate([last, fused[:, :-1]], axis=1),
                                           self.embed(tokens.astype(mx.uint32)))
        kv.update_and_fetch(*attn.keys_values(x, starts - 1))
        rows.update_and_fetch(fused[:, None], mx.zeros((*fused.shape[:2], 0), fused.dtype)[:, None])

    def propose(self, cache: list, anchor: mx.array, start: int, num_drafts: int, choose=None):
        """(drafts [n] uint32, None: no confidence head, the q rows ``choose``
        sampled from or None), for the positions after ``anchor`` at ``start``."""
        out = self.draft(cache, anchor, start, num_drafts, choose)
        return out["tokens"], None, out["q_logprobs"]
