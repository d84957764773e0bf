"""Automatic draft length: each round's number of drafts to verify.

The cap maximises expected tokens per second under the machine's cost model
(``cost.py``): (1 + E[accepted | K]) / (T_draft + T_verify(K + 1)).
``DraftLength`` makes that choice each round from four parts, one job each:

- ``AcceptanceEstimates``: each draft slot's chance of being kept.  From the
  drafter's confidence head (trained to predict exactly that), scaled by a
  running calibration against what the target really accepted; without a
  confidence head, from running per-slot acceptance rates.
- ``RoundTimeScale``: measured round times over the cost model's, for rounds
  without and with drafts, so that the choice follows the machine as it runs
  now (and the host work the measured pieces leave out).  Beyond the context
  lengths the cost model was measured at, its growth is an extrapolation:
  there each kind's scale rests on rounds timed near the current context
  only, and while rounds draft a few undrafted ones (a plain check, as fast
  as plain decoding) time a plain step where it is used.
- ``ProbeSchedule``: when rounds propose at all.  When even the best cap is
  predicted slower than plain decoding, rounds skip drafting; every so often
  a probe verifies a whole proposal whatever the estimates say, the only way
  to learn that a drafter (or a pessimistic confidence head) is better than
  believed.  The first ``CALIBRATION_ROUNDS`` proposals are verified whole
  (one unlucky round must not decide), fewer when a round keeps nothing
  and the confidence head foresaw it: a pair's first proposal whose head
  gives its first draft less than ``FORESEEN`` verifies that draft alone,
  a check of the head that costs a narrow verify; later probes are spaced to cost at
  most ``PROBE_BUDGET`` of plain decoding time, come less often while they
  find nothing and resume proposals when one finds more.  Where even a
  drafter always right would not pay, no round proposes.
- ``ConfidenceReads``: whether a round waits for its proposal's confidences.
  Reading them before building the verify costs a wait for the drafter (the
  verify graph cannot be built while it computes).  While the confidences
  typical of recent proposals choose caps as good as the proposal's own
  would, rounds choose from the typical ones and judge their own after the
  verify instead; the first round where reading them would have paid brings
  the reads back.

What is learned stays with the (drafter, target) pair from one generation to
the next (``session.Session.draft_length``).
"""

import math
from typing import List, Optional

from .cost import MEASURED_SPAN, CostModel

DECAY = 0.95  # weight of the past in the running estimates (per round)
PRIOR = 0.5  # acceptance assumed for a slot never tried
PRIOR_WEIGHT = 2.0  # ... worth this many rounds of evidence
PROBE_EVERY = 8  # at least this many rounds verifying less than all drafts before a probe ...
PROBE_BUDGET = 0.02  # ... and enough that probes cost at most this share of plain decoding time ...
CALIBRATION_ROUNDS = 4  # whole proposals verified before the estimates may stop drafting ...
FORESEEN = 0.1  # ... or one that kept nothing where the confidence head gave its first draft less than this
DECLINES = 2  # declined proposals in a row before rounds stop proposing (until a probe)
PROBE_BACKOFF = 16  # ... the interval doubling, up to this factor, while probes find nothing more
TIME_DECAY = 0.9  # weight of the past in the running round-time scales (per round)
SCALE_PRIOR = 1.0  # rounds' worth of the pooled scale a kind of round starts from (fading as its own come)
PRIOR_FADED = 200  # ... gone (TIME_DECAY ** 200 < 1e-9) after this many of its own rounds
AT_STEP = 8  # positions the context grows before the costs at it are recomputed
STALE_POSITIONS = 128  # beyond the measured contexts, a kind's timing is stale this many positions away ...
STALE_SHARE = 0.125  # ... or this share of the context, whichever is more
PLAIN_CHECK_ROUNDS = 3  # undrafted rounds in a row a plain check runs (the first after a drafted one is not timed)
AGREED_ROUNDS = 4  # rounds in a row typical confidences chose as well as the proposal's before rounds stop waiting for them
READ_GAIN = 0.01  # ... "as well": within this share of the tokens per second the proposal's own choice promises


