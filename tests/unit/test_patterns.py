"""The patterns the OpenAPI document publishes say exactly what the validators accept.

Each pattern is read from the model's own JSON Schema (what the document carries) and
matched the way a client's JSON Schema validator does (jsonschema_rs, ECMA-262
semantics). Three ways of finding a disagreement: strings generated from the pattern
must pass the validator; strings built from URL-like pieces and random text must get
the same verdict from both; and a list of hard cases, each judged the same by both.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jsonschema_rs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from app.core import patterns
from app.core.definition import RESERVED_HEADERS, CallSpec, RetryPolicy, ServiceSpec

EXAMPLES = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


def _schema(model: Any, field: str) -> dict[str, Any]:
    """The field's schema; for a call, as its `ServiceCall` or `UrlCall` shape has it."""
    document = model.model_json_schema()
    shapes = [document, *document.get("oneOf", [])]
    schema: dict[str, Any] = next(
        s["properties"][field]
        for s in shapes
        if field in s.get("properties", {}) and s["properties"][field].get("type") != "null"
    )
    for branch in schema.get("anyOf", []):
        if branch.get("type") == "string":
            return dict(branch)
    return schema


def _accepts(build: Callable[[str], Any]) -> Callable[[str], bool]:
    def accepts(value: str) -> bool:
        try:
            build(value)
        except (ValidationError, ValueError):
            return False
        return True

    return accepts


def _matches(schema: dict[str, Any]) -> Callable[[str], bool]:
    return jsonschema_rs.validator_for({**schema, "type": "string"}).is_valid  # type: ignore[no-any-return]


BASE_URL = _schema(ServiceSpec, "base_url")
CALL_URL = _schema(CallSpec, "url")
CALL_PATH = _schema(CallSpec, "path")
SERVICE_HEADERS = _schema(ServiceSpec, "headers")
CALL_HEADERS = _schema(CallSpec, "headers")

# (what the document says, what the server does)
PAIRS: dict[str, tuple[Callable[[str], bool], Callable[[str], bool]]] = {
    "base_url": (_matches(BASE_URL), _accepts(lambda v: ServiceSpec(base_url=v))),
    "url": (_matches(CALL_URL), _accepts(lambda v: CallSpec(url=v))),
    "path": (_matches(CALL_PATH), _accepts(lambda v: CallSpec(service="pay", path=v))),
    "service header name": (
        _matches(SERVICE_HEADERS["propertyNames"]),
        _accepts(lambda v: ServiceSpec(base_url="http://h", headers={v: "x"})),
    ),
    "service header value": (
        _matches(SERVICE_HEADERS["additionalProperties"]),
        _accepts(lambda v: ServiceSpec(base_url="http://h", headers={"X-Key": v})),
    ),
    "call header value": (
        _matches(CALL_HEADERS["additionalProperties"]),
        _accepts(lambda v: CallSpec(url="http://h", headers={"X-Key": v})),
    ),
}
PATTERNS = {
    "base_url": BASE_URL["pattern"],
    "url": CALL_URL["pattern"],
    "path": CALL_PATH["pattern"],
    "service header name": SERVICE_HEADERS["propertyNames"]["pattern"],
    "service header value": SERVICE_HEADERS["additionalProperties"]["pattern"],
    "call header value": CALL_HEADERS["additionalProperties"]["pattern"],
}

HARD_URLS = [
    "http://127.0.0.1:9001",
    "HTTPS://Payments.Internal:0443/x?y=1#z",
    "http://h:",
    "http://h:0",
    "http://h:65535",
    "http://h:000065535",
    "http://h:65536",
    "http://h:8o",
    "http://h:80:90",
    "http://[::1]:8080/",
    "http://[fe80::1%eth0]/",
    "http://[fe80::1%]/",
    "http://[::ffff:1.2.3.4]",
    "http://[::ffff:01.2.3.4]",
    "http://[1.2.3.4]",
    "http://[1:2:3:4:5:6:7:8]",
    "http://[1:2:3:4:5:6:7:8:9]",
    "http://[1:2:3:4:5:6:7::]",
    "http://[1::2:3:4:5:6:7:8]",
    "http://[v1.example]",
    "http://[V1.example]",
    "http://[v1.]",
    "http://h_1.example_/",
    "http://-h.example",
    "http://h-.example",
    "http://a..b",
    "http://" + "a" * 63 + ".b",
    "http://" + "a" * 64 + ".b",
    "http://" + ".".join(["a" * 63] * 3) + "." + "a" * 61,
    "http://" + ".".join(["a" * 63] * 3) + "." + "a" * 61 + ".",
    "http://" + ".".join(["a" * 63] * 3) + "." + "a" * 62,
    "http://user@h",
    "http://:pw@h",
    "http://h@",
    "http:h",
    "http:///x",
    "ftp://h",
    "http://h/a b",
    "http://h/\u00e9",
    "http://h\u00e9/",
    "http://h/\x7f",
    "http://h\\x",
    "http://h?x=${input.id}",
    "http://h/${input.id}/${a b}",
    "http://h${x}/",
    "http://${x}/",
    "${x}://h/",
    "http://h/${a {b}",
    "http://h/${unclosed",
    "http://h" + "/x" * 1030,
]
# Python's URL parser takes the text inside brackets as the host and ignores what is
# around it: the server accepts these, the document does not promise them (it is
# stricter only here).
LAX_URLS = ["http://a[::1]", "http://[::1]x", "http://x[::1]y:80/"]
HARD_PATHS = ["/", "/x", "x", "", "/a b", "/${a b}", "/${a {b}", "/${x}${y}", "//h", "/\t"]
HARD_HEADER_NAMES = ["X-Key", "x_key", "Idempotency-Key", "IDEMPOTENCY-KEY", "Host", "Hostx", ""]
HARD_HEADER_NAMES += ["a" * 128, "a" * 129, "bad name", "k\u00e9", "x:y", "X-Saga-Id"]
HARD_HEADER_VALUES = ["", "x", " x", "x ", "a\tb", "\t", "caf\u00e9", "a\nb", "${input.k}"]
HARD_HEADER_VALUES += ["${\u00e9}", " ${x}", "${x} ", "${a\nb}", "a ${b} c", "x\x7f"]


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_generated_from_the_pattern_is_accepted(name: str) -> None:
    matches, accepts = PAIRS[name]

    @EXAMPLES
    @given(st.from_regex(PATTERNS[name], fullmatch=True))
    def check(value: str) -> None:
        assert matches(value) and accepts(value), value

    check()


