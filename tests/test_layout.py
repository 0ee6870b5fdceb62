"""Parsing and validating layouts: every error names the instance, the field and what is allowed."""
import json

import pytest

from lib_migc.core.errors import LayoutError, MigcError
from lib_migc.core.layout import MAX_INSTANCES, Instance, Layout, parse_layout

GOOD = {"global_prompt": "a room", "instances": [
    {"description": "a red teddy bear", "box": [0.1, 0.2, 0.5, 0.9]},
    {"description": "a gray cat", "box": [0.5, 0.4, 0.95, 1.0], "ca": 1.5, "ea": 0, "sac": 2},
]}


def test_parses_dict_json_and_bare_list_alike():
    from_dict = parse_layout(GOOD)
    assert from_dict == parse_layout(json.dumps(GOOD))
    assert from_dict.instances == parse_layout(GOOD["instances"]).instances
    assert from_dict.global_prompt == "a room"
    assert from_dict.instances[1] == Instance("a gray cat", (0.5, 0.4, 0.95, 1.0), ca=1.5, ea=0.0, sac=2.0)
    assert from_dict.instances[0].ca == 1.0


def test_json_round_trip_is_exact_and_compact():
    layout = parse_layout(GOOD)
    text = layout.to_json()
    assert parse_layout(text) == layout
    assert " " not in text.replace("a red teddy bear", "").replace("a gray cat", "").replace("a room", "")
    assert '"ca"' in text and text.count('"ca"') == 1  # defaults are left out


@pytest.mark.parametrize("empty", [None, "", "  ", [], {"instances": []}])
def test_empty_inputs_give_an_empty_layout(empty):
    assert parse_layout(empty) == Layout()


def _one(**fields):
    inst = {"description": "a ball", "box": [0.1, 0.1, 0.5, 0.5]}
    inst.update(fields)
    return {"instances": [{"description": "first", "box": [0, 0, 1, 1]}, inst]}


@pytest.mark.parametrize("layout,words", [
    (_one(box=[0.1, float("nan"), 0.5, 0.5]), ["instances[1]", "'box'", "y0", "finite"]),
    (_one(box=[0.1, 0.1, float("inf"), 0.5]), ["instances[1]", "x1", "finite"]),
    (_one(box=[-0.1, 0.1, 0.5, 0.5]), ["instances[1]", "x0", "0 to 1"]),
    (_one(box=[0.1, 0.1, 0.5, 1.2]), ["instances[1]", "y1", "0 to 1"]),
    (_one(box=[0.5, 0.1, 0.5, 0.5]), ["instances[1]", "x1", "x0", "greater"]),
    (_one(box=[0.1, 0.6, 0.5, 0.5]), ["instances[1]", "y1", "y0"]),
    (_one(box=[0.1, 0.1, 0.5]), ["instances[1]", "'box'", "4 numbers"]),
    (_one(box="0.1,0.1,0.5,0.5"), ["instances[1]", "'box'", "4 numbers"]),
    (_one(box=[0.1, True, 0.5, 0.5]), ["instances[1]", "y0", "finite"]),
    (_one(description=""), ["instances[1]", "'description'", "non-empty"]),
    (_one(description="   "), ["instances[1]", "'description'"]),
    (_one(description=None), ["instances[1]", "'description'"]),
    (_one(colour="red"), ["instances[1]", "'colour'", "allowed: description, box, mask, negative, ca, ea, sac"]),
    (_one(ca=-1), ["instances[1]", "'ca'", "0 to 10"]),
    (_one(sac=float("nan")), ["instances[1]", "'sac'"]),
    (_one(ea="high"), ["instances[1]", "'ea'"]),
    ({"instances": [], "mode": "x"}, ["'mode'", "allowed: global_prompt, instances"]),
    ({"instances": "a cat"}, ["'instances' must be a list"]),
    ({"instances": [], "global_prompt": 3}, ["'global_prompt'"]),
    ({"instances": [3]}, ["instances[0]", "expected an object"]),
    ("{not json", ["not valid JSON", "line 1"]),
    ("42", ["expected a JSON object or list"]),
])
def test_invalid_layouts_name_the_instance_and_the_field(layout, words):
    with pytest.raises(LayoutError) as info:
        parse_layout(layout)
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert info.value.status_code == 422 and info.value.detail == message
    assert isinstance(info.value, MigcError)


def test_error_mentions_the_box_number_and_description():
    with pytest.raises(LayoutError, match=r"box #2 \('a ball'\)"):
        parse_layout(_one(box=[0.5, 0.5, 0.1, 0.1]))


def test_at_most_29_instances_the_capacity_of_migc_plus():
    inst = {"description": "x", "box": [0, 0, 1, 1]}
    assert len(parse_layout([inst] * MAX_INSTANCES)) == 29
    with pytest.raises(LayoutError, match="30 instances given; at most 29"):
        parse_layout([inst] * (MAX_INSTANCES + 1))


def test_descriptions_are_trimmed_and_boxes_are_floats():
    layout = parse_layout([{"description": "  a dog ", "box": [0, 0, 1, 1]}])
    assert layout.descriptions == ["a dog"]
    assert all(isinstance(v, float) for v in layout.boxes[0])
