"""Train a DSpark, DFlash or EAGLE3 drafter for an mlx-lm target (Qwen3, Gemma-4).

The target is frozen and run on each training sequence to get its tapped
hidden states (the drafter's context) and its own next-token distributions.

DSpark / DFlash (DeepSpec's block recipe): random anchors are drawn per
sequence and every block ``[x_a, MASK, …]`` is trained in one forward pass
with a mask that lets it see the context before its anchor and its own block
only, which is exactly what one inference round sees.  The loss mixes
cross-entropy on the data with the L1 distance to the target's distribution
(what acceptance depends on), plus a BCE for the confidence head.

EAGLE3 (DeepSpec's training-time test): ``block_size`` drafting steps are
unrolled over every position at once, each step reading the previous step's
output as its hidden state and the true next token, and step k is trained
toward the target's distribution with weight ``step_loss_decay**k``.

Either way the result is written in DeepSpec's released layout, so
``load_drafter`` (and mlx-lm's ``--draft-model``) load it.

    python -m mlx_lm_dspark.train --model Qwen/Qwen3-4B --data chats.jsonl --output my-drafter
    python -m mlx_lm_dspark.train --algorithm eagle3 --model Qwen/Qwen3-4B --data chats.jsonl --output my-eagle3
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.models.base import scaled_dot_product_attention

from .config import drafter_args, is_eagle3_config
from .drafter import Drafter, ModelArgs
from .eagle3 import Eagle3Drafter, eagle3_args
from .eagle3 import ModelArgs as Eagle3Args
from .target import DrafterMismatchError, TargetAdapter, family_of, text_args, untappable, validate_pair

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class TrainingError(ValueError):
    """A problem with the user's input (data, options, target); the CLI
    reports it without a traceback."""


ALGORITHMS = ("dspark", "dflash", "eagle3")


@dataclass
class TrainingArgs:
    algorithm: str = "dspark"  # "dflash" is dspark without the Markov / confidence heads
    markov_rank: int = 256  # 0 trains a DFlash drafter (no Markov / confidence head)
    block_size: int = 7  # EAGLE3: ttt_length, the drafts per round and the unrolled training steps
    num_layers: Optional[int] = None  # None: 5 (DSpark/DFlash), 1 (EAGLE3 has exactly one)
    target_layer_ids: Optional[List[int]] = None  # None: spread over the target like the released drafters
    mask_token_id: Optional[int] = None  # None: see pick_mask_token_id
    iters: int = 1000  # optimizer steps
    batch_size: int = 4  # sequences per micro-batch
    grad_accumulation: int = 1
    learning_rate: float = 6e-4
    warmup_steps: Optional[int] = None  # None: 5% of iters (EAGLE3: 4%, as DeepSpec)
    min_learning_rate: float = 0.0
    weight_decay: Optional[float] = None  # None: 0.01 (EAGLE3: 0, as DeepSpec)
    grad_clip: float = 1.0
    seq_length: int = 2048  # longer sequences are split into chunks of this length
    anchors_per_seq: int = 16
    loss_decay: float = 4.0  # slot weight exp(-k / loss_decay), k = 0 for the first draft
    step_loss_decay: float = 0.8  # EAGLE3: weight of unrolled step k is step_loss_decay**k
    ce_weight: float = 0.1
    l1_weight: float = 0.9
    confidence_weight: float = 1.0
    save_every: int = 100
    eval_every: int = 100  # 0 turns held-out evaluation off
    eval_sequences: int = 16  # held out of the data (at most a tenth of it)
    eval_tokens: int = 32  # tokens generated per held-out prompt for τ
    seed: int = 0
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise TrainingError(f"--algorithm {self.algorithm!r}: choose one of {', '.join(ALGORITHMS)}.")
        if self.algorithm == "dflash":
            self.markov_rank = 0
        if self.num_layers is None:
            self.num_layers = 1 if self.eagle3 else 5
        if self.weight_decay is None:
            self.weight_decay = 0.0 if self.eagle3 else 0.01

    @property
    def eagle3(self) -> bool:
        return self.algorithm == "eagle3"

    @classmethod
    def from_dict(cls, params: dict) -> "TrainingArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise TrainingError(f"Unknown training options {unknown}; valid options: {sorted(names)}.")
        return cls(**params)

    def check(self) -> None:
        """Refuse settings that cannot train, naming the option."""
        positive = ("block_size", "num_layers", "iters", "batch_size", "grad_accumulation", "seq_length",
                    "anchors_per_seq", "loss_decay")
        for name in positive:
            if not getattr(self, name) > 0:
                raise TrainingError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}.")
        for name in ("markov_rank", "save_every", "eval_every", "eval_sequences", "eval_tokens"):
            if getattr(self, name) < 0:
                raise TrainingError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}.")
        if not self.learning_rate > 0:
            raise TrainingError(f"--learning-rate must be positive, got {self.learning_rate}.")
        if self.seq_length < 3:
            raise TrainingError("--seq-length must be at least 3 (context, anchor, one target).")
        if self.eagle3 and self.num_layers != 1:
            raise TrainingError(f"--num-layers {self.num_layers}: an EAGLE3 drafter has exactly one layer.")
        if not 0 < self.step_loss_decay <= 1:
            raise TrainingError(f"--step-loss-decay must be in (0, 1], got {self.step_loss_decay}.")


# ---------------------------------------------------------------- target


def default_layer_ids(num_target_layers: int, n: int = 5) -> List[int]:
    """Taps spread from layer 1 to layer L-3, as the released Qwen3 drafters
    ([1, 9, 17, 25, 33] of 36, [1, 10, 19, 28, 37] of 40)."""
    last = max(1, num_target_layers - 3)
    n = min(n, last)
    ids = sorted({int(round(1 + i * (last - 1) / max(1, n - 1))) for i in range(n)})
    return [min(i, num_target_layers - 1) for i in ids]


def _float_matrix(module) -> mx.array:
    """A float32 copy of an Embedding/Linear weight, dequantized if packed."""
    w = module.weight
    if hasattr(module, "scales"):
        w = mx.dequantize(w, module.scales, getattr(module, "biases", None), group_size=module.group_size,
                          bits=module.bits, mode=getattr(module, "mode", "affine"))
    return w.astype(mx.float32)


def target_embeddings(model):
    """(embedding matrix, LM-head matrix) of an mlx-lm target, float32."""
    inner = getattr(model, "language_model", model)
    body = getattr(inner, "model", None) or getattr(inner, "backbone", None)  # Nemotron-H: backbone
    embed = getattr(body, "embed_tokens", None) or getattr(body, "embeddings", None)
    if embed is None:
        raise TypeError(f"{type(model).__name__} has no model.embed_tokens; cannot copy the target's embeddings.")
    E = _float_matrix(embed)
    head = getattr(inner, "lm_head", None)
    return E, (_float_matrix(head) if head is not None else E)


def target_family(model) -> str:
    problem = untappable(model)
    if problem is not None:
        raise TrainingError(
            f"Cannot train a drafter for {type(model).__name__}: {problem}; drafters read the hidden "
            "states of a decoder's `model.layers`."
        )
    return family_of(model)


def _json_ready(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


def drafter_config(target_config: dict, family: str, num_target_layers: int, args: TrainingArgs,
                   mask_token_id: Optional[int]) -> dict:
    """DeepSpec's config.json: the target's text config plus the drafter
    fields (of the block drafters, or of EAGLE3 with ``args.eagle3``)."""
    text = target_config.get("text_config", target_config)
    if not isinstance(text, dict):
        text = vars(text)
    config = {k: v for k, v in _json_ready(text).items() if k not in ("quantization", "quantization_config")}
    if "vocab_size" not in config and "vocab_size" in target_config:
        config["vocab_size"] = target_config["vocab_size"]
    layer_ids = list(args.target_layer_ids or default_layer_ids(num_target_layers))
    bad = [i for i in layer_ids if not -1 <= i < num_target_layers]
    if bad:
        raise TrainingError(f"--target-layer-ids {layer_ids}: {bad} out of range for a {num_target_layers}-layer target.")
    config.update({
        "model_type": "qwen3" if family == "qwen3" else "gemma4_text",
        "num_hidden_layers": args.num_layers,
        "layer_types": ["full_attention"] * args.num_layers,
        "tie_word_embeddings": False,
        "num_target_layers": num_target_layers,
        "target_layer_ids": layer_ids,
    })
    if family == "qwen3":
        # Hybrid targets (LFM2, Nemotron-H) name their norm epsilon and MLP width otherwise.
        config.setdefault("rms_norm_eps", text.get("norm_eps") or text.get("layer_norm_epsilon") or 1e-6)
        if config.get("intermediate_size") is None and text.get("block_ff_dim") is not None:
            config["intermediate_size"] = text["block_ff_dim"]
    if family == "gemma4":
        config["num_kv_shared_layers"] = 0
        config["target_model_type"] = target_config.get("model_type")
    if args.eagle3:
        config.update({
            "architectures": ["Qwen3Eagle3Model" if family == "qwen3" else "Gemma4Eagle3Model"],
            "draft_num_hidden_layers": args.num_layers,
            "ttt_length": args.block_size,
            "step_loss_decay": args.step_loss_decay,
        })
        if family == "gemma4":  # DeepSpec's EAGLE3 layer has neither
            config.update({"enable_moe_block": False, "hidden_size_per_layer_input": 0,
                           "target_text_model_type": "gemma4_text"})
        return dict(sorted(config.items()))
    config.update({
        "architectures": ["Qwen3DSparkModel" if family == "qwen3" else "Gemma4DSparkModel"],
        "block_size": args.block_size,
        "mask_token_id": int(mask_token_id),
        "markov_rank": args.markov_rank,
        "enable_confidence_head": args.markov_rank > 0,
    })
    if args.markov_rank > 0:
        config.update({"markov_head_type": "vanilla", "confidence_head_with_markov": True})
    return dict(sorted(config.items()))


def new_drafter(config: dict, source=None):
    """An untrained drafter of the kind ``config`` describes."""
    if is_eagle3_config(config):
        drafter = Eagle3Drafter(Eagle3Args.from_dict(eagle3_args(config)))
        drafter.kind = "eagle3"
    else:
        drafter = Drafter(ModelArgs.from_dict(drafter_args(config, source=source)))
        drafter.kind = "dspark" if drafter.args.markov_rank > 0 else "dflash"
    return drafter


def build_drafter(config: dict, model, seed: int):
    """A fresh drafter with the target's (frozen) embeddings and LM head."""
    mx.random.seed(seed)
    drafter = new_drafter(config)
    E, W = target_embeddings(model)
    if E.shape != drafter.embed_tokens.weight.shape:
        raise ValueError(f"Target embedding {E.shape} does not match the drafter's {drafter.embed_tokens.weight.shape}.")
    drafter.embed_tokens.weight = E
    drafter.lm_head.weight = W
    if getattr(drafter.args, "markov_rank", 0) > 0:
        # Start with no correction, so the Markov head only adds what it learns.
        drafter.markov_head.markov_w2.weight = mx.zeros_like(drafter.markov_head.markov_w2.weight)
    freeze_embeddings(drafter)
    mx.eval(drafter.parameters())
    return drafter


