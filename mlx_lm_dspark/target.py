"""The target model as a drafter sees it: tapped hidden states, validation and
KV-cache rollback.

Hidden states are captured by tapping the host's own layer objects: each
tapped layer's class is swapped for a subclass whose ``__call__`` runs the
original and records its output while a capture is active.  Parameter names,
weights and the host's layer loop are untouched, so a host model that changes
its internals keeps working as long as it still calls its layers.

Any mlx-lm decoder is a target when its ``layers`` can be tapped this way;
no list of model types decides it.  Tap ``i`` is the output of layer ``i``;
tap ``-1`` is the embedding output, i.e. the input of layer 0 (DeepSpec's
``-1``, which for Gemma-4 includes its embedding scale).
"""

import contextlib
import math
import threading
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import cache as cache_lib

from . import early, recurrent
from .config import family_of_model_type


class DrafterMismatchError(ValueError):
    """The drafter was trained for a different target."""


class UnsupportedCacheError(ValueError):
    """The target's cache cannot be rolled back after rejected drafts."""


class UnsupportedTargetError(TypeError):
    """The target model's layers cannot be tapped."""


EMBEDDING_TAP = -1  # the embedding output: the input of layer 0


_capture = threading.local()
_TAPPED_CLASSES = {}


def _tapped_class(cls):
    sub = _TAPPED_CLASSES.get(cls)
    if sub is None:

        def __call__(self, *args, **kwargs):
            sink = getattr(_capture, "sink", None)
            if sink is not None and ("input", id(self)) in sink:
                sink[("input", id(self))] = args[0] if args else next(iter(kwargs.values()))
            out = cls.__call__(self, *args, **kwargs)
            if sink is not None and id(self) in sink:
                sink[id(self)] = hidden = out[0] if isinstance(out, tuple) else out
                if getattr(_capture, "start_early", False):
                    early.start(hidden)
            return out

        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
        sub.__qualname__ = cls.__qualname__
        _TAPPED_CLASSES[cls] = sub
    return sub


def tap(layer) -> None:
    """Make ``layer`` report its output during a capture (idempotent)."""
    cls = type(layer)
    if cls in _TAPPED_CLASSES.values():
        return
    if not callable(getattr(cls, "__call__", None)):
        raise TypeError(f"Cannot tap {cls.__name__}: it is not callable.")
    layer.__class__ = _tapped_class(cls)


def _settings(module):
    # mlx-lm models keep their ModelArgs in `args`, mlx-vlm language models in `config`.
    if module is None:
        return None
    return getattr(module, "args", None) or getattr(module, "config", None)


def text_args(model) -> dict:
    """The text-model settings of an mlx-lm or mlx-vlm model (Gemma-4 nests them)."""
    args = _settings(getattr(model, "language_model", None)) or _settings(model)
    if args is not None and not isinstance(args, dict) and hasattr(args, "text_config"):
        args = args.text_config
    if args is None:
        raise TypeError(f"{type(model).__name__} has no `args`/`config`; not an mlx-lm or mlx-vlm model.")
    return vars(args) if not isinstance(args, dict) else args


def from_mlx_vlm(model) -> bool:
    return type(model).__module__.startswith("mlx_vlm.")


def forward_module(model):
    """What a decode step calls.  mlx-vlm decodes through the language model
    (its multimodal wrapper would re-embed for vision); mlx-lm through the model."""
    lm = getattr(model, "language_model", None)
    return lm if lm is not None and from_mlx_vlm(model) else model


def family_of(model) -> str:
    """The drafter layer variant a target's drafters use: Gemma-4's for
    Gemma-4 targets, Qwen3's for every other one (Llama, Qwen2, MoE, gpt-oss
    and hybrid recurrent targets all get Qwen3-style drafters)."""
    model_type = getattr(model, "model_type", None) or text_args(model).get("model_type")
    return family_of_model_type(model_type)


