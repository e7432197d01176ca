"""What an audit entry says about a registration: what changed, never a secret value."""

from __future__ import annotations

from typing import Any

from app.core.definition import ServiceSpec


def service_changes(old: ServiceSpec | None, new: ServiceSpec) -> dict[str, Any]:
    """The fields a `PUT /v1/services/{name}` changed, old and new value each; header
    values are secrets, so only the names of added, removed and changed headers."""
    before = old.model_dump(mode="json", exclude={"headers"}) if old else {}
    after = new.model_dump(mode="json", exclude={"headers"})
    changed = {
        key: {"from": before.get(key), "to": value}
        for key, value in _flat(after).items()
        if _flat(before).get(key) != value
    }
    old_headers = {k.lower(): v for k, v in (old.headers if old else {}).items()}
    new_headers = {k.lower(): v for k, v in new.headers.items()}
    headers = {
        "added": sorted(set(new_headers) - set(old_headers)),
        "removed": sorted(set(old_headers) - set(new_headers)),
        "changed": sorted(
            k for k in set(new_headers) & set(old_headers) if new_headers[k] != old_headers[k]
        ),
    }
    details: dict[str, Any] = {"created": old is None, "changed": changed}
    if any(headers.values()):
        details["headers"] = headers
    return details


def _flat(document: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in document.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