def freeze_embeddings(drafter) -> None:
    """Embeddings and LM head are the target's: never trained (nor is the
    Gemma-4 EAGLE3 layer's ``layer_scalar``, a buffer in DeepSpec's model)."""
    drafter.embed_tokens.freeze()
    drafter.lm_head.freeze()
    if isinstance(drafter, Eagle3Drafter) and drafter.args.family == "gemma4":
        drafter.layers[0].freeze(recurse=False, keys=["layer_scalar"])


# ---------------------------------------------------------------- training forward


def _block_attention(attn, x, ctx_keys, ctx_values, offsets, mask):
    """One layer's attention for many blocks at once.

    x [N, A*B, H] are the normed block rows of N sequences with A blocks each;
    blocks are laid out as a batch of N*A for RoPE (one offset per block) and
    regrouped per sequence for attention over [context ; all blocks] under
    ``mask``, so the context K/V are computed once per sequence."""
    N, AB, _ = x.shape
    A = offsets.size // N
    B = AB // A
    hd = attn.head_dim
    xb = x.reshape(N * A, B, -1)
    q = attn.q_proj(xb).reshape(N * A, B, attn.n_heads, hd)
    q = attn.rope(attn.q_norm(q).transpose(0, 2, 1, 3), offset=offsets)
    k, v = attn.keys_values(xb, offsets)

    def per_sequence(t):  # [N*A, heads, B, hd] -> [N, heads, A*B, hd]
        heads = t.shape[1]
        return t.reshape(N, A, heads, B, hd).transpose(0, 2, 1, 3, 4).reshape(N, heads, AB, hd)

    keys = mx.concatenate([ctx_keys, per_sequence(k)], axis=2)
    values = mx.concatenate([ctx_values, per_sequence(v)], axis=2)
    out = scaled_dot_product_attention(per_sequence(q), keys, values, cache=None, scale=attn.scale, mask=mask)
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(N, AB, -1))