def untappable(model) -> Optional[str]:
    """Why ``model`` cannot be a target (its decoder layers cannot be
    tapped), or None when it can."""
    name = type(model).__name__
    try:
        text_args(model)
    except TypeError as e:
        return str(e)
    layers = getattr(model, "layers", None)
    if layers is None:
        return f"{name} exposes no `layers`"
    try:
        layers = list(layers)
    except TypeError:
        return f"{name}.layers is a {type(layers).__name__}, not a sequence of layer modules"
    if not layers:
        return f"{name}.layers is empty"
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.Module) or not callable(getattr(type(layer), "__call__", None)):
            return f"{name}.layers[{i}] is a {type(layer).__name__}, not a callable mlx Module"
    if not callable(getattr(model, "__call__", None)):
        return f"{name} is not callable"
    return None


class TargetAdapter:
    """Runs an mlx-lm target and returns logits plus the tapped features."""

    def __init__(self, model, layer_ids: List[int]):
        self.model = model
        self.forward = forward_module(model)
        problem = untappable(model)
        if problem is not None:
            raise UnsupportedTargetError(
                f"Not a target mlx-lm-dspark can run: {problem}; it taps the hidden states of a "
                "decoder's `model.layers` and cannot run on this model."
            )
        self.layers = list(model.layers)
        self.layer_ids = list(layer_ids)
        args = text_args(model)
        self.family = family_of(model)
        self.vocab_size = args.get("vocab_size")
        self.hidden_size = args.get("hidden_size")
        self.num_layers = len(self.layers)
        self.num_cache_entries = len(cache_lib.make_prompt_cache(model))
        # Taps out of range are reported by ``validate_pair`` together with
        # every other difference from the drafter's target (a drafter for
        # another model usually differs in vocabulary and width too).
        self.bad_layer_ids = [
            i for i in self.layer_ids if not (isinstance(i, int) and EMBEDDING_TAP <= i < self.num_layers)
        ]
        for i in self.layer_ids:
            if i not in self.bad_layer_ids:
                tap(self.layers[max(i, 0)])
        self._tap_keys = [self._tap_key(i) for i in self.layer_ids if i not in self.bad_layer_ids]
        recurrent.prepare(self.layers)

    def _tap_key(self, i: int):
        """What the capture records tap ``i`` under: a layer's output, or for
        -1 the input of layer 0."""
        return ("input", id(self.layers[0])) if i == EMBEDDING_TAP else id(self.layers[i])

    def tap_problem(self) -> Optional[str]:
        if not self.bad_layer_ids:
            return None
        return (
            f"target_layer_ids: the drafter taps layers {self.layer_ids}, the target has "
            f"{self.num_layers} layers (out of range: {self.bad_layer_ids}; -1 is the embedding output)"
        )

    def __call__(self, tokens: mx.array, cache, start_early: bool = False) -> tuple:
        """tokens [1, L] -> (logits [1, L, V], features [1, L, n_taps * H]).

        With ``start_early`` and several tokens (a verify) each tap queues
        the layers up to it as soon as they are built, so the device starts
        on them while the rest of the graph is built and dispatched.  (A single
        token's forward is already queued behind the previous one, pipelined
        like plain decoding.)  Never inside a function transformation
        (training's ``value_and_grad``): nothing may be evaluated there."""
        if self.bad_layer_ids:
            raise DrafterMismatchError(
                f"This drafter does not match the target model: {self.tap_problem()}. "
                "Use the drafter trained for this exact target."
            )
        sink = dict.fromkeys(self._tap_keys)
        outer = getattr(_capture, "sink", None), getattr(_capture, "start_early", False)
        _capture.sink, _capture.start_early = sink, start_early and tokens.shape[-1] > 1
        try:
            if cache is None:
                out = self.forward(tokens, cache=cache)
            else:
                with recurrent.recording(_leaf_caches(cache), tokens.shape[-1], self.layers):
                    out = self.forward(tokens, cache=cache)
        finally:
            _capture.sink, _capture.start_early = outer
        missing = [i for i, k in zip(self.layer_ids, self._tap_keys) if sink[k] is None]
        if missing:
            raise RuntimeError(
                f"The target model did not call its layers {missing} through the objects in "
                "`model.layers`; the host model's structure changed and mlx-lm-dspark needs an update."
            )
        logits = getattr(out, "logits", out)  # mlx-vlm returns an output record
        taps = [sink[k] for k in self._tap_keys]
        return logits, taps[0] if len(taps) == 1 else mx.concatenate(taps, axis=-1)

    def make_cache(self):
        return cache_lib.make_prompt_cache(self.model)

    def embedding_functions(self):
        """(token ids -> embeddings, hidden -> logits) of the target, for
        drafters that borrow them (z-lab DFlash ships neither)."""
        inner = getattr(self.model, "language_model", self.model)
        body = getattr(inner, "model", None) or getattr(inner, "backbone", None)  # Nemotron-H: backbone
        embed = getattr(body, "embed_tokens", None) or getattr(body, "embeddings", None)
        if embed is None:
            raise TypeError(
                f"{type(self.model).__name__} has no model.embed_tokens to lend to the drafter."
            )
        head = getattr(inner, "lm_head", None)
        return embed, head if head is not None else embed.as_linear

    def lent_factors(self) -> dict:
        """What the target applies around the embedding and head it lends
        beyond the modules themselves: Gemma-4 scales ``embed_tokens``'
        output by √hidden_size and soft-caps its logits.  z-lab's reference
        applies both to its drafts (Hugging Face's Gemma-4 embedding carries
        the scale; their vLLM path passes the soft-cap)."""
        factors = {}
        if self.family == "gemma4":
            factors["input_embedding_scale"] = math.sqrt(self.hidden_size)
        cap = text_args(self.model).get("final_logit_softcapping")
        if cap:
            factors["final_logit_softcapping"] = cap
        return factors


