"""A saga's business key and labels: what a caller may attach to a saga to find it again
(`GET /v1/sagas?business_key=…&label=key:value`), and, on an `exclusive` definition, what
at most one running saga may hold.

Pure: the rules are the same for a start's body and for a list's filters.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field, StringConstraints

LABEL_KEY_PATTERN = r"^[a-z][a-z0-9_.-]{0,62}$"
MAX_LABELS = 16
MAX_TEXT = 255
# "Printable": no control character (C0, DEL, C1). Written as a pattern both Python and
# JSON Schema read alike, so the document states the rule. (Lone surrogates, which JSON
# can carry but no text column can store, are refused too.)
PRINTABLE_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"
# A list's `label=key:value` filter, as the document states it.
LABEL_FILTER_PATTERN = r"^[a-z][a-z0-9_.-]{0,62}:[^\x00-\x1f\x7f-\x9f]{1,255}$"
_LABEL_KEY = re.compile(LABEL_KEY_PATTERN)
_PRINTABLE = re.compile(PRINTABLE_PATTERN)
_SURROGATE = re.compile("[\ud800-\udfff]")


def printable_problem(value: str) -> str | None:
    """Why `value` is not 1..255 printable characters, or None when it is."""
    if not 1 <= len(value) <= MAX_TEXT:
        return f"must be 1 to {MAX_TEXT} characters long, not {len(value)}"
    if not _PRINTABLE.match(value) or (not value.isascii() and _SURROGATE.search(value)):
        return "must be printable characters only (no control characters, tabs or newlines)"
    return None


def _printable(value: str) -> str:
    problem = printable_problem(value)
    if problem:
        raise ValueError(problem)
    return value


BusinessKey = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_TEXT,
        json_schema_extra={"pattern": PRINTABLE_PATTERN},  # checked by `_printable`
        description="1-255 printable characters, e.g. the order number.",
        examples=["order-1001"],
    ),
    AfterValidator(_printable),
]
LabelKey = Annotated[str, StringConstraints(pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[
    str,
    Field(min_length=1, max_length=MAX_TEXT, json_schema_extra={"pattern": PRINTABLE_PATTERN}),
    AfterValidator(_printable),
]
Labels = Annotated[
    dict[LabelKey, LabelValue],
    Field(
        max_length=MAX_LABELS,
        description=f"At most {MAX_LABELS} pairs; keys match `{LABEL_KEY_PATTERN}`, values "
        "are 1-255 printable characters.",
        examples=[{"tenant": "acme", "channel": "web"}],
        # A key outside the pattern is refused too (the schema says so, not only the
        # validator): without this a generator may send one with any value.
        json_schema_extra={"additionalProperties": False},
    ),
]


def parse_label_filter(text: str) -> tuple[str, str]:
    """`key:value` as a list filter gives it; ValueError saying what to fix otherwise."""
    key, sep, value = text.partition(":")
    if not sep:
        raise ValueError(f"label filter {text!r} must be written key:value")
    if not _LABEL_KEY.match(key):
        raise ValueError(f"label key {key!r} must match {LABEL_KEY_PATTERN}")
    problem = printable_problem(value)
    if problem:
        raise ValueError(f"the value of label {key!r} {problem}")
    return key, value


def label_filters(texts: list[str]) -> dict[str, str] | None:
    """Every `key:value` filter as one containment document; None when two filters ask
    for different values of one key (no saga can match both). ValueError on bad text."""
    if len(texts) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} label filters, not {len(texts)}")
    wanted: dict[str, str] = {}
    for text in texts:
        key, value = parse_label_filter(text)
        if wanted.setdefault(key, value) != value:
            return None
    return wanted
