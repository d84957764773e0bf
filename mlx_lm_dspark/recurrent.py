"""Exact rollback of recurrent state (conv, Gated DeltaNet, SSM) after a verify.

mlx-lm's hybrid models keep each recurrent layer's state in an
``ArraysCache``, which cannot be trimmed: a verify over ``[anchor, d_1..d_k]``
advances it by k+1 tokens.  Every sub-module of the target's layers that takes
a ``cache`` (the recurrent mixers: ``linear_attn``, ``conv``, ``mixer``) gets
its class swapped for a subclass that, while a target forward is recorded,
notes the arguments it was called with.  Before each forward the state arrays
are kept (mlx arrays are immutable: keeping them copies nothing).  Rolling
back n tokens restores the kept arrays and runs the same mixer object again
over the tokens that stay (``Replay``), so the state is what a forward over
exactly those tokens leaves; nothing of the host's layer is re-implemented.

A batch of sequences (the rows of a batched round) rolls back each row by
its own tail: the rows that keep the same part of the forward are replayed
together over that part, on their own rows (not through the cache's
``lengths``, which not every host mixer honours for its state).

``Stepwise`` is the other design: during the recorded forward each mixer runs
token by token, keeping the state after every position, and a rollback picks
one.  It costs on every forward instead of on rejections only; ``use`` selects
it (for measurements).
"""

import inspect
import threading
import weakref
from typing import List, Optional

import mlx.core as mx
from mlx_lm.models import cache as cache_lib


def is_recurrent(c) -> bool:
    """Whether ``c`` is a recurrent-state cache (mlx-lm's or mlx-vlm's ArraysCache)."""
    return isinstance(c, cache_lib.ArraysCache) or any(k.__name__ == "ArraysCache" for k in type(c).__mro__)


def state_of(c) -> tuple:
    """A recurrent cache's state, to hand back to ``restore``."""
    # The attributes, not ``c.state``: its shape differs across mlx-lm releases
    # (0.31 hands out the arrays alone).  The list is the live one the mixer
    # assigns into: copy it.
    return list(c.cache), getattr(c, "left_padding", None), getattr(c, "lengths", None)


def restore(c, state: tuple) -> None:
    arrays, c.left_padding, c.lengths = state
    c.cache = list(arrays)


def _cut(value, width: int, start: int, stop: int):
    """``value`` limited to positions [start, stop) when it has a time axis of ``width``."""
    if isinstance(value, mx.array) and value.ndim >= 2 and value.shape[1] == width:
        return value[:, start:stop]
    return value


def _rows(value, rows: int, index: mx.array, width: int, stop: int):
    """``value`` limited to the rows ``index`` and positions [0, stop) when
    it has a batch axis of ``rows`` and a time axis of ``width``."""
    if isinstance(value, mx.array) and value.ndim >= 2 and value.shape[0] == rows and value.shape[1] == width:
        return value[index, :stop]
    return value


class Record:
    """One recurrent cache's state before the last forward, and how to get
    the state after any number of that forward's tokens."""

    def __init__(self, cache, width: int):
        self.cache = weakref.ref(cache)
        self.width = width  # tokens of the forward
        self.kept = width  # tokens of it the state holds now
        self.before = state_of(cache)
        self.call = None  # (mixer, its original __call__, args, kwargs)
        self.steps = None  # Stepwise: the state after each position

    def run(self, mixer, call, args, kwargs):
        """The forward's call of the cache's mixer (recorded)."""
        self.call = (mixer, call, args, kwargs)
        return call(mixer, *args, **kwargs)

    def back_to(self, kept: int) -> None:
        """Make the cache hold the state after the forward's first ``kept`` tokens."""
        cache = self.cache()
        restore(cache, self.before)
        if kept > 0:
            mixer, call, args, kwargs = self.call
            w = self.width
            call(mixer, *(_cut(a, w, 0, kept) for a in args), **{k: _cut(v, w, 0, kept) for k, v in kwargs.items()})
        self.kept = kept

    def back_to_rows(self, kept: List[int]) -> None:
        """Make each row ``i`` of a batched cache hold the state after the
        forward's first ``kept[i]`` tokens of that row: rows that keep the
        same part are replayed together, on their own rows only."""
        cache, width, rows = self.cache(), self.width, len(kept)
        after, (arrays, padding, lengths) = list(cache.cache), self.before
        sources = {0: (arrays, list(range(rows))), width: (after, list(range(rows)))}
        mixer, call, args, kwargs = self.call
        for k in sorted(set(kept) - {0, width}):
            group = [i for i in range(rows) if kept[i] == k]
            index = mx.array(group)
            part = type(cache)(len(arrays))
            part.cache = [None if a is None else a[index] for a in arrays]
            part.left_padding = None if padding is None else padding[index]
            bound = _signature(call).bind(mixer, *(_rows(a, rows, index, width, k) for a in args),
                                          **{n: _rows(v, rows, index, width, k) for n, v in kwargs.items()})
            bound.arguments["cache"] = part
            call(*bound.args, **bound.kwargs)
            sources[k] = (part.cache, group)
        where = [(sources[k][0], sources[k][1].index(i)) for i, k in enumerate(kept)]  # row -> (state, its row)
        picked = [mx.concatenate([state[j][r : r + 1] for state, r in where]) for j in range(len(arrays))]
        restore(cache, (picked, None if padding is None else padding - mx.array(kept), lengths))
        self.kept = None  # rows differ: no further rollback within this forward