def validate_pair(drafter, target: TargetAdapter) -> None:
    """Refuse a drafter trained for another target, naming the field (a
    drafter field that is None, as lookup's, matches any target)."""
    args = drafter.args
    problems = []
    # A drafter that borrows the target's embedding and head (z-lab's) has a
    # Qwen3-style backbone whatever the target (Gemma-4's included).
    borrows = getattr(args, "has_embeddings", True) is False and args.family == "qwen3"
    if args.family is not None and args.family != target.family and not borrows:
        problems.append(f"family: drafter is for {args.family}, target is {target.family}")
    if None not in (target.vocab_size, args.vocab_size) and args.vocab_size != target.vocab_size:
        problems.append(f"vocab_size: drafter {args.vocab_size}, target {target.vocab_size}")
    if None not in (target.hidden_size, args.hidden_size) and args.hidden_size != target.hidden_size:
        problems.append(f"hidden_size: drafter {args.hidden_size}, target {target.hidden_size}")
    if args.num_target_layers is not None and args.num_target_layers != target.num_layers:
        problems.append(
            f"num_target_layers: drafter expects {args.num_target_layers}, target has {target.num_layers}"
        )
    if target.tap_problem() is not None:
        problems.append(target.tap_problem())
    if problems:
        raise DrafterMismatchError(
            "This drafter does not match the target model: " + "; ".join(problems) + ". "
            "Use the drafter trained for this exact target."
        )


def _is_a(c, name: str) -> bool:
    # mlx-vlm has its own cache classes with mlx-lm's names and internals.
    return any(k.__name__ == name for k in type(c).__mro__)


def _is_rotating(c) -> bool:
    return (
        isinstance(c, cache_lib.RotatingKVCache)
        or _is_a(c, "RotatingKVCache")
        or _is_a(c, "BatchRotatingKVCache")  # a server's one-row batch
    )


def _leaf_caches(cache):
    for c in cache:
        if isinstance(c, cache_lib.CacheList) or _is_a(c, "CacheList"):
            yield from _leaf_caches(c.caches)
        else:
            yield c


def check_rollback(cache) -> None:
    """Every cache entry must support removing rejected tokens (recurrent
    state is restored by ``recurrent.py``; positions are counted by the
    attention caches)."""
    counted = False
    for i, c in enumerate(_leaf_caches(cache)):
        if recurrent.is_recurrent(c):
            continue
        counted = True
        if _is_rotating(c):
            continue
        if not (hasattr(c, "trim") and hasattr(c, "is_trimmable") and c.is_trimmable()):
            raise UnsupportedCacheError(
                f"Cache entry {i} ({type(c).__name__}) cannot be trimmed, so rejected draft tokens "
                "could not be rolled back. Use a plain, quantized or rotating KV cache."
            )
    if not counted:
        raise UnsupportedCacheError(
            "Every cache entry of this target is recurrent state (ArraysCache): with no attention cache "
            "there is no position count for the drafter context, so speculative decoding is not available "
            "for this target. Generate without --draft-model."
        )


