"""What a request adds to the walk's candidates: its declared features and extra candidates.

A request's `features` map feeds the tenant's `request.<name>` features: a name the tenant
does not list is refused (INVALID_ARGUMENT naming it), so a typo never silently serves the
default, and values must be finite. `extra_candidates` come from the client's other
generators: they join the walk's candidates with walk features 0 and their source, so one
model ranks every generator's candidates (docs/features.md).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import numpy as np

from walkrank.features import WALK_SOURCE, CandidateSources, request_feature_names
from walkrank.graph.store import GraphStore
from walkrank.serving.errors import InvalidArgument
from walkrank.tenants import TenantConfig
from walkrank.walks.engine import WalkResult

#: The most extra candidates one request may carry: each costs a feature row and a score.
MAX_EXTRA_CANDIDATES = 1_000
SOURCE_RE = re.compile(r"[A-Za-z0-9_]{1,64}")


def request_features(
    features: Sequence[tuple[str, float]], config: TenantConfig
) -> dict[str, float]:
    """The request's `features` map checked against the tenant's `request.<name>` features."""
    declared = request_feature_names(config.features)
    out = {}
    for name, value in features:
        field = f"features[{name[:64]!r}]"
        if name not in declared:
            listed = ", ".join(sorted(declared)) or "none"
            raise InvalidArgument(
                field,
                f"not a request feature of tenant {config.name!r} "
                f"(it declares request.<name> features: {listed})",
            )
        if not math.isfinite(value):
            raise InvalidArgument(field, f"must be a finite number, got {value!r}")
        out[name] = float(value)
    return out


def check_extra_candidates(extras: Sequence[tuple[str, str]]) -> None:
    """InvalidArgument naming the first bad extra candidate (or too many of them)."""
    if len(extras) > MAX_EXTRA_CANDIDATES:
        raise InvalidArgument(
            "extra_candidates", f"{len(extras)} given, at most {MAX_EXTRA_CANDIDATES}"
        )
    for i, (pin_id, source) in enumerate(extras):
        if not pin_id:
            raise InvalidArgument(f"extra_candidates[{i}].pin_id", "empty")
        if not SOURCE_RE.fullmatch(source) or source == WALK_SOURCE:
            raise InvalidArgument(
                f"extra_candidates[{i}].source",
                f"{source[:80]!r} is not a source name (1-64 of A-Z, a-z, 0-9, _; "
                f"not {WALK_SOURCE!r})",
            )


def add_extra_candidates(
    graph: GraphStore,
    result: WalkResult,
    extras: Sequence[tuple[str, str]],
    skip: np.ndarray,
) -> tuple[WalkResult, CandidateSources]:
    """The walk's candidates followed by the extra ones, and each one's source.

    Extra pins unknown to the graph, already among the walk's candidates, in `skip` (dense
    ids: excluded pins) or repeated (the first one counts) are left out. Their walk scores,
    visits and query hits are 0; their degree is the graph's.
    """
    dense = graph.pin_index([pin for pin, _ in extras])
    names = sorted({source for _, source in extras})
    source_code = {name: code for code, name in enumerate(names, start=1)}
    codes = np.array([source_code[source] for _, source in extras], dtype=np.int16)
    keep = (dense >= 0) & ~np.isin(dense, result.pins) & ~np.isin(dense, skip)
    first = np.zeros(len(extras), dtype=bool)
    first[np.unique(dense, return_index=True)[1]] = True
    keep &= first
    pins = dense[keep]
    zeros = np.zeros(pins.size)
    degree = graph.pin_degrees(pins).astype(result.degree.dtype)  # real-time edges too
    merged = dataclasses.replace(
        result,
        pins=np.concatenate([result.pins, pins]),
        scores=np.concatenate([result.scores, zeros.astype(result.scores.dtype)]),
        visits=np.concatenate([result.visits, zeros.astype(result.visits.dtype)]),
        query_hits=np.concatenate([result.query_hits, zeros.astype(result.query_hits.dtype)]),
        degree=np.concatenate([result.degree, degree]),
    )
    sources = CandidateSources(
        names=(WALK_SOURCE, *names),
        codes=np.concatenate([np.zeros(result.pins.size, dtype=np.int16), codes[keep]]),
    )
    return merged, sources