def block_mask(anchors: mx.array, context_len: int, block_size: int) -> mx.array:
    """[N, 1, A*B, L+A*B] boolean: a block at anchor a sees context positions
    < a (what the drafter cache holds when round a drafts) and its own block
    (bidirectionally), nothing of the other blocks."""
    N, A = anchors.shape
    B = block_size
    q_block = mx.repeat(mx.arange(A), B)  # block of each query row
    ctx = mx.arange(context_len)[None, None, :] < mx.repeat(anchors, B, axis=1)[:, :, None]  # [N, AB, L]
    own = (q_block[:, None] == q_block[None, :])[None]  # [1, AB, AB]
    own = mx.broadcast_to(own, (N, A * B, A * B))
    return mx.concatenate([ctx, own], axis=-1)[:, None]


def _layer_mask(mask, attention, anchors, context_len, block_size):
    """Restrict ``mask`` to the keys ``attention`` sees (its window, its
    causality inside the block: ``Attention.visible``)."""
    B = block_size
    q_pos = (mx.repeat(anchors, B, axis=1) + mx.tile(mx.arange(B), anchors.shape[1])[None])  # [N, AB]
    k_pos = mx.concatenate([mx.broadcast_to(mx.arange(context_len)[None], (anchors.shape[0], context_len)),
                            q_pos], axis=1)  # [N, L+AB]
    visible = attention.visible(q_pos[:, :, None], k_pos[:, None, :])
    return mask if visible is None else mx.logical_and(mask, visible[:, None])


def block_forward(drafter: Drafter, features: mx.array, tokens: mx.array, anchors: mx.array) -> dict:
    """What inference computes for blocks anchored at ``anchors``, all at once.

    features [N, L, n_taps*H] are the target's tapped states for tokens
    [N, L]; anchors [N, A] index the anchor tokens (>= 1).  Returns
    ``hidden`` (final-normed) and ``base_logits`` as [N, A, B, ...], and the
    Markov-corrected ``corrected_logits`` and pre-sigmoid
    ``confidence_logits`` teacher-forced on the true tokens: slot k is
    corrected by x_{a+k}, the token inference would have drafted before it
    if every earlier draft was right (``Drafter.heads``, the heads inference
    applies).  Every block row is a draft slot: trained drafters use no
    shifted alignment.
    """
    a = drafter.args
    B = a.block_size
    N, L = tokens.shape
    A = anchors.shape[1]
    c = drafter.hidden_norm(drafter.fc(features.astype(drafter.hidden_norm.weight.dtype)))
    ctx = [layer.self_attn.keys_values(c, 0) for layer in drafter.layers]

    anchor_ids = mx.take_along_axis(tokens, anchors, axis=1)  # [N, A]
    ids = mx.concatenate([anchor_ids[..., None], mx.full((N, A, B - 1), a.mask_token_id, tokens.dtype)], axis=-1)
    offsets = anchors.reshape(-1)
    mask = block_mask(anchors, L, B)
    h = drafter.embed(ids.reshape(N, A * B))
    for layer, layer_ctx in zip(drafter.layers, ctx):
        m = _layer_mask(mask, layer.self_attn, anchors, L, B)
        h = layer.around(h, lambda x: _block_attention(layer.self_attn, x, *layer_ctx, offsets, m))
    hidden = drafter.norm(h).reshape(N, A, B, -1)
    logits = drafter.base_logits(hidden)

    # Teacher forcing: slot k's previous token is x_{a+k} (the anchor for k = 0).
    positions = mx.minimum(anchors[..., None] + mx.arange(B), L - 1)  # [N, A, B]
    prev = mx.take_along_axis(tokens, positions.reshape(N, -1), axis=1).reshape(N, A, B)
    corrected, conf = drafter.heads(logits, hidden, prev)
    return {"hidden": hidden, "base_logits": logits, "corrected_logits": corrected, "confidence_logits": conf}