def _rollback_rotating(c, n: int) -> None:
    # A multi-token update (the verify) leaves the buffer in temporal order
    # with its end at `_idx`; dropping the last n entries removes exactly the
    # rejected tokens, including after wrap-around (mlx-lm's own trim() only
    # moves indices, so a later single-token update would still see them).
    if c.keys is None or c._idx != c.keys.shape[2] or n > c._idx:
        raise RuntimeError(
            "RotatingKVCache is not in the state a multi-token verify leaves; cannot roll back."
        )
    c.offset -= n
    c._idx -= n
    if hasattr(c, "_offset"):  # batch variant: scalar count beside per-row offsets
        c._offset -= n
    c.keys = c.keys[..., : c._idx, :]
    c.values = c.values[..., : c._idx, :]


def rollback(cache, n: int) -> None:
    """Remove the last ``n`` tokens from every entry of ``cache``."""
    if n <= 0:
        return
    for c in _leaf_caches(cache):
        if recurrent.is_recurrent(c):
            recurrent.rollback(c, n)
        elif _is_rotating(c):
            _rollback_rotating(c, n)
        elif c.trim(n) != n:
            raise RuntimeError(f"{type(c).__name__} trimmed fewer than {n} tokens.")


def _single_step_mask(c, n: int) -> mx.array:
    """The [n, L] mask that gives each of ``n`` new positions of a
    ``RotatingKVCache`` with ``keep`` > 0 exactly the keys a single-token step
    there would see: the first ``keep`` positions and the latest
    ``max_size - keep`` up to itself.  (mlx-lm's multi-token mask is a plain
    window of ``max_size``, which drops the kept positions for all but the
    first query once the cache wraps.)  Columns follow the buffer a
    multi-token update leaves: temporal order, at most ``max_size - 1`` old
    entries (the kept ones first), then the new ones."""
    offset, size, keep = c.offset, c.max_size, c.keep
    if c.keys is None:
        held = 0
    elif c._idx == c.keys.shape[2] or c._idx < offset:
        held = c.keys.shape[2]
    else:
        held = c._idx
    held = min(held, size - 1)
    column = mx.arange(held + n)
    position = mx.where(column < keep, column, column + (offset - held))[None]
    query = (offset + mx.arange(n))[:, None]
    return (position <= query) & ((position < keep) | (position > query - (size - keep)))


@contextlib.contextmanager
def single_step_masks(cache, n: int):
    """While a forward of ``n`` tokens is built (a verify): each rotating
    cache with ``keep`` > 0 that the block wraps masks attention the way
    single-token steps attend, so verified logits equal plain decoding's."""
    patched = []
    if n > 1:
        for c in _leaf_caches(cache):
            if _is_rotating(c) and not _is_a(c, "BatchRotatingKVCache") and c.keep > 0 and c.offset + n > c.max_size:
                host_mask, mask = c.make_mask, _single_step_mask(c, n)

                def make_mask(N, *args, window_size=None, _host=host_mask, _mask=mask, _size=c.max_size, **kwargs):
                    if N != _mask.shape[0] or window_size not in (None, _size):
                        return _host(N, *args, window_size=window_size, **kwargs)
                    return _mask

                c.make_mask = make_mask
                patched.append(c)
    try:
        yield
    finally:
        for c in patched:
            del c.make_mask


def cache_length(cache) -> int:
    """Number of positions the target cache holds (total, not window size)."""
    for c in _leaf_caches(cache):
        if recurrent.is_recurrent(c):
            continue  # recurrent state has no length
        offset = c.offset
        # A batch cache keeps one offset per row; speculative rounds run one row.
        return int(offset.item()) if isinstance(offset, mx.array) else offset
    return 0
