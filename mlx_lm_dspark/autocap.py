"""Automatic draft length: each round's number of drafts to verify.

The cap maximises expected tokens per second under the machine's cost model
(``cost.py``): (1 + E[accepted | K]) / (T_draft + T_verify(K + 1)).  The
acceptance of each draft slot is estimated per round from the drafter's
confidence head (trained to predict exactly that), scaled by a running
calibration against what the target really accepted; without a confidence
head, from running per-slot acceptance rates.  When even the best cap is
predicted slower than plain decoding, the round skips drafting, probing
again now and then so a drafter that improves is noticed.
"""

from typing import List, Optional

from .cost import CostModel

DECAY = 0.95  # weight of the past in the running estimates (per round)
PRIOR = 0.5  # acceptance assumed for a slot never tried
PRIOR_WEIGHT = 2.0  # ... worth this many rounds of evidence
PROBE_EVERY = 8  # rounds between drafting probes when drafting does not pay


class DraftLength:
    def __init__(self, cost: CostModel, max_drafts: int):
        self.cost = cost
        self.max_drafts = min(max_drafts, cost.max_drafts)
        n = self.max_drafts
        self.tried = [0.0] * n  # decayed number of rounds slot k was verified
        self.kept = [0.0] * n  # ... and kept
        self.predicted = [0.0] * n  # ... sum of its confidence when verified
        self.skipped = 0

    def _rates(self) -> List[float]:
        return [(k + PRIOR * PRIOR_WEIGHT) / (t + PRIOR_WEIGHT) for k, t in zip(self.kept, self.tried)]

    def acceptance(self, confidence: Optional[List[float]] = None) -> List[float]:
        """Per-slot conditional acceptance expected for this round."""
        rates = self._rates()
        if confidence is None:
            return rates
        out = []
        for k, c in enumerate(confidence[: self.max_drafts]):
            scale = (self.kept[k] + PRIOR_WEIGHT) / (self.predicted[k] + PRIOR_WEIGHT)
            out.append(min(1.0, max(0.0, c * scale)))
        return out

    def should_draft(self) -> bool:
        """Whether the next round proposes at all (from running rates)."""
        if self.cost.best_cap(self._rates()) > 0:
            self.skipped = 0
            return True
        self.skipped += 1
        if self.skipped >= PROBE_EVERY:
            self.skipped = 0
            return True
        return False

    def choose(self, proposed: int, confidence: Optional[List[float]] = None) -> int:
        """How many of the ``proposed`` drafts to verify this round."""
        return self.cost.best_cap(self.acceptance(confidence), limit=min(proposed, self.max_drafts))

    def update(self, verified: int, accepted: int, confidence: Optional[List[float]] = None) -> None:
        """Record a round: ``verified`` drafts, the first ``accepted`` kept."""
        for k in range(self.max_drafts):
            self.tried[k] *= DECAY
            self.kept[k] *= DECAY
            self.predicted[k] *= DECAY
        for k in range(min(verified, accepted + 1)):  # slots the target judged
            self.tried[k] += 1.0
            self.kept[k] += float(k < accepted)
            if confidence is not None:
                self.predicted[k] += confidence[k]
