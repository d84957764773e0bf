"""What a (drafter, target model) pair keeps from one generation to the next.

A ``Session`` holds the pair's bound ``TargetAdapter`` (taps placed, pair
validated), its cost model, the automatic cap's ``DraftLength`` estimates,
the last generation's ``SpeculativeStats`` and the drafter contexts that
travel with target-only prompt caches the caller reuses.  Neither model is
kept alive by it: a target's sessions hang off the target itself (a cycle
the garbage collector frees with it) keyed weakly by drafter, and the
drafter-wide record of the last statistics is keyed weakly too.
"""

import weakref
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from .autocap import DraftLength
from .cost import CostModel

# ``target`` imports mlx-lm, whose import runs this package's host patches,
# which import this module: it is imported where it is used.
if TYPE_CHECKING:
    from .target import TargetAdapter

_SESSIONS = "_mlx_lm_dspark_sessions"  # the attribute of a target model holding its sessions


class WeakIdentityMap:
    """A mapping keyed weakly by object identity (models are ``dict``
    subclasses: unhashable, so ``WeakKeyDictionary`` cannot hold them).  An
    entry goes when its key is collected."""

    def __init__(self):
        self._items: Dict[int, Tuple[weakref.ref, Any]] = {}

    def get(self, key, default=None):
        item = self._items.get(id(key))
        return item[1] if item is not None and item[0]() is key else default

    def __setitem__(self, key, value) -> None:
        items, ident = self._items, id(key)

        def gone(ref):
            item = items.get(ident)
            if item is not None and item[0] is ref:
                del items[ident]

        items[ident] = (weakref.ref(key, gone), value)

    def pop(self, key, default=None):
        item = self._items.get(id(key))
        if item is None or item[0]() is not key:
            return default
        del self._items[id(key)]
        return item[1]

    def __len__(self) -> int:
        return len(self._items)


_last_stats = WeakIdentityMap()  # drafter -> its most recent generation's SpeculativeStats


class Session:
    """One (drafter, target model) pair's state across generations."""

    def __init__(self, drafter, target: "TargetAdapter"):
        self.target = target  # the bound target (taps placed, pair validated)
        self.cost: Optional[CostModel] = None  # the pair's cost model, once loaded or measured
        self.lengths: Optional[DraftLength] = None  # the automatic cap's estimates (greedy decoding)
        self.batch_cap = None  # batched rounds' automatic cap (``batch.BatchCap``), kept across batches
        self.stats = None  # the last generation's SpeculativeStats
        # Drafter context of a target-only prompt cache the caller reuses
        # (keyed by the cache's first entry).
        self.draft_contexts = weakref.WeakKeyDictionary()
        self._drafter = weakref.ref(drafter)

    def draft_length(self, cost: CostModel, max_drafts: int, learn: bool = True) -> DraftLength:
        """The automatic cap's estimates for a generation, started.

        Kept across generations while the cost model and block stay the
        same.  ``learn=False`` (sampling) gives a fresh one: there the caps
        decide how many random draws a round uses, so they must depend only
        on the seed, the cost model and this generation."""
        if not learn:
            lengths = DraftLength(cost, max_drafts)
        else:
            lengths = self.lengths
            if lengths is None or lengths.cost is not cost or lengths.max_drafts != min(max_drafts, cost.max_drafts):
                lengths = self.lengths = DraftLength(cost, max_drafts)
        lengths.start()
        return lengths

    def record(self, stats) -> None:
        """Make ``stats`` the statistics of the generation under way."""
        self.stats = stats
        drafter = self._drafter()
        if drafter is not None:
            _last_stats[drafter] = stats


def _sessions_of(model, create: bool) -> Optional[WeakIdentityMap]:
    sessions = getattr(model, "__dict__", {}).get(_SESSIONS)
    if sessions is None and create:
        sessions = WeakIdentityMap()
        object.__setattr__(model, _SESSIONS, sessions)
    return sessions


def find(drafter, model) -> Optional[Session]:
    """The pair's session, or None before the pair was bound."""
    sessions = _sessions_of(model, create=False)
    return sessions.get(drafter) if sessions is not None else None


def session_for(drafter, model) -> Session:
    """The pair's session, binding the pair on first use: tap ``model`` at
    the drafter's layers, validate the pair (``DrafterMismatchError`` names
    what differs) and lend the target's embeddings (with the factors the
    target applies around them) to a drafter without."""
    session = find(drafter, model)
    if session is not None:
        return session
    from .target import TargetAdapter, validate_pair

    target = TargetAdapter(model, drafter.target_layer_ids)
    validate_pair(drafter, target)
    if not drafter.args.has_embeddings:
        drafter.borrow_embeddings(*target.embedding_functions(), target.lent_factors())
    session = Session(drafter, target)
    _sessions_of(model, create=True)[drafter] = session
    return session


def forget(drafter, model) -> None:
    """Drop the pair's session: the next generation binds and validates afresh."""
    sessions = _sessions_of(model, create=False)
    if sessions is not None:
        sessions.pop(drafter)


def last_stats(drafter):
    """The statistics (``SpeculativeStats``) of the drafter's most recent
    generation, whatever its target; None before its first."""
    return _last_stats.get(drafter)


def clear_last_stats(drafter) -> None:
    """Forget the drafter's last statistics (a server reports each request's own)."""
    _last_stats.pop(drafter)
