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
(impressions, actions). On an exploration request, a pin that was shown beat the client's
threshold for that logged set; T's pins that would beat it number about `above` = (T's pins)
x (SNIPS share of T's logged pins that were shown), and the other sources' pins that beat it
`others` = slots - (returned pins shown). The client fills its slots from those contenders;
taking ours and theirs as equally likely to win one, T's pins keep their outcomes in
proportion slots / (above + others). The estimate is SNIPS times (sum of slots) / (sum of
above + others) over the requests: a ratio of sums rather than a per-request share, which the
few logged pins of T in one request would make noisy and (the share being concave in them)
biased low. For T = the logged set it gives the logged outcomes back. Assumptions: a fixed
number of slots (by default, the most of our pins the client showed in one request), and
winners among the contenders as likely ours as theirs (a strong T's pins beat the threshold by
more than other sources' do, which this does not see).

Intervals are percentile bootstraps over requests (or users: any unit whose outcomes move
together): the units are resampled with replacement, the ratio recomputed, and the 2.5th and
97.5th percentiles kept. Two rankers compared on the same requests are resampled together
(paired), so their shared noise cancels in the lift.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SAMPLES = 1000
LEVEL = 0.95
# Fewer exploration requests than this: an estimate is reported with its interval but flagged
# as too few to read (its interval, not its value, is the information).
MIN_EXPLORED_REQUESTS = 30
_BLOCK = 50  # resamples drawn at once: bounds memory at 50 x units integers


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


def _resamples(units: int, samples: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of bootstrap counts: how often each unit is drawn, `units` draws each."""
    rng = np.random.default_rng(seed)
    pvals = np.full(units, 1.0 / units)
    done = 0
    while done < samples:
        block = min(_BLOCK, samples - done)
        yield rng.multinomial(units, pvals, size=block).astype(np.float64)
        done += block


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
    value = float(_product(tuple(t.sum() for t in terms)))
    if len(terms[0]) == 0:
        return Interval(math.nan, math.nan, math.nan)
    draws = np.concatenate(
        [_product(tuple(c @ t for t in terms)) for c in _resamples(len(num), samples, seed)]
    )
    return Interval(value, *_percentiles(draws, level))


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

    def lift(sa: tuple[np.ndarray | float, ...], sb: tuple[np.ndarray | float, ...]) -> np.ndarray:
        return _ratio(_product(sb), _product(sa)) - 1

    value = float(lift(tuple(t.sum() for t in ta), tuple(t.sum() for t in tb)))
    if len(ta[0]) == 0 or len(tb[0]) == 0:
        return Interval(math.nan, math.nan, math.nan)
    draws = []
    if paired:
        for c in _resamples(len(ta[0]), samples, seed):
            draws.append(lift(tuple(c @ t for t in ta), tuple(c @ t for t in tb)))
    else:
        blocks_b = _resamples(len(tb[0]), samples, seed + 1)
        for ca, cb in zip(_resamples(len(ta[0]), samples, seed), blocks_b, strict=True):
            draws.append(lift(tuple(ca @ t for t in ta), tuple(cb @ t for t in tb)))
    return Interval(value, *_percentiles(np.concatenate(draws), level))


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


def slate_terms(
    request: np.ndarray,
    y: np.ndarray,
    impressed: np.ndarray,
    propensity: np.ndarray,
    returned: np.ndarray,
    chosen: np.ndarray,
    m: int,
    slots: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-request terms of the slots-aware estimate (module docstring) for a ranker returning
    the rows marked `chosen`, `y` happening only on shown pins: SNIPS's (sum y/p, sum 1/p)
    and (slots, contenders), whose ratio of sums scales it."""
    seen = chosen & returned & (propensity > 0)
    inverse = np.where(seen, 1.0 / np.where(propensity > 0, propensity, 1.0), 0.0)
    shown = np.asarray(impressed, dtype=bool)
    weight = np.bincount(request, weights=inverse, minlength=m)
    size = np.bincount(request, weights=chosen, minlength=m)
    shown_share = _ratio(np.bincount(request, weights=inverse * shown, minlength=m), weight)
    above = np.nan_to_num(size * shown_share)
    others = np.maximum(slots - np.bincount(request, weights=shown & returned, minlength=m), 0.0)
    # A request where the ranker's pins were never returned says nothing about its contenders.
    covered = weight > 0
    y = np.asarray(y, np.float64)
    return (
        np.bincount(request, weights=y * inverse, minlength=m),
        weight,
        np.where(covered, float(slots), 0.0),
        np.where(covered, above + others, 0.0),
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


ESTIMATORS = ("ips", "snips", "naive")
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
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> PolicyComparison:
    """Outcome `y` per returned pin for rankers a and b, each returning as many pins as the
    logged request did, on the logged requests (numbered 0..m-1), paired bootstrap. With
    `impressed` and the client's `slots` per request, also the slots-aware estimate
    ("slate"), for outcomes that happen only on shown pins."""
    request = np.asarray(request, np.int64)
    m = int(request.max()) + 1 if len(request) else 0
    size = np.bincount(request, weights=returned, minlength=m).astype(np.int64)
    chosen_a = top_sets(request, scores_a, size)
    chosen_b = top_sets(request, scores_b, size)
    terms_a = policy_terms(request, y, propensity, returned, chosen_a, m)
    terms_b = policy_terms(request, y, propensity, returned, chosen_b, m)

    estimators = ESTIMATORS if impressed is None or slots is None else (*ESTIMATORS, SLATE)
    if slots is not None and slots < 1:
        raise ValueError(f"slots must be at least 1, got {slots}")

    def pairs(t: PolicyTerms, chosen: np.ndarray) -> dict[str, tuple[np.ndarray, ...]]:
        out: dict[str, tuple[np.ndarray, ...]] = {
            "ips": (t.ips, t.size),
            "snips": (t.ips, t.weight),
            "naive": (t.naive, t.size),
        }
        if SLATE in estimators:
            assert impressed is not None and slots is not None
            out[SLATE] = slate_terms(request, y, impressed, propensity, returned, chosen, m, slots)
        return out

    pa_, pb_ = pairs(terms_a, chosen_a), pairs(terms_b, chosen_b)
    return PolicyComparison(
        requests=m,
        a={k: ratio_interval(*pa_[k], samples=samples, seed=seed) for k in estimators},
        b={k: ratio_interval(*pb_[k], samples=samples, seed=seed) for k in estimators},
        lift={
            k: lift_interval(pa_[k], pb_[k], paired=True, samples=samples, seed=seed)
            for k in estimators
        },
        support={
            "a": support(request, propensity, chosen_a),
            "b": support(request, propensity, chosen_b),
        },
        slots=slots if SLATE in estimators else None,
    )