def slot_weights(block_size: int, decay: float) -> mx.array:
    """exp(-k/decay) for the k-th draft of a block (k = 0 predicts x_{a+1}):
    later drafts only count if every earlier one was accepted."""
    return mx.exp(-mx.arange(block_size, dtype=mx.float32) / decay)


def loss_fn(drafter: Drafter, features, tokens, target_logits, anchors, valid, args: TrainingArgs):
    """DSpark's loss; returns (loss, number of supervised slots).

    ``valid`` [N, A, B] marks slots whose target x_{a+k+1} exists."""
    out = block_forward(drafter, features, tokens, anchors)
    N, A, B = valid.shape
    L = tokens.shape[1]
    pos = anchors[..., None] + mx.arange(B)  # position a+k whose next token slot k predicts
    pos_c = mx.minimum(pos, L - 1).reshape(N, -1)
    labels = mx.take_along_axis(tokens, mx.minimum(pos_c + 1, L - 1), axis=1).reshape(N, A, B)
    t_logits = mx.take_along_axis(target_logits, pos_c[..., None], axis=1).reshape(N, A, B, -1)
    p_target = mx.softmax(t_logits.astype(mx.float32), axis=-1)

    logits = out["corrected_logits"].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    ce = -mx.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    l1 = mx.abs(mx.exp(logp) - p_target).sum(axis=-1)
    w = valid.astype(mx.float32) * slot_weights(B, args.loss_decay)
    total = w.sum()
    loss = ((args.ce_weight * ce + args.l1_weight * l1) * w).sum() / mx.maximum(total, 1e-6)
    conf = out["confidence_logits"]
    if conf is not None and args.confidence_weight:
        # Target: the chance a p/q-sampled draft is accepted, 1 - TV(p_draft, p_target).
        goal = mx.stop_gradient(mx.clip(1 - 0.5 * l1, 0.0, 1.0))
        c = conf.astype(mx.float32)
        bce = mx.logaddexp(0.0, c) - goal * c
        m = valid.astype(mx.float32)
        loss = loss + args.confidence_weight * (bce * m).sum() / mx.maximum(m.sum(), 1.0)
    return loss, valid.sum()


def ttt_inputs(tokens: mx.array, steps: int) -> mx.array:
    """[steps, N, L] token inputs of EAGLE3's unrolled steps: row i of step k
    reads the token at i+1+k (0 past the end)."""
    N, L = tokens.shape
    padded = mx.concatenate([tokens, mx.zeros((N, steps), tokens.dtype)], axis=1)
    return mx.stack([padded[:, 1 + k : 1 + k + L] for k in range(steps)])


def eagle3_loss(drafter: Eagle3Drafter, features, tokens, target_logits, loss_mask, valid, decay: float):
    """DeepSpec's EAGLE3 loss; returns (loss, per-step losses [T]).

    Step k's row i is trained toward the target's distribution at position
    i+1+k (the token after the one it reads) by soft cross-entropy, over
    rows whose loss_mask is set and whose target exists (``valid`` [N, L]
    marks real tokens), summed and divided by N·L (masked rows counted, as
    DeepSpec's local mean); step k weighs ``decay**k``."""
    T = drafter.args.ttt_length
    N, L = tokens.shape
    outputs = drafter.ttt_forward(features, ttt_inputs(tokens, T))
    V = target_logits.shape[-1]
    p = mx.softmax(target_logits[:, 1:].astype(mx.float32), axis=-1)
    p = mx.concatenate([p, mx.full((N, T + 1, V), 1.0 / V)], axis=1)  # rows past the end: never weighed
    # Row j counts if its token's loss counts and the token after it is real.
    weight = loss_mask.astype(mx.float32) * mx.concatenate(
        [valid[:, 1:].astype(mx.float32), mx.zeros((N, 1))], axis=1)
    weight = mx.concatenate([weight, mx.zeros((N, T))], axis=1)
    losses = []
    for k, h in enumerate(outputs):
        logits = drafter.logits(h).astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        ce = -(p[:, k : k + L] * logp).sum(axis=-1)
        losses.append((weight[:, k : k + L] * ce).sum() / (N * L))
    losses = mx.stack(losses)
    return (losses * decay ** mx.arange(T, dtype=mx.float32)).sum(), losses


def batch_loss(drafter, features, target_logits, batch, args: TrainingArgs):
    """The algorithm's loss of one micro-batch (``micro_batch``'s tuple)."""
    if args.eagle3:
        tokens, valid = batch
        return eagle3_loss(drafter, features, tokens, target_logits, valid, valid, args.step_loss_decay)[0]
    tokens, anchors, valid = batch
    return loss_fn(drafter, features, tokens, target_logits, anchors, valid, args)[0]