class AcceptanceEstimates:
    """Per-slot conditional acceptance: decayed counts of the rounds each
    slot was judged by the target, kept, and the confidence it was given."""

    def __init__(self, slots: int):
        self.slots = slots
        self.tried = [0.0] * slots  # decayed number of rounds slot k was verified
        self.kept = [0.0] * slots  # ... and kept
        self.predicted = [0.0] * slots  # ... sum of its confidence when verified

    def rates(self) -> List[float]:
        """The running acceptance rates, leaning on ``PRIOR`` while untried."""
        return [(k + PRIOR * PRIOR_WEIGHT) / (t + PRIOR_WEIGHT) for k, t in zip(self.kept, self.tried)]

    def acceptance(self, confidence: Optional[List[float]] = None) -> List[float]:
        """Per-slot conditional acceptance expected for a proposal with these
        ``confidence`` scores (None: the running rates)."""
        if confidence is None:
            return self.rates()
        # Calibration scale per slot, shrunk towards the scale of all slots
        # together (slots past the usual cap are seldom verified).  Priors
        # are in the head's own units, so a few probes correct even a head
        # that is far too pessimistic.  (One pass: this runs twice a round.)
        confidence = [c if c > 1e-3 else 1e-3 for c in confidence[: self.slots]]
        if not confidence:
            return []
        prior = PRIOR_WEIGHT * sum(confidence) / len(confidence)
        pooled = (sum(self.kept) + prior) / (sum(self.predicted) + prior)
        out = []
        for c, kept, predicted in zip(confidence, self.kept, self.predicted):
            weight = PRIOR_WEIGHT * c
            a = c * (kept + weight * pooled) / (predicted + weight)
            out.append(a if a < 1.0 else 1.0)
        return out

    def record(self, verified: int, accepted: int, confidence: Optional[List[float]] = None) -> None:
        """A round verified ``verified`` drafts and kept the first ``accepted``:
        the slots up to the first rejected one were judged."""
        judged = min(verified, accepted + 1)
        tried, kept, predicted = self.tried, self.kept, self.predicted
        for k in range(self.slots):
            tried[k] *= DECAY
            kept[k] *= DECAY
            predicted[k] *= DECAY
            if k < judged:
                tried[k] += 1.0
                kept[k] += k < accepted
                if confidence is not None:
                    predicted[k] += confidence[k]


