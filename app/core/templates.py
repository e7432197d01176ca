"""`${ref}` templates: validated at registration, rendered at call time.

A string that is exactly `"${ref}"` becomes the referenced JSON value with its type;
`${ref}` inside a longer string is interpolated as text. No expression language and
no evaluation: a reference is a dotted path into a fixed context, nothing more.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

_REF = re.compile(r"\$\{([^{}]*)\}")
_SEGMENT = re.compile(r"^[A-Za-z0-9_-]+$")

JSON = Any


class TemplateError(ValueError):
    """A reference that cannot be parsed or resolved."""


@dataclass(frozen=True, slots=True)
class Ref:
    """A parsed reference such as `steps.charge.response.id`."""

    root: str  # "input" | "saga" | "steps"
    step: str | None  # the step name for "steps" references
    path: tuple[str, ...]  # the rest of the path

    def __str__(self) -> str:
        parts = [self.root] + ([self.step] if self.step else []) + list(self.path)
        return ".".join(parts)


def parse_ref(text: str) -> Ref:
    """Parse the inside of `${...}`; raise TemplateError when it is not a legal reference."""
    raw = text.strip()
    parts = raw.split(".") if raw else []
    if not parts or any(not _SEGMENT.match(p) for p in parts):
        raise TemplateError(f"'${{{text}}}' is not a reference: use dotted names like input.amount")
    root = parts[0]
    if root == "input":
        return Ref("input", None, tuple(parts[1:]))
    if root == "saga":
        if parts[1:] != ["id"]:
            raise TemplateError(f"'${{{text}}}': the only saga reference is saga.id")
        return Ref("saga", None, ("id",))
    if root == "steps":
        if len(parts) < 3 or parts[2] not in ("response", "status_code"):
            raise TemplateError(
                f"'${{{text}}}': use steps.<name>.response.<path> or steps.<name>.status_code"
            )
        if parts[2] == "status_code" and len(parts) != 3:
            raise TemplateError(f"'${{{text}}}': status_code has no sub-path")
        return Ref("steps", parts[1], tuple(parts[2:]))
    raise TemplateError(f"'${{{text}}}': references start with input., saga. or steps.")


def iter_refs(value: JSON) -> Iterator[Ref]:
    """Every reference found in the strings of a JSON value (keys are not templated)."""
    if isinstance(value, str):
        for match in _REF.finditer(value):
            yield parse_ref(match.group(1))
    elif isinstance(value, list):
        for item in value:
            yield from iter_refs(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_refs(item)


@dataclass(frozen=True, slots=True)
class RenderContext:
    """What a template may see: the saga's input and id, and earlier steps' results."""

    input: JSON
    saga_id: str
    step_results: Mapping[str, tuple[int | None, JSON]]  # name -> (status_code, response)
    # Compensations: a step that never answered successfully (its outcome is unknown)
    # has no response; references into it render as null instead of failing, so the
    # compensation is still sent and the participant can treat it as a no-op.
    absent_results_as_null: bool = False


def resolve(ref: Ref, ctx: RenderContext) -> JSON:
    """The value a reference points at; TemplateError when the path is missing."""
    if ref.root == "saga":
        return ctx.saga_id
    if ref.root == "input":
        current: JSON = ctx.input
        path = ref.path
    else:
        assert ref.step is not None
        status_code, response = ctx.step_results.get(ref.step, (None, None))
        if response is None and ctx.absent_results_as_null:
            return status_code if ref.path[0] == "status_code" else None
        if ref.step not in ctx.step_results:
            raise TemplateError(f"${{{ref}}}: step '{ref.step}' has no result")
        if ref.path[0] == "status_code":
            if status_code is None:
                raise TemplateError(f"${{{ref}}}: step '{ref.step}' has no status code")
            return status_code
        current = response
        path = ref.path[1:]
    walked: list[str] = []
    for segment in path:
        walked.append(segment)
        if isinstance(current, dict) and segment in current:
            current = current[segment]
        elif isinstance(current, list) and segment.isdigit() and int(segment) < len(current):
            current = current[int(segment)]
        else:
            raise TemplateError(f"${{{ref}}}: nothing at '{'.'.join(walked)}'")
    return current


def as_text(value: JSON) -> str:
    """How a non-string value reads inside text: compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def render(value: JSON, ctx: RenderContext) -> JSON:
    """Render every template in a JSON value; non-string leaves pass through untouched."""
    if isinstance(value, str):
        whole = _REF.fullmatch(value)
        if whole:
            return resolve(parse_ref(whole.group(1)), ctx)
        return _REF.sub(lambda m: as_text(resolve(parse_ref(m.group(1)), ctx)), value)
    if isinstance(value, list):
        return [render(item, ctx) for item in value]
    if isinstance(value, dict):
        return {key: render(item, ctx) for key, item in value.items()}
    return value


def strip_refs(text: str) -> str:
    """The written text of a template, without its `${…}` references."""
    return _REF.sub("", text)


def render_url(template: str, ctx: RenderContext) -> str:
    """Render a `path` or `url` template, every interpolated value percent-encoded.

    Before the first written `?` a value becomes one path segment: `/`, `?`, `#` and
    dots are encoded too, so `../../admin?x#` can never leave the written path. After
    it, a value is one query value (`&`, `=`, `#`, `+` encoded). A template that is
    exactly `${ref}` is treated the same way: a path or URL never comes whole from data.
    """
    out: list[str] = []
    in_query = False
    position = 0
    for match in _REF.finditer(template):
        written = template[position : match.start()]
        out.append(written)
        in_query = in_query or "?" in written or "#" in written
        value = quote(as_text(resolve(parse_ref(match.group(1)), ctx)), safe="")
        out.append(value if in_query else value.replace(".", "%2E"))
        position = match.end()
    out.append(template[position:])
    return "".join(out)
