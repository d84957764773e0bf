"""Starting the device on part of a graph while Python builds the rest.

The verify forward and the drafter's proposal queue their first layers as
soon as they are built.  ``mx.async_eval`` can block the calling thread
while it hands over what it queues (the CPU backend keeps only so many
operations in flight), so the time spent in it is counted apart: the round
loop books it as time on the device, not as its own overhead.
"""

import threading
import time

import mlx.core as mx

_spent = threading.local()


def start(*arrays) -> None:
    """Queue ``arrays`` for evaluation now (never inside a function
    transformation: nothing may be evaluated there)."""
    began = time.perf_counter()
    mx.async_eval(*arrays)
    _spent.seconds = seconds() + time.perf_counter() - began


def seconds() -> float:
    """Time this thread has spent in ``start`` so far."""
    return getattr(_spent, "seconds", 0.0)