class RoundTimeScale:
    """Measured round time over the cost model's, for rounds without and with
    drafts (``scale[0]``, ``scale[1]``): the machine now against when it was
    measured, plus the host work and lost overlap that timing the pieces
    alone leaves out.  ``scale`` is updated in place (readers keep it)."""

    def __init__(self, max_drafts: int, measured_to: Optional[int] = None):
        self.max_drafts = max_drafts
        self.measured_to = measured_to  # the longest context the cost model was measured at (None: no limit)
        self.timed_at = [None, None]  # the context length each kind was last timed at
        self.local = [False, False]  # whether a kind's scale rests on rounds timed near the context alone
        self.scale = [1.0, 1.0]
        self.took_ms = [0.0, 0.0]  # decayed sums of measured round times ...
        self.modelled_ms = [0.0, 0.0]  # ... and of the cost model's for the same rounds
        self.timed = [0, 0]  # rounds of each kind timed
        self.last_kind = None  # the kind of the last round observed (2: a declined proposal)

    def start(self) -> None:
        """A new generation: its first round follows no round."""
        self.last_kind = None

    def observe(self, now: CostModel, drafts: int, elapsed_ms: float, proposed: bool) -> None:
        """Record a round that took ``elapsed_ms``, verified ``drafts`` drafts
        and ran the drafter if ``proposed``; ``now``: the costs at its context.

        Only rounds like the one before them are timed: the scales are for
        runs of drafted or of undrafted rounds, and a round after one of the
        other kind is not pipelined like its kind.  A declined proposal (a
        drafter run and an unpipelined step) is neither kind and times none:
        counted as a plain step it would make plain steps look dear, counted
        as a drafted round it would make drafting look dear while rounds
        mostly skip it."""
        kind = 2 if proposed and drafts == 0 else int(proposed)
        last, self.last_kind = self.last_kind, kind
        if kind == 2 or (last is not None and last != kind):
            return
        i = kind
        modelled = now.verify_ms[drafts] + (now.draft_ms_for(drafts) if proposed else 0.0)
        # A round seen as nearly free (its work overlapped the caller) or a
        # one-off stall is not the machine's new speed: clamped around what
        # is expected (beyond the measured contexts, around what was learned
        # near this one; the first round timed there stands alone).
        expected = modelled
        if not self.extrapolated(now.context):
            self.local[i] = False
        elif self.stale(i, now.context):
            self.took_ms[i] = self.modelled_ms[i] = 0.0  # timed at another context length
            self.local[i] = True
            expected = None
        else:
            expected = modelled * self.scale[i]
        self.timed_at[i] = now.context
        took = elapsed_ms if expected is None else min(max(elapsed_ms, 0.25 * expected), 4.0 * expected)
        self.took_ms[i] = TIME_DECAY * self.took_ms[i] + took
        self.modelled_ms[i] = TIME_DECAY * self.modelled_ms[i] + modelled
        self.timed[i] += 1
        # Each kind starts from the scale seen so far over all rounds (a
        # machine slower than when measured is slower for both kinds); its
        # own rounds take over as they come.
        pooled = None
        for k in (0, 1):
            if self.timed[k] >= PRIOR_FADED or self.local[k]:  # its own rounds alone: only the kind just timed moved
                if k == i:
                    self.scale[k] = self.took_ms[k] / self.modelled_ms[k]
                continue
            if pooled is None:
                pooled = (sum(self.took_ms) + 1e-9) / (sum(self.modelled_ms) + 1e-9)
            prior = SCALE_PRIOR * now.round_ms(self.max_drafts if k else 0) * TIME_DECAY ** self.timed[k]
            self.scale[k] = (self.took_ms[k] + prior * pooled) / (self.modelled_ms[k] + prior)


    def extrapolated(self, context: int) -> bool:
        """Whether the cost model's costs at ``context`` are extrapolated
        beyond the contexts it was measured at."""
        return self.measured_to is not None and context > self.measured_to

    def stale(self, kind: int, context: int) -> bool:
        """Whether, beyond the measured contexts, rounds of ``kind`` (0:
        undrafted, 1: drafted) were last timed too far from ``context`` to
        say what they cost there."""
        if not self.extrapolated(context):
            return False
        at = self.timed_at[kind]
        return at is None or abs(context - at) > max(STALE_POSITIONS, STALE_SHARE * context)


