"""RecommendResponse on the wire: the candidates pre-serialized by a numba kernel.

Building 500 `Candidate` protobuf objects in Python held the GIL for about a third of a
served home-feed call (py-spy, 8 server threads), the largest serial cost on the request
path. The response is instead assembled as bytes: the small message without candidates,
serialized by protobuf, followed by the `candidates` field (repeated, field 2) encoded here.
Protobuf parsers merge concatenated fields, so clients read the very same message. The
Recommender's handlers are registered with a serializer that passes those bytes through.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
from google.protobuf import message_factory
from numba import njit

from walkrank.serving.pipeline import RecommendOutput
from walkrank_client.pb.walkrank.v1 import recommender_pb2

# Wire tags: (field number << 3) | wire type (0 varint, 2 length-delimited, 5 fixed32).
_CANDIDATES_TAG = 0x12  # RecommendResponse.candidates = 2, length-delimited
_PIN_ID_TAG = 0x0A  # Candidate.pin_id = 1, length-delimited
_SCORE_TAG = 0x15  # Candidate.score = 2, fixed32
_VISIT_COUNT_TAG = 0x18  # Candidate.visit_count = 3, varint
_RANK_TAG = 0x20  # Candidate.rank = 4, varint
_WALK_SCORE_TAG = 0x2D  # Candidate.walk_score = 5, fixed32
_SOURCE_TAG = 0x32  # Candidate.source = 6, length-delimited
_PROPENSITY_TAG = 0x3D  # Candidate.propensity = 7, fixed32


@njit(inline="always")
def _varint_size(value):
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


@njit(inline="always")
def _put_varint(out, at, value):
    while value >= 0x80:
        out[at] = np.uint8((value & 0x7F) | 0x80)
        value >>= 7
        at += 1
    out[at] = np.uint8(value)
    return at + 1


@njit(inline="always")
def _put_fixed32(out, at, tag, bits):
    out[at] = tag
    for shift in range(4):  # fixed32 is little-endian whatever the host
        out[at + 1 + shift] = np.uint8((bits >> np.uint32(8 * shift)) & np.uint32(0xFF))
    return at + 5


@njit(inline="always")
def _text_length(text_bytes, i):
    length = text_bytes.shape[1]
    while length > 0 and text_bytes[i, length - 1] == 0:
        length -= 1
    return length


@njit(cache=True)
def encode_candidates(id_bytes, score_bits, visits, walk_score_bits, source_bytes, propensity_bits):
    """`RecommendResponse.candidates` as wire bytes, ranks 1..n in row order.

    `id_bytes` and `source_bytes` are (n, width) uint8 views of NUL-padded UTF-8 pin ids
    and sources (empty for the walk's candidates), `score_bits` and `walk_score_bits` the
    float32 scores' bits (uint32), `visits` uint32, `propensity_bits` the float32
    propensities' bits. Fields at their proto3 default (a score or propensity of +0.0, no
    visits, an empty source) are left out, as protobuf itself does. The pin id and the source
    are written out twice rather than through a shared helper: the helper made this kernel
    slower. No `nogil`, as `_decimal_ids`: it runs microseconds on a gRPC thread, and
    releasing the GIL there hands it to a compute thread, which the gRPC thread then waits
    behind to take it back."""
    n = id_bytes.shape[0]
    id_len = np.empty(n, np.int64)
    source_len = np.empty(n, np.int64)
    body = np.empty(n, np.int64)
    total = 0
    for i in range(n):
        length = _text_length(id_bytes, i)
        id_len[i] = length
        source_len[i] = _text_length(source_bytes, i)
        size = 1 + _varint_size(np.uint64(length)) + length if length > 0 else 0
        size += 5 if score_bits[i] != 0 else 0
        size += 1 + _varint_size(np.uint64(visits[i])) if visits[i] != 0 else 0
        size += 1 + _varint_size(np.uint64(i + 1))
        size += 5 if walk_score_bits[i] != 0 else 0
        if source_len[i] > 0:
            size += 1 + _varint_size(np.uint64(source_len[i])) + source_len[i]
        size += 5 if propensity_bits[i] != 0 else 0
        body[i] = size
        total += 1 + _varint_size(np.uint64(size)) + size
    out = np.empty(total, np.uint8)
    at = 0
    for i in range(n):
        out[at] = _CANDIDATES_TAG
        at = _put_varint(out, at + 1, np.uint64(body[i]))
        length = id_len[i]
        if length > 0:
            out[at] = _PIN_ID_TAG
            at = _put_varint(out, at + 1, np.uint64(length))
            out[at : at + length] = id_bytes[i, :length]
            at += length
        if score_bits[i] != 0:
            at = _put_fixed32(out, at, _SCORE_TAG, score_bits[i])
        if visits[i] != 0:
            out[at] = _VISIT_COUNT_TAG
            at = _put_varint(out, at + 1, np.uint64(visits[i]))
        out[at] = _RANK_TAG
        at = _put_varint(out, at + 1, np.uint64(i + 1))
        if walk_score_bits[i] != 0:
            at = _put_fixed32(out, at, _WALK_SCORE_TAG, walk_score_bits[i])
        length = source_len[i]
        if length > 0:
            out[at] = _SOURCE_TAG
            at = _put_varint(out, at + 1, np.uint64(length))
            out[at : at + length] = source_bytes[i, :length]
            at += length
        if propensity_bits[i] != 0:
            at = _put_fixed32(out, at, _PROPENSITY_TAG, propensity_bits[i])
    return out


@njit(cache=True)
def _decimal_ids(ids):
    """int64 ids as an (n, 20) uint8 array of NUL-padded decimal digits (with a '-' sign).

    No `nogil`: the loop takes a few microseconds, less than winning the GIL back would
    (numpy's `astype(np.bytes_)` does the same many times slower, holding the GIL).
    """
    out = np.zeros((ids.shape[0], 20), np.uint8)
    digits = np.empty(20, np.uint8)
    for i in range(ids.shape[0]):
        value = ids[i]
        at = 0
        if value < 0:
            out[i, 0] = 45  # '-'
            at = 1
        count = 0
        # The digits, last first, taken from the value itself: abs() of int64's minimum
        # overflows. Division floors, so a negative value's remainder is complemented.
        while True:
            digit = value % 10
            value //= 10
            if digit != 0 and value < 0:
                digit = 10 - digit
                value += 1
            digits[count] = 48 + digit
            count += 1
            if value == 0:
                break
        for k in range(count):
            out[i, at + k] = digits[count - 1 - k]
    return out


def _utf8_ids(pin_ids: np.ndarray) -> np.ndarray:
    """Pin ids (int64 or str) as an (n, width) uint8 array of NUL-padded UTF-8."""
    if pin_ids.dtype.kind == "i":
        return _decimal_ids(pin_ids.astype(np.int64, copy=False))
    if pin_ids.dtype.kind == "u":
        encoded = pin_ids.astype(np.bytes_)  # decimal digits, in C
    else:
        encoded = np.strings.encode(pin_ids.astype(np.str_), "utf-8")
    if encoded.size == 0:
        return np.empty((0, 1), np.uint8)
    return encoded.view(np.uint8).reshape(encoded.shape[0], encoded.dtype.itemsize)


def encode_response(tenant: str, output: RecommendOutput) -> bytes:
    """A serialized `RecommendResponse` for one pipeline output."""
    head = recommender_pb2.RecommendResponse(
        request_id=output.request_id,
        model_version=output.model_version,
        tenant=tenant,
        unknown_query_pins=list(output.unknown_query_pins),
        empty_reason=output.empty_reason or "",
        candidates_generated=output.candidates_generated,
        arm=output.arm,
        timing=recommender_pb2.Timing(
            walk_ms=output.timing_ms.get("walk", 0.0),
            features_ms=output.timing_ms.get("features", 0.0),
            scoring_ms=output.timing_ms.get("scoring", 0.0),
            total_ms=output.timing_ms.get("total", 0.0),
            queue_ms=output.timing_ms.get("queue", 0.0),
        ),
    )
    candidates = encode_candidates(
        _utf8_ids(np.asarray(output.pin_ids)),
        np.ascontiguousarray(output.scores, dtype=np.float32).view(np.uint32),
        np.ascontiguousarray(output.visits, dtype=np.uint32),
        np.ascontiguousarray(output.walk_scores, dtype=np.float32).view(np.uint32),
        # The walk's candidates carry no source on the wire (proto3's empty default).
        np.zeros((len(output.pin_ids), 1), np.uint8)
        if output.sources is None
        else _utf8_ids(output.sources),
        np.ascontiguousarray(
            np.ones(len(output.pin_ids)) if output.propensities is None else output.propensities,
            dtype=np.float32,
        ).view(np.uint32),
    )
    return head.SerializeToString() + candidates.tobytes()


def _serialize(response: Any) -> bytes:
    """Pre-encoded responses (Recommend, RecommendBatch) pass through; messages serialize."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def add_recommender(servicer: Any, server: grpc.Server) -> None:
    """Register the Recommender service's methods, as the generated `add_..._to_server`
    does, but with a response serializer that accepts pre-encoded bytes.

    The handlers are built from the service descriptor, so a method added to the proto is
    registered (or fails loudly here, if the servicer lacks it) without editing this.
    """
    service = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"]
    handlers = {}
    for method in service.methods:
        if method.client_streaming:
            raise NotImplementedError(f"{method.full_name}: client streaming is not served")
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        request_type = message_factory.GetMessageClass(method.input_type)
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=request_type.FromString,
            response_serializer=_serialize,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
