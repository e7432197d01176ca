"""`${ref}` templates: parsing, reference discovery and rendering (contract section 4)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from app.core.templates import Ref, RenderContext, TemplateError, iter_refs, parse_ref, render

INPUT: dict[str, Any] = {
    "amount": 42,
    "price": 9.5,
    "email": "ann@example.com",
    "flag": True,
    "off": False,
    "nothing": None,
    "name": "Zoë",
    "obj": {"a": 1, "b": [1, "x"]},
    "items": [{"sku": "a-1", "qty": 2}, {"sku": "b-2", "qty": 1}],
    "0": "digit key",
}

CTX = RenderContext(
    input=INPUT,
    saga_id="6f1c0a52-5d8e-4a53-9b0e-0d2f3c4b5a69",
    step_results={
        "charge": (201, {"id": "ch_1", "amount": 42, "lines": [10, 20, 30]}),
        "empty": (204, None),
        "nocode": (None, {"x": 1}),
        "listy": (200, [{"id": "first"}, {"id": "second"}]),
    },
)


# --- whole-string references keep the referenced JSON type -----------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("${input.amount}", 42),
        ("${input.price}", 9.5),
        ("${input.email}", "ann@example.com"),
        ("${input.flag}", True),
        ("${input.off}", False),
        ("${input.nothing}", None),
        ("${input.obj}", {"a": 1, "b": [1, "x"]}),
        ("${input.items}", [{"sku": "a-1", "qty": 2}, {"sku": "b-2", "qty": 1}]),
        ("${input}", INPUT),
        ("${saga.id}", "6f1c0a52-5d8e-4a53-9b0e-0d2f3c4b5a69"),
        ("${steps.charge.response.id}", "ch_1"),
        ("${steps.charge.response.amount}", 42),
        ("${steps.charge.response}", {"id": "ch_1", "amount": 42, "lines": [10, 20, 30]}),
        ("${steps.charge.status_code}", 201),
        ("${steps.empty.response}", None),
        ("${steps.empty.status_code}", 204),
        ("${ input.amount }", 42),
    ],
)
def test_whole_string_reference_keeps_type(template: str, expected: Any) -> None:
    result = render(template, CTX)
    assert result == expected
    assert type(result) is type(expected)


def test_whole_string_reference_inside_structures() -> None:
    template = {
        "amount": "${input.amount}",
        "flag": "${input.flag}",
        "lines": ["${steps.charge.response.lines}", "${input.nothing}"],
        "nested": {"code": "${steps.charge.status_code}"},
    }
    assert render(template, CTX) == {
        "amount": 42,
        "flag": True,
        "lines": [[10, 20, 30], None],
        "nested": {"code": 201},
    }


# --- interpolation in longer strings ---------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("amount=${input.amount}", "amount=42"),
        ("price ${input.price} EUR", "price 9.5 EUR"),
        ("to: ${input.email}", "to: ann@example.com"),
        ("${input.flag}!", "true!"),
        ("off=${input.off}", "off=false"),
        ("none=${input.nothing}", "none=null"),
        ("obj=${input.obj}", 'obj={"a":1,"b":[1,"x"]}'),
        ("items: ${input.items}", 'items: [{"sku":"a-1","qty":2},{"sku":"b-2","qty":1}]'),
        ("hi ${input.name}", "hi Zoë"),
        ("unicode ${input.obj.b}${input.name}", 'unicode [1,"x"]Zoë'),
        ("/orders/${saga.id}", "/orders/6f1c0a52-5d8e-4a53-9b0e-0d2f3c4b5a69"),
        ("code ${steps.charge.status_code}", "code 201"),
        ("${input.email}/${steps.charge.response.id}", "ann@example.com/ch_1"),
        ("${input.amount}${input.amount}", "4242"),
        (" ${input.amount}", " 42"),
    ],
)
def test_interpolation_in_longer_string(template: str, expected: str) -> None:
    assert render(template, CTX) == expected


def test_compact_json_for_nested_object_with_unicode() -> None:
    ctx = RenderContext(input={"o": {"k": "ü", "n": [1, 2.5, None]}}, saga_id="s", step_results={})
    assert render("v=${input.o}", ctx) == 'v={"k":"ü","n":[1,2.5,null]}'


@pytest.mark.parametrize(
    "value",
    [
        "plain text",
        "$5 and {braces}",
        "${input.amount",  # never closed: not a template
        "$ {input.amount}",
        "",
        0,
        12.5,
        True,
        None,
        [],
        {},
    ],
)
def test_values_without_templates_pass_through(value: Any) -> None:
    assert render(value, CTX) == value


def test_keys_are_not_templated() -> None:
    assert render({"${input.email}": "${input.amount}"}, CTX) == {"${input.email}": 42}


def test_render_does_not_mutate_its_argument() -> None:
    template = {"a": ["${input.amount}", {"b": "x${input.flag}"}]}
    before = copy.deepcopy(template)
    assert render(template, CTX) == {"a": [42, {"b": "xtrue"}]}
    assert template == before


# --- list indexing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("${input.items.0}", {"sku": "a-1", "qty": 2}),
        ("${input.items.0.sku}", "a-1"),
        ("${input.items.1.qty}", 1),
        ("${input.obj.b.1}", "x"),
        ("${steps.charge.response.lines.2}", 30),
        ("${steps.listy.response.1.id}", "second"),
        ("${input.0}", "digit key"),  # a digit is a plain key in an object
        ("sku=${input.items.1.sku}", "sku=b-2"),
    ],
)
def test_list_indexing(template: str, expected: Any) -> None:
    assert render(template, CTX) == expected


@pytest.mark.parametrize(
    ("template", "missing_at"),
    [
        ("${input.items.2}", "items.2"),
        ("${input.items.-1}", "items.-1"),
        ("${input.items.first}", "items.first"),
        ("${steps.charge.response.lines.3}", "lines.3"),
    ],
)
def test_bad_list_index_raises(template: str, missing_at: str) -> None:
    with pytest.raises(TemplateError, match=f"nothing at '{missing_at}'"):
        render(template, CTX)


# --- missing paths at run time ----------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "${input.missing}",
        "${input.amount.cents}",  # descending into a number
        "${input.email.x}",  # descending into a string
        "${input.nothing.x}",  # descending into null
        "${input.obj.c}",
        "${steps.charge.response.missing}",
        "${steps.charge.response.id.x}",
        "${steps.empty.response.id}",  # the step answered without a body
        "${steps.unknown.response.id}",  # no result for that step
        "${steps.unknown.status_code}",
        "${steps.nocode.status_code}",  # result without a status code
        "prefix ${input.missing} suffix",
        "ok ${input.amount} then ${input.missing}",
        {"deep": ["${input.missing}"]},
    ],
)
def test_missing_path_raises_template_error(template: Any) -> None:
    with pytest.raises(TemplateError):
        render(template, CTX)


def test_missing_path_message_names_the_reference_and_the_path() -> None:
    with pytest.raises(TemplateError) as info:
        render("${input.obj.c.d}", CTX)
    assert str(info.value) == "${input.obj.c.d}: nothing at 'obj.c'"


def test_missing_step_message() -> None:
    with pytest.raises(TemplateError) as info:
        render("${steps.ghost.response.id}", CTX)
    assert str(info.value) == "${steps.ghost.response.id}: step 'ghost' has no result"


def test_template_error_is_a_value_error() -> None:
    assert issubclass(TemplateError, ValueError)


# --- parsing references ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("input", Ref("input", None, ())),
        ("input.amount", Ref("input", None, ("amount",))),
        ("input.items.0.sku", Ref("input", None, ("items", "0", "sku"))),
        ("input.A_b-C", Ref("input", None, ("A_b-C",))),
        ("saga.id", Ref("saga", None, ("id",))),
        ("steps.a.response", Ref("steps", "a", ("response",))),
        ("steps.a.response.id", Ref("steps", "a", ("response", "id"))),
        (
            "steps.charge-payment.response.x.0",
            Ref("steps", "charge-payment", ("response", "x", "0")),
        ),
        ("steps.a.status_code", Ref("steps", "a", ("status_code",))),
        ("  input.amount  ", Ref("input", None, ("amount",))),
    ],
)
def test_parse_ref_valid(text: str, expected: Ref) -> None:
    assert parse_ref(text) == expected


@pytest.mark.parametrize(
    ("text", "as_text"),
    [
        ("input.amount", "input.amount"),
        ("input", "input"),
        ("saga.id", "saga.id"),
        ("steps.a.response.id", "steps.a.response.id"),
        ("steps.a.status_code", "steps.a.status_code"),
    ],
)
def test_ref_str_round_trips(text: str, as_text: str) -> None:
    assert str(parse_ref(text)) == as_text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "saga",
        "saga.x",
        "saga.id.x",
        "saga.ID",
        "steps",
        "steps.a",
        "steps.a.body",
        "steps.a.responses",
        "steps.a.status_code.x",
        "steps.a.status_code.0",
        "steps..response",
        "other.x",
        "env.HOME",
        "Input.amount",
        "input..amount",
        "input.amount.",
        ".input",
        "input.a b",
        "input.a$",
        "input.a[0]",
        "input.amount + 1",
        "__import__('os')",
    ],
)
def test_parse_ref_rejects_invalid(text: str) -> None:
    with pytest.raises(TemplateError):
        parse_ref(text)


@pytest.mark.parametrize(
    "template",
    ["${saga.x}", "${}", "${steps.a}", "a ${steps.a.status_code.x} b", "${steps.a.body.id}"],
)
def test_render_rejects_invalid_reference(template: str) -> None:
    with pytest.raises(TemplateError):
        render(template, CTX)


# --- finding references ------------------------------------------------------------------


def test_iter_refs_finds_every_reference_in_order() -> None:
    value = {
        "a": "${input.amount}",
        "b": ["x ${saga.id} y ${steps.s1.response.id}", 3, None, True],
        "c": {"d": "${steps.s2.status_code}"},
        "${steps.in_key.response}": "no refs here",
    }
    assert list(iter_refs(value)) == [
        Ref("input", None, ("amount",)),
        Ref("saga", None, ("id",)),
        Ref("steps", "s1", ("response", "id")),
        Ref("steps", "s2", ("status_code",)),
    ]


@pytest.mark.parametrize("value", [None, 1, 2.5, True, "plain", "$5 {x}", [], {}, {"k": [1, "a"]}])
def test_iter_refs_without_templates_is_empty(value: Any) -> None:
    assert list(iter_refs(value)) == []


@pytest.mark.parametrize("value", ["${saga.x}", ["ok ${input.a}", {"k": "${steps.a}"}], "${}"])
def test_iter_refs_rejects_invalid_reference(value: Any) -> None:
    with pytest.raises(TemplateError):
        list(iter_refs(value))
