"""Length limits of the request fields that reach a log, a metric or a response.

A field past its limit is refused with INVALID_ARGUMENT naming the field, before any work:
a 4 MB `request_id` would otherwise be walked for, logged and echoed back, only to fail at
send time past the message size limit. The limits are documented in docs/serving.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from walkrank.serving.errors import InvalidArgument
from walkrank.tenants import TENANT_NAME_CHARS

TENANT_CHARS = TENANT_NAME_CHARS  # a longer name is no tenant's
ID_CHARS = 128  # request_id, user id, pin ids (query, excluded, events)
LOCALE_CHARS = 64
INTEREST_CHARS = 128
EVENT_CHARS = 64  # event type names
MAX_INTERESTS = 64
MAX_EXCLUDE_PINS = 10_000
MAX_BATCH_USERS = 10_000


def check_length(field: str, value: str, limit: int) -> None:
    """InvalidArgument naming `field` when `value` has more than `limit` characters."""
    if len(value) > limit:
        raise InvalidArgument(field, f"{len(value)} characters, at most {limit}", reason="too_long")


def check_count(field: str, values: Sequence[object], limit: int) -> None:
    if len(values) > limit:
        raise InvalidArgument(field, f"{len(values)} values, at most {limit}", reason="too_long")


def check_each(field: str, values: Iterable[str], limit: int, suffix: str = "") -> None:
    """`check_length` for every value, the first offender named with its index
    (`field[index]suffix`: `query_pins[3].pin_id`)."""
    for index, value in enumerate(values):
        if len(value) > limit:
            check_length(f"{field}[{index}]{suffix}", value, limit)


def check_events(events: Sequence[Any]) -> None:
    """Each reported event's `request_id`, `pin_id` and `event` within their limits (they are
    stored in the event log and quoted in rejections)."""
    for index, event in enumerate(events):
        check_length(f"events[{index}].request_id", event.request_id, ID_CHARS)
        check_length(f"events[{index}].pin_id", event.pin_id, ID_CHARS)
        check_length(f"events[{index}].event", event.event, EVENT_CHARS)
