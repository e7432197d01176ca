"""What the validators of `app.core.definition` accept, as JSON Schema patterns.

The OpenAPI document carries these so that a client can check a document before it sends
it: a string matches the pattern exactly when the validator takes it (the unit tests hold
each pair to that). They are written in the common subset of ECMA-262 and Python regular
expressions (no flags, no possessive forms), and are never used to validate on the
server: the validators stay the rule, with their own messages.
"""

from __future__ import annotations

import re

# `${…}`: a template reference, as `app.core.templates` finds them (minus the NUL that no
# document may hold anywhere).
REF = r"\$\{[^{}\x00]*\}"

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
# A DNS name (any case: the URL parser lowercases it) of at most 253 characters, 254 with
# a trailing dot; dotted IPv4 addresses are DNS names by this rule too.
_DNS = rf"(?=[^:/?#]{{1,253}}\.?(?:[:/?#]|$)){_LABEL}(?:\.{_LABEL})*\.?"
_H16 = r"[0-9A-Fa-f]{1,4}"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_LS32 = rf"(?:{_H16}:{_H16}|{_IPV4})"
_IPV6 = (
    "(?:"
    + "|".join(
        [
            rf"(?:{_H16}:){{6}}{_LS32}",
            rf"::(?:{_H16}:){{5}}{_LS32}",
            rf"(?:{_H16})?::(?:{_H16}:){{4}}{_LS32}",
            rf"(?:(?:{_H16}:){{0,1}}{_H16})?::(?:{_H16}:){{3}}{_LS32}",
            rf"(?:(?:{_H16}:){{0,2}}{_H16})?::(?:{_H16}:){{2}}{_LS32}",
            rf"(?:(?:{_H16}:){{0,3}}{_H16})?::{_H16}:{_LS32}",
            rf"(?:(?:{_H16}:){{0,4}}{_H16})?::{_LS32}",
            rf"(?:(?:{_H16}:){{0,5}}{_H16})?::{_H16}",
            rf"(?:(?:{_H16}:){{0,6}}{_H16})?::",
        ]
    )
    + ")"
)
# An IPv6 literal with an optional zone (its unreserved characters), or an IPvFuture
# literal whose text is a DNS name (`[v1.example]`).
_IP_LITERAL = (
    rf"\[(?:{_IPV6}(?:%[A-Za-z0-9._~-]+)?"
    rf"|(?=[^\]]{{1,253}}\.?\])v[0-9A-Fa-f]{{1,62}}(?:\.{_LABEL})+\.?)\]"
)
_PORT = (
    r"(?::0*(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}"
    r"|[1-5][0-9]{4}|[0-9]{1,4})?)?"
)
_ORIGIN = rf"[Hh][Tt][Tt][Pp][Ss]?://(?:{_DNS}|{_IP_LITERAL}){_PORT}"
_VISIBLE = r"[^\x00-\x20\x7f]"  # no spaces or control characters (non-ASCII is fine)

# `base_url`: an absolute http(s) URL with a host, no credentials, no spaces.
HTTP_URL = rf"^{_ORIGIN}(?:[/?#]{_VISIBLE}*)?$"
# A call's `url`: the same, with `${…}` references allowed in its path and query only.
CALL_URL = rf"^{_ORIGIN}(?:[/?#](?:{REF}|{_VISIBLE})*)?$"
# A call's `path` (with `service`): starts with `/`; references anywhere after it.
CALL_PATH = rf"^/(?:{REF}|{_VISIBLE})*$"


def _any_case(word: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in word)


def header_name(reserved: frozenset[str]) -> str:
    """An HTTP token of 1-128 characters that is none of the `reserved` names (any case;
    they are letters and `-`)."""
    if not all(re.fullmatch(r"[a-z-]+", name) for name in reserved):
        raise ValueError("reserved header names are lowercase letters and '-'")
    names = "|".join(_any_case(name) for name in sorted(reserved))
    return rf"^(?!(?:{names})$)[!#$%&'*+.^_`|~0-9A-Za-z-]{{1,128}}$"


# A header value: visible ASCII, with spaces and tabs only between visible characters.
HEADER_VALUE = r"^(?:[!-~](?:[\t -~]*[!-~])?)?$"
# A call's header value: the same, where a `${…}` reference may hold anything.
_ATOM = rf"(?:{REF}|[!-~])"
CALL_HEADER_VALUE = rf"^(?:{_ATOM}(?:(?:{REF}|[\t -~])*{_ATOM})?)?$"

# A completion notification's target: no `${…}` anywhere (it is not rendered).
_NO_REF = r"(?!.*\$\{)"
NOTIFY_URL = rf"^{_NO_REF}" + HTTP_URL.removeprefix("^")
NOTIFY_PATH = rf"^{_NO_REF}/{_VISIBLE}*$"
NOTIFY_HEADER_VALUE = rf"^{_NO_REF}" + HEADER_VALUE.removeprefix("^")

# A list cursor: what `next_cursor` is (url-safe base64 without padding).
CURSOR = r"^[A-Za-z0-9_-]{1,512}$"