# ---------------------------------------------------------------- data


def _messages(record: dict) -> Optional[list]:
    """Chat messages of a record in any of the usual shapes, or None."""
    turns = record.get("messages") or record.get("turns") or record.get("conversations")
    if turns is None:
        return None
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    messages = []
    for i, t in enumerate(turns):
        if isinstance(t, str):
            messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
        elif isinstance(t, dict):
            role = t.get("role") or roles.get(t.get("from"), t.get("from"))
            content = t.get("content", t.get("value"))
            if role is None or content is None:
                raise TrainingError(f"Chat turn {t!r} has no role/content (or from/value).")
            messages.append({"role": role, "content": content})
        else:
            raise TrainingError(f"Chat turn {t!r} is neither a string nor an object.")
    return messages


def render(record, tokenizer) -> List[int]:
    """Token ids of one data record: chats through the tokenizer's chat
    template (non-thinking), text plainly tokenized, ids passed through."""
    if isinstance(record, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in record):
        return [int(t) for t in record]
    if tokenizer is None:
        raise TrainingError("Data given as text or chats needs the target's tokenizer (pass tokenizer=...).")
    if isinstance(record, str):
        return list(tokenizer.encode(record))
    if not isinstance(record, dict):
        raise TrainingError(f"Unsupported data record {str(record)[:80]!r}: expected an object, text or token ids.")
    messages = _messages(record)
    if messages is not None:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                                 enable_thinking=False)
            return list(tokenizer.encode(text, add_special_tokens=False))
        warnings.warn("The tokenizer has no chat template: chat turns are joined as plain text.", stacklevel=2)
        return list(tokenizer.encode("\n\n".join(m["content"] for m in messages)))
    if "text" in record:
        return list(tokenizer.encode(record["text"]))
    raise TrainingError(
        f"Data record with keys {sorted(record)} has none of 'turns', 'messages', 'conversations' or 'text'."
    )


def read_records(path) -> list:
    """Records of a .jsonl file (one object per line) or a .txt file
    (documents separated by blank lines)."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(
            f"Data file {path} not found: pass --data a .jsonl file (one {{\"messages\"|\"turns\"|\"text\": ...}} "
            "object per line) or a plain .txt file."
        )
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".jsonl", ".json"):
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise TrainingError(f"{path}:{n} is not valid JSON ({e}); expected one object per line.") from e
        return records
    return [doc.strip() for doc in text.split("\n\n") if doc.strip()]


def tokenize_data(data, tokenizer, seq_length: int) -> List[List[int]]:
    """Token sequences of at most ``seq_length`` (longer ones are split)."""
    records = read_records(data) if isinstance(data, (str, Path)) else list(data)
    sequences = []
    for record in records:
        ids = render(record, tokenizer)
        for i in range(0, len(ids), seq_length):
            chunk = ids[i : i + seq_length]
            if len(chunk) >= 3:  # context, anchor, one target
                sequences.append(chunk)
    if not sequences:
        raise TrainingError(
            f"No training sequences in the data ({len(records)} records): every record is empty or shorter "
            "than 3 tokens. Give --data a file with text or chat turns."
        )
    return sequences


def fingerprint(sequences) -> str:
    h = hashlib.sha256()
    for s in sequences:
        h.update(np.asarray(s, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def split_data(sequences, args: TrainingArgs):
    """(train, held-out): a seeded shuffle, at most a tenth held out."""
    order = np.random.default_rng([args.seed, 7]).permutation(len(sequences))
    n_eval = min(args.eval_sequences, len(sequences) // 10) if args.eval_every else 0
    held = [sequences[i] for i in order[:n_eval]]
    train = [sequences[i] for i in order[n_eval:]]
    return train, held


def _sequence_of(train, g: int, seed: int):
    """The g-th training sample: epochs in seeded shuffled orders."""
    n = len(train)
    epoch, i = divmod(g, n)
    return train[int(np.random.default_rng([seed, 1, epoch]).permutation(n)[i])]


def micro_batch(train, index: int, args: TrainingArgs, pad_id: int):
    """The ``index``-th micro-batch; a pure function of (seed, index), so a
    resumed run sees exactly the data and anchors it would have seen.

    DSpark/DFlash: (tokens [N, L], anchors [N, A], valid slots [N, A, B]);
    EAGLE3: (tokens, real tokens [N, L]), every position trained."""
    rows, anchor_rows, valid_rows = [], [], []
    A, B = args.anchors_per_seq, args.block_size
    for j in range(args.batch_size):
        g = index * args.batch_size + j  # global sample number
        seq = _sequence_of(train, g, args.seed)
        rows.append(seq)
        if args.eagle3:
            continue
        rng = np.random.default_rng([args.seed, 2, g])
        candidates = np.arange(1, len(seq) - 1)  # anchor needs context before and a target after
        chosen = np.sort(rng.choice(candidates, size=min(A, candidates.size), replace=False))
        ok = np.zeros((A, B), dtype=bool)
        ok[: chosen.size] = (chosen[:, None] + np.arange(B) + 1) < len(seq)
        anchor_rows.append(np.pad(chosen, (0, A - chosen.size), constant_values=1))
        valid_rows.append(ok)
    L = max(len(s) for s in rows)
    tokens = np.full((len(rows), L), pad_id, dtype=np.int32)
    real = np.zeros((len(rows), L), dtype=bool)
    for r, s in enumerate(rows):
        tokens[r, : len(s)] = s
        real[r, : len(s)] = True
    if args.eagle3:
        return mx.array(tokens), mx.array(real)
    return mx.array(tokens), mx.array(np.stack(anchor_rows).astype(np.int32)), mx.array(np.stack(valid_rows))


# ---------------------------------------------------------------- evaluation


def evaluate(model, drafter: Drafter, held: Sequence[Sequence[int]], max_tokens: int = 32) -> dict:
    """Held-out τ through the real round loop: greedy speculative generation
    from the first half of each held-out sequence, full blocks."""
    from .session import last_stats
    from .speculative import speculative_generate_step

    accepted = rounds = 0
    for seq in held:
        prompt = mx.array(list(seq[: max(1, len(seq) // 2)]), dtype=mx.uint32)
        for _ in speculative_generate_step(prompt, model, drafter, num_draft_tokens=drafter.max_drafts,
                                           max_tokens=max_tokens):
            pass
        stats = last_stats(drafter)
        accepted += stats.accepted
        rounds += stats.rounds
    return {"tau": (accepted + rounds) / rounds if rounds else 0.0, "rounds": rounds}


def heldout_loss(model_target: TargetAdapter, drafter, held, args: TrainingArgs, pad_id: int) -> float:
    """Mean loss over the held-out sequences (fixed anchors)."""
    if not held:
        return float("nan")
    losses = []
    for start in range(0, len(held), args.batch_size):
        sequences = held[start : start + args.batch_size]
        batch = micro_batch(sequences, 0, dataclasses.replace(args, batch_size=len(sequences)), pad_id)
        logits, features = model_target(batch[0], None)
        losses.append(batch_loss(drafter, features, logits, batch, args).item())
    return float(np.mean(losses))


# ---------------------------------------------------------------- checkpoints


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(".tmp-" + path.name)  # same suffix: mx.save_safetensors insists on it
    write(tmp)
    os.replace(tmp, path)


def save_drafter(drafter: Drafter, config: dict, output: Path) -> None:
    """Weights and config.json in DeepSpec's released layout."""
    output.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(drafter.parameters()))
    _atomic_write(output / WEIGHTS_FILE,
                  lambda p: mx.save_safetensors(str(p), weights, metadata={"format": "mlx"}))
    _atomic_write(output / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2)))


