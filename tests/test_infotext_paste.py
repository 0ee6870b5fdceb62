"""Pasting an infotext into the panel: an image made without MIGC turns every part of the panel off, a
malformed MIGC entry is reported, and a good one restores every component."""
from lib_migc.params import INFOTEXT_KEY, MODE_MIGC, UI_FIELDS, MigcParams
from lib_migc.ui import pasted_values

SWITCHES = {"enabled": False, "structure_enabled": False, "fusion_enabled": False, "mode": MODE_MIGC}


def test_a_paste_without_a_migc_entry_turns_off_every_part_and_resets_the_mode():
    values, message = pasted_values({"Steps": "20", "Prompt": "a room"})
    assert message == ""
    by_name = dict(zip(UI_FIELDS, values))
    assert {name: by_name[name] for name in SWITCHES} == SWITCHES
    assert all(by_name[name] is None for name in UI_FIELDS if name not in SWITCHES), "the drawn layout and settings stay"


def test_a_malformed_entry_is_reported_and_changes_nothing():
    for text in ("{not json", '["a", "list"]', '{"mode": "sideways"}'):
        values, message = pasted_values({INFOTEXT_KEY: text})
        assert values == [None] * len(UI_FIELDS)
        assert message.startswith("⚠") and "could not be read" in message and "MIGC" in message, text


def test_a_good_entry_restores_every_component():
    params = MigcParams.from_api({"mode": "naive", "instances": [{"description": "a cat", "box": [0, 0, 0.5, 1]}],
                                  "structure": {"enabled": True}, "migc_steps": 0.3})
    values, message = pasted_values({INFOTEXT_KEY: params.to_infotext()})
    assert message == "" and values == params.ui_values()
