"""Starting the device on part of a graph while Python builds the rest.

The verify forward and the drafter's proposal queue their first layers as
soon as they are built, where that overlaps: on a GPU ``mx.async_eval``
returns at once and the device computes while Python builds the rest.  The
CPU backend keeps only a few operations in flight, so there ``async_eval``
computes most of what it queues before it returns: an early start would only
split the graph building and add hand-offs to the worker thread, and it is
skipped.  The time spent in it is counted apart: the round loop books it as
time on the device, not as its own overhead.
"""

import threading
import time

import mlx.core as mx

_spent = threading.local()


def overlaps() -> bool:
    """Whether queueing part of a graph early lets the device run while the
    host builds the rest (the default device is not the CPU)."""
    return mx.default_device().type != mx.cpu


def start(*arrays) -> None:
    """Queue ``arrays`` for evaluation now where that overlaps (never inside
    a function transformation: nothing may be evaluated there)."""
    if not overlaps():
        return
    began = time.perf_counter()
    mx.async_eval(*arrays)
    _spent.seconds = seconds() + time.perf_counter() - began
    _spent.starts = starts() + 1


def seconds() -> float:
    """Time this thread has spent in ``start`` so far."""
    return getattr(_spent, "seconds", 0.0)


def starts() -> int:
    """Early starts this thread has made so far (each a hand-off to the device)."""
    return getattr(_spent, "starts", 0)