def save_checkpoint(output: Path, drafter, config, optimizer, state: dict) -> None:
    """Everything a resumed run needs: weights, optimizer, step (data and
    anchors are pure functions of the seed and the step)."""
    save_drafter(drafter, config, output)
    opt_state = dict(tree_flatten(optimizer.state))
    _atomic_write(output / OPTIMIZER_FILE, lambda p: mx.save_safetensors(str(p), opt_state))
    # Written last: a checkpoint counts only once its state file names its step.
    _atomic_write(output / STATE_FILE, lambda p: p.write_text(json.dumps(state, indent=2)))


def load_checkpoint(output: Path) -> tuple:
    """(drafter, config, optimizer state, trainer state) of a checkpoint."""
    state_path = output / STATE_FILE
    if not state_path.is_file():
        raise TrainingError(
            f"--resume: no checkpoint in {output} (no {STATE_FILE}); run without --resume to start afresh."
        )
    try:
        state = json.loads(state_path.read_text())
        config = json.loads((output / CONFIG_FILE).read_text())
        drafter = new_drafter(config, source=output)
        drafter.load_weights(str(output / WEIGHTS_FILE), strict=True)
    except (OSError, ValueError) as e:  # a JSON or safetensors file that is missing, cut short or damaged
        if isinstance(e, TrainingError):
            raise
        raise TrainingError(
            f"--resume: the checkpoint in {output} is damaged ({type(e).__name__}: {e}); "
            "run without --resume to start afresh."
        ) from None
    freeze_embeddings(drafter)
    opt_state = tree_unflatten(list(mx.load(str(output / OPTIMIZER_FILE)).items()))
    mx.eval(drafter.parameters(), opt_state)
    return drafter, config, opt_state, state


# ---------------------------------------------------------------- training


def make_loss_and_grad(drafter, target: TargetAdapter, args: TrainingArgs):
    """(*micro_batch) -> (loss, grads of the trainable drafter weights).
    The frozen target runs inside, outside the gradient."""

    def loss(*batch):
        logits, features = target(batch[0], None)
        logits, features = mx.stop_gradient(logits), mx.stop_gradient(features)
        return batch_loss(drafter, features, logits, batch, args)

    return nn.value_and_grad(drafter, loss)


def lr_schedule(args: TrainingArgs):
    """Linear warm-up (its first step already moves) then cosine decay."""
    default_warmup = args.iters * 4 // 100 if args.eagle3 else args.iters // 20
    warmup = args.warmup_steps if args.warmup_steps is not None else default_warmup
    peak, low = args.learning_rate, args.min_learning_rate
    span = max(1, args.iters - warmup)

    def schedule(step):
        step = step.astype(mx.float32)
        progress = mx.clip((step - warmup) / span, 0.0, 1.0)
        cosine = low + (peak - low) * 0.5 * (1 + mx.cos(math.pi * progress))
        return mx.where(step < warmup, peak * (step + 1) / (warmup + 1), cosine)

    return schedule