class ProbeSchedule:
    """When rounds propose and when a proposal is verified whole (a probe)
    whatever the estimates say."""

    def __init__(self, cost: CostModel, max_drafts: int):
        self.max_drafts = max_drafts
        self.idle = 0  # rounds since the slots past the cap were last verified
        self.calibrated = False  # whether CALIBRATION_ROUNDS whole proposals were verified
        self.whole = 0  # ... how many were
        self.checked = False  # whether a proposal checked the confidence head's foresight (``choose``)
        self.checking = False  # ... the round under way does
        self.probed_cap = None  # the cap a probe round overrode
        self.declined = 0  # consecutive proposals ``choose`` verified none of
        self.drafting = False  # whether the last proposal's cap was above 0 (or a probe found more)
        # A probe costs a draft and a full-width verify, unpipelined: count the
        # whole round plus about one step of lost overlap.
        extra = cost.round_ms(max_drafts) + cost.verify_ms[0]
        self.min_probe_every = max(PROBE_EVERY, math.ceil(extra / (PROBE_BUDGET * cost.verify_ms[0])))
        self.probe_every = self.min_probe_every

    def start(self) -> None:
        """A new generation: forget the streak of declined proposals and any
        probe under way."""
        self.declined = 0
        self.probed_cap = None
        self.checking = False

    def due(self) -> bool:
        """Whether the next proposal is verified whole: a probe, or one of the
        calibration rounds."""
        return self.idle >= self.probe_every or not self.calibrated

    def stopped(self) -> bool:
        """Whether enough proposals in a row were declined to stop proposing
        until a probe."""
        return self.declined >= DECLINES

    def wait(self) -> None:
        """A round that does not propose."""
        self.idle += 1

    def choose(self, cap: int, limit: int, confidence: Optional[List[float]] = None) -> int:
        """The drafts to verify of ``limit`` proposed when the estimates chose
        ``cap``: all of them when a probe is due, the first alone when it
        checks the head (``confidence``: the proposal's scores, if read)."""
        if cap < limit and self.due():  # a probe: verify all
            if self.calibrated:
                self.probe_every = min(2 * self.probe_every, PROBE_BACKOFF * self.min_probe_every)
            self.idle = 0
            self.probed_cap = cap
            self.drafting = cap > 0
            # Before any whole round, a head that foresees the first draft
            # rejected is checked on that draft alone: its verify is as
            # narrow as a probe's can be, and a right head ends the calibration.
            if not (self.calibrated or self.checked or self.whole) and _foreseen(confidence):
                self.checked = self.checking = True
                return 1
            return limit
        self.idle = 0 if cap == limit else self.idle + 1
        if cap == 0 and limit < self.max_drafts:
            return 0  # too few tokens left to draft (a generation's end): says nothing of the drafter
        self.drafting = cap > 0
        self.declined = 0 if cap > 0 else self.declined + 1
        return cap

    def record(self, verified: int, accepted: int, confidence: Optional[List[float]] = None) -> None:
        """A round verified ``verified`` (> 0) drafts and kept ``accepted``;
        ``confidence``: the proposal's scores, if the drafter gives them."""
        if self.probed_cap is not None:
            if accepted > self.probed_cap:  # the probe found more: propose again, keep probing often
                self.probe_every = self.min_probe_every
                self.declined = 0
                self.drafting = True
            self.probed_cap = None
        if self.checking:
            self.checking = False
            self.calibrated = self.calibrated or (accepted == 0 and _foreseen(confidence))
            return
        if verified >= self.max_drafts:
            self.whole += 1
            # Nothing kept where the head said nothing would be: the head is
            # right about this drafter, and more whole rounds cost a
            # drafter round and a wide verify each for nothing.
            foreseen = accepted == 0 and _foreseen(confidence)
            self.calibrated = self.calibrated or self.whole >= CALIBRATION_ROUNDS or foreseen


def _foreseen(confidence: Optional[List[float]]) -> bool:
    """Whether a proposal's scores foresaw its first draft rejected."""
    return confidence is not None and len(confidence) > 0 and confidence[0] < FORESEEN


class ConfidenceReads:
    """Whether rounds wait for their proposal's confidences, or let those
    typical of recent proposals stand in for them."""

    def __init__(self, slots: int):
        self.slots = slots
        self.agreed = 0  # rounds in a row typical confidences chose as well as the proposal's own
        self.chosen = (None, None, 0)  # the last choice: (confidence given, acceptance estimates, best cap)
        self.confidence_sum = [0.0] * slots  # decayed sums of each slot's confidence over proposals ...
        self.confidence_weight = [0.0] * slots  # ... and of their number

    def reads(self) -> bool:
        return self.agreed < AGREED_ROUNDS

    def typical(self) -> List[float]:
        """Each slot's confidence averaged over recent proposals."""
        return [c / w if w > 0 else PRIOR for c, w in zip(self.confidence_sum, self.confidence_weight)]

    def judge(self, confidence: List[float], limit: int, now: CostModel, scale: List[float], acceptance) -> None:
        """Would reading ``confidence`` (a proposal's) before choosing a cap of
        at most ``limit`` have paid?  Compares the cap chosen from them with
        the one chosen from the typical confidences, both rated by what
        ``acceptance(confidence)`` expects; then adds them to the typical."""
        seen, estimates, cap = self.chosen
        if seen is confidence:  # the round read them
            informed, by_own = estimates, cap
            by_typical = now.best_cap(acceptance(self.typical()), limit=limit, scale=scale)
        else:  # typical ones stood in for them
            informed = acceptance(confidence)
            by_own = now.best_cap(informed, limit=limit, scale=scale)
            by_typical = cap
        paid = by_typical != by_own and now.tokens_per_ms(informed, by_typical, scale) < (
            1 - READ_GAIN) * now.tokens_per_ms(informed, by_own, scale)
        self.agreed = 0 if paid else self.agreed + 1
        sums, weights = self.confidence_sum, self.confidence_weight
        for k, c in enumerate(confidence[: self.slots]):
            sums[k] = DECAY * sums[k] + c
            weights[k] = DECAY * weights[k] + 1.0


