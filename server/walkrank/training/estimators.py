"""Off-policy estimates and bootstrap intervals, in plain numpy.

A ranker's online metric (what share of the pins it returns the full ranker shows, how many
actions per returned pin) can only be read off requests where its pins could be shown. On
exploration traffic (`walkrank.experiments`, policy `shuffle_top`) every candidate had a known
probability `p` of being returned, so a ranker `T` that would have returned its top R pins is
estimated by weighting each returned pin of its top R by 1/p:

- IPS: sum over requests of sum_{i in T, returned} y_i / p_i, over the number of pins T
  returns: unbiased for "outcomes per returned pin" when every pin of T had p > 0;
- self-normalised IPS (SNIPS): the same sum over sum_{i in T, returned} 1 / p_i: slightly
  biased, much less variable (no weight blows up the ratio);
- naive: sum_{i in T} y_i over the number of pins T returns, with the labels as logged: on
  requests served by another ranker, T's pins that were not returned count as failures; this
  is what an evaluation on logged traffic measures, and why it is biased.

Per-pin estimates ignore that the client shows a limited number of pins per request (its
`slots`), out of ours and other sources' candidates: a ranker's good pins compete with each
other for those slots, while exploration's random sets rarely hold two. The slots-aware
estimate ("slate") replays that competition for outcomes that happen only on shown pins
(impressions, actions), on the client's own scores (the `score` of its impression events):

- a request's shown pins beat every unshown one; on an exploration request the other
  sources' shown pins (slots minus ours shown) are taken to score like our shown pins in that
  request (both are winners among random sets), so above any score the request has
  (slots - k) / k of theirs per one of ours;
- a ranker T's pins that would beat a given score, per returned pin, are estimated by SNIPS
  over all exploration requests, each shown pin of T placed at its score relative to its
  request's shown pins (the client's score minus their mean: requests differ by a shift);
- each request's slots are then filled from the top, T's pooled pins (shifted to that
  request) against the other sources' pins of that request, until the slots are full: T keeps
  the outcomes of its pins above that line. When T's and the other sources' pins above the
  request's lowest shown score do not fill the slots (T weaker than the logged sets), T
  takes the share of the slots left that our pins took in that request, with the outcomes of
  its next pins down the pooled curve.

A shown pin's outcome (for actions) is read from its client score: the mean outcome of our
shown pins in the same decile of client scores, over all exploration requests, rather than its
own few events, which would make the estimate hang on a handful of actions. That assumes the
client's score says all a ranker knows about a shown pin's chance of an action; a ranker that
knows more is underrated. Unscored pins keep their own outcomes.

A random ranker like the logging policy gets about the logged outcomes back. Without
scores every shown pin sits at its request's mean, and the estimate becomes the proportional
one: slots shared among contenders, ours as likely to win one as theirs, which underrates a
strong ranker. Assumptions: a fixed number of slots (by default, the most of our pins the
client showed in one request), the client showing its best-scored pins, other sources' shown
pins scoring like ours in the same request (where theirs score lower, the estimate leans low
for a strong ranker; higher, high), and requests whose scores differ by a shift. A request
where none of our pins was shown gives T nothing (nothing says how far above ours theirs were).

Intervals are percentile bootstraps over requests (or users: any unit whose outcomes move
together): the units are resampled with replacement, the ratio recomputed, and the 2.5th and
97.5th percentiles kept. Two rankers compared on the same requests are resampled together
(paired), so their shared noise cancels in the lift.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SAMPLES = 1000
LEVEL = 0.95
# Fewer exploration requests than this: an estimate is reported with its interval but flagged
# as too few to read (its interval, not its value, is the information).
MIN_EXPLORED_REQUESTS = 30
_BLOCK = 50  # resamples drawn at once: bounds memory at 50 x units integers
GRID = 256  # score levels the slots-aware estimate fills slots on
OUTCOME_BINS = 10  # client-score bins (deciles) a shown pin's expected outcome is read from
_CELLS = 2_000_000  # resamples x requests x levels per bootstrap block of that estimate


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval (NaN when undefined)."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float | None]:
        return {k: _finite(getattr(self, k)) for k in ("value", "low", "high")}

    def excludes(self, point: float) -> bool:
        return self.low > point or self.high < point

    def __str__(self) -> str:
        if not math.isfinite(self.value):
            return "n/a"
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.asarray(den) > 0, np.asarray(num) / np.asarray(den), np.nan)


def _resamples(units: int, samples: int, seed: int, block: int = _BLOCK) -> Iterator[np.ndarray]:
    """Blocks of bootstrap counts: how often each unit is drawn, `units` draws each."""
    rng = np.random.default_rng(seed)
    pvals = np.full(units, 1.0 / units)
    done = 0
    while done < samples:
        size = min(block, samples - done)
        yield rng.multinomial(units, pvals, size=size).astype(np.float64)
        done += size


def _percentiles(draws: np.ndarray, level: float) -> tuple[float, float]:
    draws = draws[np.isfinite(draws)]
    if not len(draws):
        return math.nan, math.nan
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def _product(sums: tuple[np.ndarray | float, ...]) -> np.ndarray:
    """The estimate from its terms' sums: the product of the ratios sums[0]/sums[1],
    sums[2]/sums[3], ... (one ratio for IPS and SNIPS; two for the slots-aware estimate)."""
    value = np.asarray(1.0)
    for k in range(0, len(sums), 2):
        value = value * _ratio(sums[k], sums[k + 1])
    return value


def _terms(terms: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    out = tuple(np.asarray(t, np.float64) for t in terms)
    if len(out) % 2 or not out:
        raise ValueError(f"an estimate's terms come in (numerator, denominator) pairs: {len(out)}")
    return out


# An estimate as a function of bootstrap counts (rows x units) -> one value per row: the counts
# are how often each unit (request, user) is drawn; all ones gives the estimate itself.
Statistic = Callable[[np.ndarray], np.ndarray]


def _of_sums(terms: tuple[np.ndarray, ...]) -> Statistic:
    """The product of ratios of sums (`_product`) as a statistic."""
    return lambda counts: _product(tuple(counts @ t for t in terms))


def _block(statistic: Statistic) -> int:
    """Resamples drawn at once: fewer when one row of the statistic is large."""
    cells = getattr(statistic, "cells", 0)
    return max(1, min(_BLOCK, _CELLS // cells)) if cells else _BLOCK


def statistic_interval(
    statistic: Statistic,
    units: int,
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> Interval:
    """A statistic over `units` units with its percentile bootstrap interval."""
    if units == 0:
        return Interval(math.nan, math.nan, math.nan)
    value = float(np.asarray(statistic(np.ones((1, units)))).reshape(-1)[0])
    draws = np.concatenate(
        [statistic(c) for c in _resamples(units, samples, seed, _block(statistic))]
    )
    return Interval(value, *_percentiles(draws, level))


def statistic_lift(
    a: Statistic,
    b: Statistic,
    units: tuple[int, int],
    *,
    paired: bool,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> Interval:
    """Relative change of statistic b over statistic a. `paired`: both are measured on the
    same units (resampled together); otherwise on independent groups (each on its own)."""
    if 0 in units:
        return Interval(math.nan, math.nan, math.nan)

    def lift(ca: np.ndarray, cb: np.ndarray) -> np.ndarray:
        return _ratio(b(cb), a(ca)) - 1

    value = float(lift(np.ones((1, units[0])), np.ones((1, units[1])))[0])
    block = min(_block(a), _block(b))
    if paired:
        draws = [lift(c, c) for c in _resamples(units[0], samples, seed, block)]
    else:
        blocks_b = _resamples(units[1], samples, seed + 1, block)
        draws = [
            lift(ca, cb)
            for ca, cb in zip(_resamples(units[0], samples, seed, block), blocks_b, strict=True)
        ]
    return Interval(value, *_percentiles(np.concatenate(draws), level))


def ratio_interval(
    num: np.ndarray,
    den: np.ndarray,
    *more: np.ndarray,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> Interval:
    """sum(num) / sum(den) over units (times sum(more[0]) / sum(more[1]) ... when given),
    with a bootstrap interval over the units."""
    terms = _terms((num, den, *more))
    return statistic_interval(
        _of_sums(terms), len(terms[0]), samples=samples, seed=seed, level=level
    )


def lift_interval(
    a: tuple[np.ndarray, ...],
    b: tuple[np.ndarray, ...],
    *,
    paired: bool,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> Interval:
    """Relative change of estimate b over estimate a, each given by its terms as for
    `ratio_interval` ((num, den): sum num / sum den). `paired`: a and b are measured on the
    same units (resampled together); otherwise on independent groups (each on its own)."""
    ta, tb = _terms(a), _terms(b)
    return statistic_lift(
        _of_sums(ta),
        _of_sums(tb),
        (len(ta[0]), len(tb[0])),
        paired=paired,
        samples=samples,
        seed=seed,
        level=level,
    )


# --- rankers replayed on logged requests --------------------------------------------------------


def rank_positions(request: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort rows by request, then key descending (row order breaks ties); returns the order
    and each sorted row's 0-based position within its request."""
    n = len(request)
    order = np.lexsort((np.arange(n), -key, request))
    sorted_request = request[order]
    starts = np.flatnonzero(np.r_[True, sorted_request[1:] != sorted_request[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, n]))
    return order, np.arange(n) - first


