"""The pre-serialized RecommendResponse parses to the message protobuf itself would build."""

from __future__ import annotations

import numpy as np
import pytest

from walkrank.serving.pipeline import RecommendOutput
from walkrank.serving.wire import encode_candidates, encode_response
from walkrank_client.pb.walkrank.v1 import recommender_pb2


def _output(pin_ids: np.ndarray, scores: np.ndarray, visits: np.ndarray) -> RecommendOutput:
    """An output whose walk scores are the scores reversed (some +0.0, -0.0, huge)."""
    return RecommendOutput(
        request_id="req-1",
        pin_ids=pin_ids,
        scores=scores.astype(np.float32),
        visits=visits.astype(np.int32),
        walk_scores=scores[::-1].astype(np.float64),
        model_version="3",
        unknown_query_pins=("x", "y"),
        empty_reason=None,
        timing_ms={"walk": 1.5, "features": 0.25, "scoring": 0.5, "total": 2.75},
        candidates_generated=2000,
    )


def _expected(tenant: str, output: RecommendOutput) -> recommender_pb2.RecommendResponse:
    """The response built field by field with protobuf (how the server did it before)."""
    return recommender_pb2.RecommendResponse(
        request_id=output.request_id,
        model_version=output.model_version,
        tenant=tenant,
        unknown_query_pins=list(output.unknown_query_pins),
        candidates_generated=output.candidates_generated,
        timing=recommender_pb2.Timing(walk_ms=1.5, features_ms=0.25, scoring_ms=0.5, total_ms=2.75),
        candidates=[
            recommender_pb2.Candidate(
                pin_id=str(p),
                score=float(s),
                visit_count=int(v),
                rank=r,
                walk_score=float(np.float32(w)),
                source=source,
                propensity=float(np.float32(q)),
            )
            for r, (p, s, v, w, source, q) in enumerate(
                zip(
                    output.pin_ids.tolist(),
                    output.scores.tolist(),
                    output.visits.tolist(),
                    output.walk_scores.tolist(),
                    [""] * len(output.pin_ids) if output.sources is None else output.sources,
                    [1.0] * len(output.pin_ids)
                    if output.propensities is None
                    else output.propensities.tolist(),
                    strict=True,
                ),
                start=1,
            )
        ],
    )


def _scores_and_visits(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    scores = rng.normal(0, 100, n).astype(np.float32)
    scores[::7] = 0.0
    scores[1::11] = -0.0
    scores[2::13] = np.float32(3.4e38)
    visits = rng.integers(0, 2**31 - 1, n)
    visits[::5] = 0
    visits[1::6] = rng.integers(1, 128, len(visits[1::6]))
    return scores, visits


@pytest.mark.parametrize("seed", range(3))
def test_integer_ids_parse_to_the_protobuf_message(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 700  # ranks past 127 take two varint bytes
    ids = rng.integers(-(2**62), 2**62, n)
    ids[:7] = [0, 7, -1, -10, 10**18, np.iinfo(np.int64).max, np.iinfo(np.int64).min]
    scores, visits = _scores_and_visits(rng, n)
    output = _output(ids, scores, visits)
    parsed = recommender_pb2.RecommendResponse.FromString(encode_response("homefeed", output))
    assert parsed == _expected("homefeed", output)
    unsigned = _output(np.abs(ids[1:]).astype(np.uint64), scores[1:], visits[1:])
    parsed = recommender_pb2.RecommendResponse.FromString(encode_response("homefeed", unsigned))
    assert parsed == _expected("homefeed", unsigned)


def test_text_ids_of_any_length_and_script_parse_to_the_protobuf_message() -> None:
    rng = np.random.default_rng(4)
    ids = np.array(["a", "pin-42", "ピン", "ü" * 70, "x" * 300, "board/pin 9", "é"])
    scores, visits = _scores_and_visits(rng, len(ids))
    output = _output(ids, scores, visits)
    parsed = recommender_pb2.RecommendResponse.FromString(encode_response("related", output))
    assert parsed == _expected("related", output)
    assert parsed.candidates[4].pin_id == "x" * 300  # a length that needs a 2-byte varint


def test_candidates_are_byte_identical_to_protobuf() -> None:
    """Same fields, same order, same defaults left out (+0.0 scores, walk scores and 0
    visits)."""
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 10**12, 300)
    scores, visits = _scores_and_visits(rng, 300)
    sources = np.where(rng.random(300) < 0.3, "trending_now", "")  # "": the walk's
    propensities = np.where(rng.random(300) < 0.5, 0.25, 0.0)  # 0 (never returned) left out
    output = RecommendOutput(
        **{
            **_output(ids, scores, visits).__dict__,
            "sources": sources,
            "propensities": propensities,
        }
    )
    only_candidates = recommender_pb2.RecommendResponse(
        candidates=_expected("t", output).candidates
    ).SerializeToString()
    encoded = encode_candidates(
        ids.astype(np.bytes_).view(np.uint8).reshape(300, -1),
        scores.view(np.uint32),
        visits.astype(np.uint32),
        scores[::-1].copy().view(np.uint32),
        sources.astype(np.bytes_).view(np.uint8).reshape(300, -1),
        propensities.astype(np.float32).view(np.uint32),
    )
    assert encoded.tobytes() == only_candidates


def test_no_candidates() -> None:
    output = _output(np.empty(0, np.int64), np.empty(0), np.empty(0))
    output = RecommendOutput(**{**output.__dict__, "empty_reason": "all query pins unknown"})
    parsed = recommender_pb2.RecommendResponse.FromString(encode_response("t", output))
    assert len(parsed.candidates) == 0 and parsed.empty_reason == "all query pins unknown"
    assert parsed.request_id == "req-1" and parsed.candidates_generated == 2000