def _delegated(part: str, name: str, doc: str) -> property:
    """An attribute of ``DraftLength`` kept by one of its parts."""
    return property(
        lambda self: getattr(getattr(self, part), name),
        lambda self, value: setattr(getattr(self, part), name, value),
        doc=doc,
    )


class DraftLength:
    """The automatic cap of one drafter bound to one target (``cost``)."""

    def __init__(self, cost: CostModel, max_drafts: int):
        self.cost = cost
        self.now = cost  # the costs at the current context length (``at``)
        self.max_drafts = min(max_drafts, cost.max_drafts)
        n = self.max_drafts
        self.perfect = [1.0] * n  # acceptance of a drafter always right
        self.estimates = AcceptanceEstimates(n)
        self.clock = RoundTimeScale(n, cost.context + MEASURED_SPAN if cost.verify_ms_per_position else None)
        self.plain_check = 0  # undrafted rounds left in a plain check
        self.checked_at = None  # the context length the last plain check began at
        self.schedule = ProbeSchedule(cost, n)
        self.reads = ConfidenceReads(n)
        self.time_scale = self.clock.scale  # (undrafted, drafted) rounds' time over the cost model's
        self.offered = None  # drafts a proposal decided before drafting could have had (``proposal_length``)

    calibrated = _delegated("schedule", "calibrated", "Whether the calibration rounds were verified.")
    drafting = _delegated("schedule", "drafting", "Whether the last proposal was worth verifying.")
    declined = _delegated("schedule", "declined", "Proposals in a row verified none of.")
    min_probe_every = _delegated("schedule", "min_probe_every", "The shortest spacing of probes, in rounds.")
    timed = _delegated("clock", "timed", "Rounds of each kind timed.")

    def _rates(self) -> List[float]:
        return self.estimates.rates()

    def acceptance(self, confidence: Optional[List[float]] = None) -> List[float]:
        """Per-slot conditional acceptance expected for this round."""
        return self.estimates.acceptance(confidence)

    def at(self, context: int) -> None:
        """Decoding has reached ``context`` cached positions: verify and draft
        costs grow with it, and with them the best cap falls.  (Recomputed
        every ``AT_STEP`` positions, not every round: the costs move little
        in between.)"""
        if self.now is self.cost or abs(context - self.now.context) >= AT_STEP:
            self.now = self.cost.at(context)

    def start(self) -> None:
        """A new generation: forget the streak of declined proposals and the
        last round's kind.  The estimates, the probe spacing, the typical
        confidences and whether rounds were drafting carry over, so that a
        good drafter drafts from a generation's first round; a new prompt
        whose confidences differ brings the reads back at its first judged
        round."""
        self.schedule.start()
        self.clock.start()
        self.now = self.cost
        self.plain_check = 0

    def should_draft(self) -> bool:
        """Whether the next round proposes at all: the running rates say
        drafting pays and the last proposals were not declined (a declined
        proposal costs a drafter run for nothing), or a probe is due.  A
        proposal is followed by ``choose``.  Never where drafts all kept
        would not pay (verifying K tokens costs K steps on a compute-bound
        target): calibrating and probing there only cost time.  (Checked
        after ``drafting``: a proposal worth verifying implies drafting can
        pay, and drafted rounds skip the check.)"""
        schedule = self.schedule
        if self.plain_check > 0 or (schedule.drafting and self.plain_check_due()):
            # Beyond the measured contexts, time plain steps where rounds run
            # before drafting on: undrafted rounds decode as fast as plain.
            if self.plain_check == 0:
                self.plain_check, self.checked_at = PLAIN_CHECK_ROUNDS, self.now.context
            self.plain_check -= 1
            return False
        if schedule.drafting:
            return True  # the last proposal was worth verifying: ``choose`` judges this one
        if self.now.best_cap(self.perfect, scale=self.time_scale) == 0:
            return False
        if schedule.due():
            return True
        if not schedule.stopped() and self.now.best_cap(self.estimates.rates(), scale=self.time_scale) > 0:
            return True
        schedule.wait()
        return False

    def plain_check_due(self) -> bool:
        """Whether plain steps were last timed too far from the current
        context beyond the measured ones (and no check began near it)."""
        context, clock = self.now.context, self.clock
        if not clock.stale(0, context):
            return False
        last = self.checked_at
        return last is None or abs(context - last) > max(STALE_POSITIONS, STALE_SHARE * context)

    def reads_confidence(self) -> bool:
        """Whether this round waits for its proposal's confidences before
        choosing the cap (else ``typical_confidence`` stands in for them, and
        ``judge`` judges them afterwards)."""
        return self.reads.reads()

    def typical_confidence(self) -> List[float]:
        """Each slot's confidence averaged over recent proposals."""
        return self.reads.typical()

    def proposal_length(self, limit: int) -> int:
        """How many drafts (of at most ``limit``) to ask of a drafter whose
        proposal costs one forward per draft (the cost model is
        ``sequential``), decided before it drafts: the cap ``choose`` would
        pick from the running rates, all of them when a probe is due.  0
        declines the round without running the drafter."""
        limit = min(limit, self.max_drafts)
        self.offered = limit
        if self.schedule.due():
            return limit
        cap = self.now.best_cap(self.estimates.rates(), limit=limit, scale=self.time_scale)
        if cap == 0:
            self.offered = None
            self.schedule.choose(0, limit)  # a declined proposal, as ``choose`` would have declined it
        return cap

    def choose(self, proposed: int, confidence: Optional[List[float]] = None) -> int:
        """How many of the ``proposed`` drafts to verify this round."""
        limit = min(proposed, self.max_drafts)
        estimates = self.estimates.acceptance(confidence)
        cap = self.now.best_cap(estimates, limit=limit, scale=self.time_scale)
        self.reads.chosen = (confidence, estimates, cap)  # ``judge`` judges the choice
        # A proposal cut short before drafting is judged against what it could have had.
        offered, self.offered = self.offered, None
        return min(self.schedule.choose(cap, max(limit, offered or 0), confidence), limit)

    def update(self, verified: int, accepted: int, confidence: Optional[List[float]] = None) -> None:
        """Record a round that verified ``verified`` drafts and kept the first
        ``accepted``; ``confidence``: the proposal's scores."""
        if verified == 0:
            return  # a declined proposal: the target judged no draft
        self.schedule.record(verified, accepted, confidence)
        self.estimates.record(verified, accepted, confidence)

    def judge(self, confidence: List[float], proposed: int) -> None:
        """Would reading the confidences of a proposal of ``proposed`` drafts
        before choosing its cap have paid?  Called with ``update``, before
        the next proposal is queued, so that it runs while the device
        computes."""
        limit = min(proposed, self.max_drafts)
        self.reads.judge(confidence, limit, self.now, self.time_scale, self.estimates.acceptance)

    def observe(self, drafts: int, elapsed_ms: float, proposed: Optional[bool] = None) -> None:
        """Record the wall time of a finished round (the caller's time between
        tokens excluded) that verified ``drafts`` drafts.  ``proposed``: the
        drafter ran (default: drafts > 0).  See ``RoundTimeScale.observe``."""
        self.clock.observe(self.now, drafts, elapsed_ms, drafts > 0 if proposed is None else proposed)