def top_sets(request: np.ndarray, scores: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Rows a ranker with these scores would return: the `size[r]` best of request r."""
    order, position = rank_positions(request, np.asarray(scores, np.float64))
    chosen = np.zeros(len(request), dtype=bool)
    chosen[order] = position < size[request[order]]
    return chosen


@dataclass(frozen=True)
class PolicyTerms:
    """Per-request sums of one ranker's estimate (units = requests, numbered 0..m-1)."""

    ips: np.ndarray  # sum over its returned-and-logged pins of y / p
    weight: np.ndarray  # sum over the same pins of 1 / p (SNIPS denominator)
    naive: np.ndarray  # sum over its pins of y as logged (unreturned pins count 0)
    size: np.ndarray  # the number of pins it returns


def policy_terms(
    request: np.ndarray,
    y: np.ndarray,
    propensity: np.ndarray,
    returned: np.ndarray,
    chosen: np.ndarray,
    m: int,
) -> PolicyTerms:
    """The per-request sums for a ranker that returns the rows marked `chosen`. Rows whose
    propensity is 0 (never returnable) add nothing to IPS: a ranker choosing them is not
    covered by the logging policy, which `support` measures."""
    seen = chosen & returned & (propensity > 0)
    inverse = np.where(seen, 1.0 / np.where(propensity > 0, propensity, 1.0), 0.0)
    y = np.asarray(y, np.float64)
    return PolicyTerms(
        ips=np.bincount(request, weights=y * inverse, minlength=m),
        weight=np.bincount(request, weights=inverse, minlength=m),
        naive=np.bincount(request, weights=y * chosen, minlength=m),
        size=np.bincount(request, weights=chosen, minlength=m),
    )


@dataclass(frozen=True)
class SlateReplay:
    """One ranker's slots-aware estimate as a function of bootstrap counts over requests:
    per-request sums that pool into T's score curve, and each request's own competition."""

    above: np.ndarray  # (requests, GRID): T's shown pins at or above each level, weighted 1/p
    above_bins: np.ndarray  # (requests, OUTCOME_BINS, GRID): the same by bin of client score
    above_unscored: np.ndarray  # (requests, GRID): T's unscored shown pins, weighted y / p
    bin_y: np.ndarray  # (requests, OUTCOME_BINS): outcomes of our shown pins by score bin
    bin_n: np.ndarray  # (requests, OUTCOME_BINS): our shown pins by score bin
    weight: np.ndarray  # (requests,): sum of 1/p over T's returned pins (SNIPS denominator)
    size: np.ndarray  # (requests,): pins T returns
    others: np.ndarray  # (requests, GRID): other sources' shown pins at or above each level
    lowest: np.ndarray  # (requests,): first level at or below the request's lowest shown pin
    share: np.ndarray  # (requests,): share of the slots our pins took (0: none shown)
    slots: int

    @property
    def cells(self) -> int:
        """Size of one bootstrap row's work (requests x levels): bounds the block drawn."""
        return len(self.size) * self.above.shape[1]

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        """The estimate for each row of bootstrap counts (rows x requests): outcomes of T's
        pins that win a slot, per returned pin."""
        counts = np.atleast_2d(counts)
        weight = counts @ self.weight
        curve = _ratio((counts @ self.above).T, weight).T  # T's pins above a level, per pin
        # A shown pin's outcome: the mean outcome of our shown pins with client scores like
        # its own (what the client predicts), rather than its own few noisy events.
        rate = np.nan_to_num(_ratio(counts @ self.bin_y, counts @ self.bin_n))
        binned = (counts @ self.above_bins.reshape(len(self.size), -1)).reshape(
            len(counts), *self.above_bins.shape[1:]
        )
        expected = np.einsum("rb,rbg->rg", rate, binned) + counts @ self.above_unscored
        curve_y = _ratio(expected.T, weight).T
        curve, curve_y = np.nan_to_num(curve), np.nan_to_num(curve_y)
        ours = self.size[None, :, None] * curve[:, None, :]
        filled = ours + self.others[None, :, :]
        level = np.arange(curve.shape[1])
        reached = (filled >= self.slots) & (level[None, None, :] <= self.lowest[None, :, None])
        hit = reached.any(axis=2)
        j = np.where(hit, reached.argmax(axis=2), self.lowest[None, :])
        rows = np.arange(len(counts))[:, None]
        last = np.full_like(j, curve.shape[1] - 1)

        def at(values: np.ndarray, index: np.ndarray) -> np.ndarray:
            """values[row, index] per request, 0 above the first level."""
            return np.where(index >= 0, values[rows, np.maximum(index, 0)], 0.0)

        fill_j = np.take_along_axis(filled, j[..., None], axis=2)[..., 0]
        fill_before = np.where(
            j > 0, np.take_along_axis(filled, np.maximum(j - 1, 0)[..., None], axis=2)[..., 0], 0.0
        )
        step = np.clip(_ratio(self.slots - fill_before, fill_j - fill_before), 0.0, 1.0)
        step = np.nan_to_num(step, nan=1.0)
        won_y = at(curve_y, j - 1) + step * (at(curve_y, j) - at(curve_y, j - 1))
        # Slots left when both sides' pins above the request's lowest shown score run out:
        # T's share of them goes to its next pins down the pooled curve.
        left = np.where(hit, 0.0, np.maximum(self.slots - fill_j, 0.0) * self.share[None, :])
        goal = at(curve, j) + np.nan_to_num(_ratio(left, self.size[None, :]))
        below = (curve[:, None, :] >= goal[..., None]) & (level[None, None, :] >= j[..., None])
        found = below.any(axis=2) & (left > 0)
        k = np.where(found, below.argmax(axis=2), last)
        before, after = at(curve, k - 1), at(curve, k)
        part = np.nan_to_num(np.clip(_ratio(goal - before, after - before), 0.0, 1.0))
        rate = np.nan_to_num(_ratio(at(curve_y, last), at(curve, last)))
        next_y = np.where(
            found,
            at(curve_y, k - 1) + part * (at(curve_y, k) - at(curve_y, k - 1)),
            at(curve_y, last) + (goal - at(curve, last)) * rate,
        )
        outcome = self.size[None, :] * np.where(hit, won_y, next_y)
        outcome = np.where(self.share[None, :] > 0, outcome, 0.0)
        return _ratio((counts * outcome).sum(axis=1), counts @ self.size)


def _score_scale(client_score: np.ndarray | None, n: int) -> np.ndarray:
    """The client's scores on the scale where requests differ by a shift: as log-odds when
    every reported score lies in [0, 1] (a probability), else as reported; NaN where none."""
    if client_score is None:
        return np.full(n, np.nan)
    score = np.asarray(client_score, np.float64)
    finite = score[np.isfinite(score)]
    if len(finite) and finite.min() >= 0.0 and finite.max() <= 1.0:
        clipped = np.clip(score, 1e-6, 1.0 - 1e-6)
        return np.log(clipped / (1.0 - clipped))
    return score


def slate_replay(
    request: np.ndarray,
    y: np.ndarray,
    impressed: np.ndarray,
    propensity: np.ndarray,
    returned: np.ndarray,
    chosen: np.ndarray,
    m: int,
    slots: int,
    client_score: np.ndarray | None = None,
) -> SlateReplay:
    """The slots-aware estimate (module docstring) of a ranker returning the rows marked
    `chosen`, `y` happening only on shown pins; `client_score` is the client's score of each
    shown pin (NaN or None where it reported none: the pin sits at its request's mean)."""
    shown = np.asarray(impressed, dtype=bool) & np.asarray(returned, dtype=bool)
    seen = chosen & returned & (propensity > 0)
    inverse = np.where(seen, 1.0 / np.where(propensity > 0, propensity, 1.0), 0.0)
    k = np.bincount(request, weights=shown, minlength=m)
    score = _score_scale(client_score, len(request))
    present = shown & np.isfinite(score)
    mean = _ratio(
        np.bincount(request, weights=np.where(present, score, 0.0), minlength=m),
        np.bincount(request, weights=present, minlength=m),
    )
    z = np.where(present, score - np.nan_to_num(mean)[request], 0.0)
    top, bottom = (z[shown].max(), z[shown].min()) if shown.any() else (0.0, 0.0)
    levels = np.linspace(top, bottom, GRID)
    # Level index of each shown pin: the first level at or below its score.
    index = np.searchsorted(-levels, -z, side="left")
    at_or_above = np.zeros((m, GRID))
    theirs = np.zeros((m, GRID))
    rows = np.flatnonzero(shown)
    np.add.at(at_or_above, (request[rows], index[rows]), inverse[rows])
    y = np.asarray(y, np.float64)
    scored = rows[present[rows]]
    edges = (
        np.quantile(score[scored], np.linspace(0, 1, OUTCOME_BINS + 1)[1:-1]) if len(scored) else []
    )
    bins = np.searchsorted(edges, np.nan_to_num(score))
    above_bins = np.zeros((m, OUTCOME_BINS, GRID))
    np.add.at(above_bins, (request[scored], bins[scored], index[scored]), inverse[scored])
    above_unscored = np.zeros((m, GRID))
    unscored = rows[~present[rows]]
    np.add.at(above_unscored, (request[unscored], index[unscored]), (inverse * y)[unscored])
    bin_y = np.zeros((m, OUTCOME_BINS))
    bin_n = np.zeros((m, OUTCOME_BINS))
    np.add.at(bin_y, (request[scored], bins[scored]), y[scored])
    np.add.at(bin_n, (request[scored], bins[scored]), 1.0)
    np.add.at(theirs, (request[rows], index[rows]), 1.0)
    per_ours = np.nan_to_num(_ratio(np.maximum(slots - k, 0.0), k))
    lowest = np.zeros(m, dtype=np.int64)
    np.maximum.at(lowest, request[rows], index[rows])
    return SlateReplay(
        above=np.cumsum(at_or_above, axis=1),
        above_bins=np.cumsum(above_bins, axis=2),
        above_unscored=np.cumsum(above_unscored, axis=1),
        bin_y=bin_y,
        bin_n=bin_n,
        weight=np.bincount(request, weights=inverse, minlength=m),
        size=np.bincount(request, weights=chosen, minlength=m),
        others=np.cumsum(theirs, axis=1) * per_ours[:, None],
        lowest=lowest,
        share=np.minimum(k, slots) / slots,
        slots=slots,
    )


def support(request: np.ndarray, propensity: np.ndarray, chosen: np.ndarray) -> float:
    """Share of a ranker's pins the logging policy could have returned (p > 0): IPS is
    unbiased only at 1."""
    total = chosen.sum()
    return float((chosen & (propensity > 0)).sum() / total) if total else math.nan


@dataclass(frozen=True)
class PolicyComparison:
    """Two rankers estimated on the same exploration requests: per-ranker IPS, SNIPS and
    naive values with intervals, and the lift of b over a under each estimator."""

    requests: int
    a: dict[str, Interval]
    b: dict[str, Interval]
    lift: dict[str, Interval]
    support: dict[str, float]
    slots: int | None = None  # the client's slots per request, when "slate" was estimated

    @property
    def enough(self) -> bool:
        """Whether there are enough requests to read the values (else read the intervals)."""
        return self.requests >= MIN_EXPLORED_REQUESTS

    def to_dict(self, a_name: str, b_name: str) -> dict[str, object]:
        return {
            "requests": self.requests,
            "enough_requests": self.enough,
            "slots": self.slots,
            a_name: {k: v.to_dict() for k, v in self.a.items()},
            b_name: {k: v.to_dict() for k, v in self.b.items()},
            "lift": {k: v.to_dict() for k, v in self.lift.items()},
            "support": {a_name: _finite(self.support["a"]), b_name: _finite(self.support["b"])},
        }


SLATE = "slate"


def compare_policies(
    request: np.ndarray,
    y: np.ndarray,
    propensity: np.ndarray,
    returned: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    *,
    impressed: np.ndarray | None = None,
    slots: int | None = None,
    client_score: np.ndarray | None = None,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> PolicyComparison:
    """Outcome `y` per returned pin for rankers a and b, each returning as many pins as the
    logged request did, on the logged requests (numbered 0..m-1), paired bootstrap. With
    `impressed` and the client's `slots` per request, also the slots-aware estimate
    ("slate"), for outcomes that happen only on shown pins, on the client's scores of its
    shown pins (`client_score`, NaN where none was reported)."""
    request = np.asarray(request, np.int64)
    m = int(request.max()) + 1 if len(request) else 0
    size = np.bincount(request, weights=returned, minlength=m).astype(np.int64)
    chosen_a = top_sets(request, scores_a, size)
    chosen_b = top_sets(request, scores_b, size)
    terms_a = policy_terms(request, y, propensity, returned, chosen_a, m)
    terms_b = policy_terms(request, y, propensity, returned, chosen_b, m)
    if slots is not None and slots < 1:
        raise ValueError(f"slots must be at least 1, got {slots}")

    def statistics(t: PolicyTerms, chosen: np.ndarray) -> dict[str, Statistic]:
        out = {
            "ips": _of_sums(_terms((t.ips, t.size))),
            "snips": _of_sums(_terms((t.ips, t.weight))),
            "naive": _of_sums(_terms((t.naive, t.size))),
        }
        if impressed is not None and slots is not None:
            out[SLATE] = slate_replay(
                request, y, impressed, propensity, returned, chosen, m, slots, client_score
            )
        return out

    sa, sb = statistics(terms_a, chosen_a), statistics(terms_b, chosen_b)
    boot = {"samples": samples, "seed": seed}
    return PolicyComparison(
        requests=m,
        a={k: statistic_interval(v, m, **boot) for k, v in sa.items()},
        b={k: statistic_interval(v, m, **boot) for k, v in sb.items()},
        lift={k: statistic_lift(sa[k], sb[k], (m, m), paired=True, **boot) for k in sa},
        support={
            "a": support(request, propensity, chosen_a),
            "b": support(request, propensity, chosen_b),
        },
        slots=slots if SLATE in sa else None,
    )