def make_optimizer(args: TrainingArgs):
    return optim.AdamW(learning_rate=lr_schedule(args), weight_decay=args.weight_decay)


def pick_mask_token_id(tokenizer, vocab_size: int) -> int:
    """A mask id the data never contains: the tokenizer's own mask token
    (Gemma-4's ``<mask>`` = 4), else the first embedding row past the
    tokenizer's ids (Qwen3: 151669, as released), else the last id."""
    if tokenizer is not None:
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        unk = getattr(hf, "unk_token_id", None)
        for token in ("<mask>", "<|mask|>", "[MASK]"):
            try:
                i = hf.convert_tokens_to_ids(token)
            except Exception:
                continue
            if isinstance(i, int) and 0 <= i < vocab_size and i != unk:
                return i
        try:
            n = len(hf)
        except TypeError:
            n = vocab_size
        if n < vocab_size:
            return n
    return vocab_size - 1


def _load_target(target):
    """(model, tokenizer, config) from a path/repo or an already loaded model
    (or a (model, tokenizer) pair)."""
    if isinstance(target, (str, Path)):
        from mlx_lm.utils import load

        try:
            model, tokenizer, config = load(str(target), return_config=True)
        except Exception as e:  # a missing path, no network, an architecture mlx-lm lacks
            raise TrainingError(f"Cannot load the target {target} with mlx-lm: {e}") from e
        return model, tokenizer, config
    model, tokenizer = target if isinstance(target, tuple) else (target, None)
    return model, tokenizer, dict(text_args(model))


def train(target, data, args: TrainingArgs, output="dspark-drafter", tokenizer=None) -> Path:
    """Train a drafter for ``target`` on ``data`` and save it in ``output``.

    ``target`` is a model path / Hugging Face repo, or a loaded mlx-lm model
    (optionally as (model, tokenizer)); ``data`` a .jsonl/.txt path or a
    list of records (chat/text objects, strings or token-id lists).
    Returns the output directory, a drafter ``load_drafter`` loads.
    """
    args.check()
    output = Path(output)
    model, tok, target_config = _load_target(target)
    tokenizer = tokenizer or tok
    family = target_family(model)

    sequences = tokenize_data(data, tokenizer, args.seq_length)
    train_seqs, held = split_data(sequences, args)
    if not train_seqs:
        raise TrainingError("All data was held out for evaluation; give more data or --eval-every 0.")

    if args.resume:
        drafter, config, opt_state, state = load_checkpoint(output)
        if (drafter.kind == "eagle3") != args.eagle3:
            raise TrainingError(f"--resume: the checkpoint in {output} is a {drafter.kind} drafter, "
                                f"not {args.algorithm}; pass its --algorithm.")
        if state.get("data") != fingerprint(sequences):
            warnings.warn("--resume: the data differs from the checkpoint's; data order will not match.",
                          stacklevel=2)
    else:
        if (output / STATE_FILE).is_file():
            warnings.warn(f"{output} holds a checkpoint; starting afresh over it (use --resume to continue).",
                          stacklevel=2)
        n_layers = len(model.layers)
        vocab = target_config.get("text_config", target_config).get("vocab_size") or target_config.get("vocab_size")
        mask_id = args.mask_token_id if args.mask_token_id is not None else pick_mask_token_id(tokenizer, vocab)
        if not args.eagle3 and not 0 <= mask_id < vocab:
            raise TrainingError(f"--mask-token-id {mask_id} is outside the target vocabulary (0..{vocab - 1}).")
        config = drafter_config(target_config, family, n_layers, args, mask_id)
        drafter = build_drafter(config, model, args.seed)
        opt_state, state = None, {"step": 0, "history": [], "data": fingerprint(sequences)}

    try:
        target_adapter = TargetAdapter(model, drafter.target_layer_ids)
        validate_pair(drafter, target_adapter)
    except DrafterMismatchError as e:
        raise TrainingError(f"--resume: the checkpoint in {output} was trained for another target: {e}") from e
    pad_id = 0
    optimizer = make_optimizer(args)
    if opt_state is not None:
        optimizer.state = opt_state

    loss_and_grad = make_loss_and_grad(drafter, target_adapter, args)

    def record(entry):
        state["history"].append(entry)

    def run_eval(step):
        loss = heldout_loss(target_adapter, drafter, held, args, pad_id)
        tau = evaluate(model, drafter, held, args.eval_tokens)["tau"]
        record({"step": step, "val_loss": loss, "tau": tau})
        return loss, tau

    def checkpoint(step):
        state["step"] = step
        state["args"] = _json_ready(dataclasses.asdict(args))
        save_checkpoint(output, drafter, config, optimizer, state)

    start = state["step"]
    if held and args.eval_every and start == 0:
        run_eval(0)
    bar = None
    if args.progress:
        from tqdm import tqdm

        bar = tqdm(total=args.iters, initial=start, desc="train drafter", unit="step", dynamic_ncols=True)
    tokens_seen, t0, last_eval = 0, time.perf_counter(), {}
    for step in range(start, args.iters):
        grads, loss_sum = None, 0.0
        for m in range(args.grad_accumulation):
            batch = micro_batch(train_seqs, step * args.grad_accumulation + m, args, pad_id)
            loss, g = loss_and_grad(*batch)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(loss, grads)
            loss_sum += loss.item()
            tokens_seen += batch[0].size
        if args.grad_accumulation > 1:
            grads = tree_map(lambda x: x / args.grad_accumulation, grads)
        if args.grad_clip:
            grads, _ = optim.clip_grad_norm(grads, args.grad_clip)
        optimizer.update(drafter, grads)
        mx.eval(drafter.parameters(), optimizer.state)
        train_loss = loss_sum / args.grad_accumulation
        done = step + 1
        record({"step": done, "loss": train_loss})
        if held and args.eval_every and (done % args.eval_every == 0 or done == args.iters):
            val_loss, tau = run_eval(done)
            last_eval = {"val_loss": f"{val_loss:.3f}", "tau": f"{tau:.2f}"}
        postfix = {"loss": f"{train_loss:.3f}", **last_eval}
        if args.save_every and done % args.save_every == 0 and done < args.iters:
            checkpoint(done)
        if bar is not None:
            postfix["tok/s"] = f"{tokens_seen / (time.perf_counter() - t0):.0f}"
            bar.set_postfix(postfix)
            bar.update(1)
    if bar is not None:
        bar.close()
    checkpoint(args.iters)
    return output


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    d = TrainingArgs()
    p = argparse.ArgumentParser(prog="python -m mlx_lm_dspark.train",
                                description="Train a DSpark, DFlash or EAGLE3 drafter for an mlx-lm Qwen3 or Gemma-4 target.")
    p.add_argument("--model", required=True, help="Target model path or Hugging Face repo (frozen).")
    p.add_argument("--data", required=True,
                   help='JSONL ({"turns"|"messages": [...]} or {"text": ...} per line) or a plain .txt file.')
    p.add_argument("--output", default="dspark-drafter", help="Directory for the drafter and its checkpoints.")
    p.add_argument("--algorithm", choices=ALGORITHMS, default=d.algorithm,
                   help="dspark (block drafter with Markov and confidence heads), dflash (without them) or "
                        "eagle3 (sequential drafter, trained with unrolled steps).")
    p.add_argument("--markov-rank", type=int, default=d.markov_rank, help="Markov head rank; 0 trains DFlash.")
    p.add_argument("--block-size", type=int, default=d.block_size,
                   help="Drafts per round (EAGLE3: ttt_length, also the unrolled training steps).")
    p.add_argument("--num-layers", type=int, default=None, help="Drafter decoder layers (default 5; EAGLE3: 1).")
    p.add_argument("--target-layer-ids", type=int, nargs="+", default=None,
                   help="Target layers to tap (default: spread like the released drafters).")
    p.add_argument("--mask-token-id", type=int, default=None)
    p.add_argument("--iters", type=int, default=d.iters, help="Optimizer steps.")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--grad-accumulation", type=int, default=d.grad_accumulation)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--weight-decay", type=float, default=None, help="Default 0.01 (EAGLE3: 0).")
    p.add_argument("--step-loss-decay", type=float, default=d.step_loss_decay,
                   help="EAGLE3: weight of unrolled step k is this to the power k.")
    p.add_argument("--seq-length", type=int, default=d.seq_length)
    p.add_argument("--anchors-per-seq", type=int, default=d.anchors_per_seq)
    p.add_argument("--resume", action="store_true", help="Continue from the checkpoint in --output.")
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="Held-out τ every N steps (0: never).")
    p.add_argument("--eval-sequences", type=int, default=d.eval_sequences)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    return p