class StepwiseRecord(Record):
    """Runs the mixer token by token, keeping every position's state."""

    def run(self, mixer, call, args, kwargs):
        self.call = (mixer, call, args, kwargs)
        cache, w = self.cache(), self.width
        if w == 1:
            out = call(mixer, *args, **kwargs)
            self.steps = [state_of(cache)]
            return out
        outs, self.steps = [], []
        for t in range(w):
            outs.append(call(mixer, *(_cut(a, w, t, t + 1) for a in args),
                             **{k: _cut(v, w, t, t + 1) for k, v in kwargs.items()}))
            self.steps.append(state_of(cache))
        return mx.concatenate(outs, axis=1)

    def back_to(self, kept: int) -> None:
        restore(self.cache(), self.steps[kept - 1] if kept > 0 else self.before)
        self.kept = kept

    def back_to_rows(self, kept: List[int]) -> None:
        states = [self.steps[k - 1] if k > 0 else self.before for k in kept]
        arrays = [mx.concatenate([s[0][j][i : i + 1] for i, s in enumerate(states)]) for j in range(len(states[0][0]))]
        _, padding, lengths = self.before
        restore(self.cache(), (arrays, None if padding is None else padding - mx.array(kept), lengths))
        self.kept = None


_SIGNATURES = {}


def _signature(call) -> inspect.Signature:
    signature = _SIGNATURES.get(call)
    if signature is None:
        signature = _SIGNATURES[call] = inspect.signature(call)
    return signature


Replay, Stepwise = Record, StepwiseRecord
_design = Replay


def use(design) -> None:
    """Select the rollback design (``Replay``, the default, or ``Stepwise``)."""
    global _design
    _design = design


_active = threading.local()
_records = weakref.WeakKeyDictionary()  # cache -> Record of the last forward
_RECORDING_CLASSES = {}


def _cache_position(cls) -> Optional[int]:
    """Where ``cache`` sits among the positional arguments of ``cls.__call__``."""
    try:
        names = list(inspect.signature(cls.__call__).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("cache") - 1 if "cache" in names else None


def _recording_class(cls, position: int):
    sub = _RECORDING_CLASSES.get(cls)
    if sub is None:

        def __call__(self, *args, **kwargs):
            records = getattr(_active, "records", None)
            if records:
                cache = kwargs.get("cache", args[position] if len(args) > position else None)
                record = records.pop(id(cache), None) if cache is not None else None
                if record is not None:  # popped: nested calls with the cache pass through
                    return record.run(self, cls.__call__, args, kwargs)
            return cls.__call__(self, *args, **kwargs)

        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
        sub.__qualname__ = cls.__qualname__
        _RECORDING_CLASSES[cls] = sub
    return sub


def prepare(layers) -> None:
    """Make every sub-module of ``layers`` that takes a ``cache`` record its
    calls during a recorded forward (idempotent)."""
    for layer in layers:
        for name, module in layer.named_modules():
            cls = type(module)
            if module is layer or cls in _RECORDING_CLASSES.values():
                continue
            position = _cache_position(cls)
            if position is not None:
                module.__class__ = _recording_class(cls, position)


class recording:
    """Context of one target forward over ``width`` tokens: keeps each
    recurrent cache's state before it and records its mixer's call."""

    def __init__(self, caches, width: int, layers=()):
        caches = list(caches)
        self.layers = list(layers) if len(layers) == len(caches) else None  # one entry per layer
        self.records = {}
        for i, c in enumerate(caches):
            if is_recurrent(c):
                self.records[id(c)] = (i, c, _design(c, width))

    def __enter__(self):
        self.outer = getattr(_active, "records", None)
        _active.records = {k: r for k, (_, _, r) in self.records.items()} if self.records else None
        return self

    def __exit__(self, kind, *_):
        unseen = _active.records
        _active.records = self.outer
        if kind is not None:
            return False
        for key, (i, c, record) in self.records.items():
            if unseen and key in unseen:
                if any(a is not b for a, b in zip(c.cache, record.before[0])):
                    raise self.unrecorded(i, c)
                _records.pop(c, None)  # untouched by this forward: nothing to roll back
                continue
            _records[c] = record
        return False


    def unrecorded(self, i: int, c):
        from .target import UnsupportedCacheError

        where = f"layer {i} ({type(self.layers[i]).__name__})" if self.layers else f"cache entry {i}"
        return UnsupportedCacheError(
            f"The recurrent state ({type(c).__name__}) of {where} is updated outside any sub-module of "
            "the layer that takes the cache, so it cannot be rolled back exactly after rejected drafts: "
            "speculative decoding is not available for this target. Generate without --draft-model."
        )


def rollback_rows(c, rejected: List[int]) -> None:
    """Remove row ``i``'s last ``rejected[i]`` tokens from the batched
    recurrent cache ``c`` (within its last forward)."""
    record = _records.get(c)
    if record is None or record.cache() is not c or record.kept != record.width or max(rejected) > record.width:
        raise RuntimeError(
            f"Cannot roll back rows of a recurrent {type(c).__name__}: only tokens of the last "
            "recorded target forward can be removed, once."
        )
    if max(rejected) == 0:
        return
    if min(rejected) == max(rejected):
        record.back_to(record.width - rejected[0])
        return
    record.back_to_rows([record.width - r for r in rejected])


def rollback(c, n: int) -> None:
    """Remove the last ``n`` tokens from the recurrent cache ``c`` (within its last forward)."""
    record = _records.get(c)
    if record is None or record.cache() is not c or n > record.kept:
        raise RuntimeError(
            f"Cannot roll back {n} tokens of a recurrent {type(c).__name__}: only tokens of the last "
            "recorded target forward can be removed."
        )
    record.back_to(record.kept - n)