_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
_PIECES = st.lists(
    st.one_of(
        st.sampled_from(["http", "HTTPS", "ftp", "://", ":", "/", "?", "#", "@", "[", "]", "."]),
        st.sampled_from(["::1", "fe80::1%lo", "1.2.3.4", "v1.x", "${input.x}", "${", "}"]),
        st.sampled_from(["host", "a-b", "_", "-", "80", "65536", " ", "\t", "%", "\u00e9"]),
        _TEXT,
    ),
    max_size=10,
).map("".join)
_URLISH = st.tuples(st.sampled_from(["http://", "https://", "HTTP://", "http:"]), _PIECES).map(
    "".join
)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_pattern_and_validator_agree_on_odd_strings(name: str) -> None:
    matches, accepts = PAIRS[name]

    @EXAMPLES
    @given(st.one_of(_URLISH, _PIECES, st.tuples(st.just("/"), _PIECES).map("".join)))
    def check(value: str) -> None:
        if name.endswith("url") and _lax(value):
            assert not matches(value), value
            return
        assert matches(value) == accepts(value), value

    check()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        *(("base_url", v) for v in HARD_URLS),
        *(("url", v) for v in HARD_URLS),
        *(("path", v) for v in HARD_PATHS),
        *(("service header name", v) for v in HARD_HEADER_NAMES),
        *(("service header name", v.upper()) for v in RESERVED_HEADERS),
        *(("service header value", v) for v in HARD_HEADER_VALUES),
        *(("call header value", v) for v in HARD_HEADER_VALUES),
    ],
)
def test_pattern_and_validator_agree_on_hard_cases(name: str, value: str) -> None:
    matches, accepts = PAIRS[name]
    assert matches(value) == accepts(value), (name, value, accepts(value))


def _lax(url: str) -> bool:
    """An authority with text before `[` or after `]` but for a port (see LAX_URLS)."""
    authority = re.split(r"[/?#]", url.partition("://")[2], maxsplit=1)[0]
    if "[" not in authority and "]" not in authority:
        return False
    before, _, rest = authority.partition("[")
    after = rest.partition("]")[2]
    return bool(before) or not (after == "" or after.startswith(":"))


@pytest.mark.parametrize("value", LAX_URLS)
def test_the_server_is_laxer_only_around_brackets(value: str) -> None:
    for name in ("base_url", "url"):
        matches, accepts = PAIRS[name]
        assert accepts(value) and not matches(value), (name, value)


def test_base_url_length_is_in_its_pattern() -> None:
    """The 2048-character limit is a lookahead of the pattern (a generator need not
    build a string of exactly that length that matches the URL pattern)."""
    matches, accepts = PAIRS["base_url"]
    for value in ("http://h/" + "x" * (2048 - 9), "http://h/" + "x" * (2049 - 9)):
        assert matches(value) == accepts(value) == (len(value) <= 2048)


def test_retry_on_status_never_a_success() -> None:
    schema = RetryPolicy.model_json_schema()["properties"]["retry_on_status"]["items"]
    check = jsonschema_rs.validator_for(schema)
    for status in (100, 199, 200, 250, 299, 300, 503, 599, 600):
        try:
            RetryPolicy(retry_on_status=[status])
            ok = True
        except ValidationError:
            ok = False
        assert check.is_valid(status) == ok, status


def test_cursor_pattern_is_what_next_cursor_looks_like() -> None:
    from app.api.pagination import encode_cursor

    check = jsonschema_rs.validator_for({"type": "string", "pattern": patterns.CURSOR})
    for value in ("payments", ["2026-01-15T10:00:00+00:00", "0b7e4a52"], 2**62, "\u00e9" * 40):
        assert check.is_valid(encode_cursor(value)), value