OPENBLAS_PATHS = ("/usr/lib/x86_64-linux-gnu/libopenblas.so.0", "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
                  "/usr/lib64/libopenblas.so.0")


def blas_hint() -> Optional[str]:
    """On Linux, mlx's CPU wheel bundles the reference BLAS, which makes
    float training far slower than with OpenBLAS.  A hint on how to preload
    OpenBLAS, or None when it does not apply."""
    if sys.platform != "linux" or "openblas" in os.environ.get("LD_PRELOAD", ""):
        return None
    libs = Path(mx.__file__).resolve().parents[1] / "mlx_cpu.libs"
    if not any(libs.glob("libblas*")):
        return None
    found = next((p for p in OPENBLAS_PATHS if os.path.exists(p)), None)
    how = (f"LD_PRELOAD={found} mlx_lm_dspark.train ..." if found
           else "install OpenBLAS (Debian/Ubuntu: apt install libopenblas0) and run with "
                "LD_PRELOAD=<path of libopenblas.so.0>")
    return ("note: mlx's Linux CPU wheel uses the reference BLAS, which makes training float matmuls "
            f"10-35x slower than OpenBLAS; for faster training: {how}")


def run(argv=None) -> Path:
    """The command line: parse ``argv``, train, return the output directory."""
    from .loader import user_errors

    p = build_parser()
    ns = p.parse_args(argv)
    options = {k: v for k, v in vars(ns).items() if k not in ("model", "data", "output", "quiet")}
    options["progress"] = not ns.quiet
    args = TrainingArgs.from_dict(options)
    hint = blas_hint()
    if hint:
        print(hint, file=sys.stderr)
    try:
        args.check()
        if not Path(ns.data).is_file():
            raise TrainingError(f"--data {ns.data}: no such file (give a .jsonl or .txt file).")
        out = train(ns.model, ns.data, args, output=ns.output)
    except (TrainingError, *user_errors()) as e:
        p.error(str(e))
    print(f"Saved drafter to {out}")
    return out


def main(argv=None) -> None:
    run(argv)  # a console script's main must not return a value (sys.exit would print it)


if __name__ == "__main__":
    main()
