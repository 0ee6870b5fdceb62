"""Importers from other regional extensions, each tested with strings in the format that extension writes."""
import json

import pytest

from lib_migc import importers
from lib_migc.core.errors import MigcError
from lib_migc.ui import pasted_values
from lib_migc.params import UI_FIELDS


def boxes(converted):
    return [(i["description"], i["box"]) for i in converted.instances]


# Regional Prompter's infotext entries as A1111 parses them (values are strings).
RP = {"RP Active": "True", "RP Divide mode": "Matrix", "RP Matrix submode": "Columns", "RP Mask submode": "Mask",
      "RP Prompt submode": "Prompt", "RP Calc Mode": "Attention", "RP Ratios": "1,2,1", "RP Base Ratios": "0.2",
      "RP Use Base": "False", "RP Use Common": "False", "RP Use Ncommon": "False", "RP Options": "No Options",
      "RP Flip": "False"}


def test_regional_prompter_columns():
    out = importers.from_regional_prompter(RP, "a cat BREAK a dog BREAK a bird")
    assert boxes(out) == [("a cat", [0, 0, 0.25, 1]), ("a dog", [0.25, 0, 0.75, 1]), ("a bird", [0.75, 0, 1, 1])]


def test_regional_prompter_rows_and_a_2023_infotext():
    out = importers.from_regional_prompter({**RP, "RP Matrix submode": "Rows", "RP Ratios": "1,1"}, "sky BREAK sea")
    assert boxes(out) == [("sky", [0, 0, 1, 0.5]), ("sea", [0, 0.5, 1, 1])]
    legacy = {"RP Active": "True", "RP Divide mode": "Vertical", "RP Ratios": "1,1"}
    assert boxes(importers.from_regional_prompter(legacy, "sky BREAK sea")) == boxes(out)


def test_regional_prompter_two_dimensional_ratios_with_common_and_base():
    # columns mode: "1,2,1,1;2,4,6": row 0..1/3 with columns 2:1:1, row 1/3..1 with columns 4:6
    params = {**RP, "RP Ratios": "1,2,1,1;2,4,6", "RP Use Common": "True", "RP Use Base": "True"}
    out = importers.from_regional_prompter(params, "masterpiece BREAK a room BREAK a BREAK b BREAK c BREAK d BREAK e")
    third = 1 / 3
    assert [i["description"] for i in out.instances] == ["masterpiece, a", "masterpiece, b", "masterpiece, c",
                                                         "masterpiece, d", "masterpiece, e"]
    expected = [[0, 0, 0.5, third], [0.5, 0, 0.75, third], [0.75, 0, 1, third], [0, third, 0.4, 1], [0.4, third, 1, 1]]
    assert [i["box"] for i in out.instances] == [[round(v, 6) for v in b] for b in expected]
    assert out.global_prompt == "a room" and "base prompt" in out.message()


def test_regional_prompter_rows_mode_transposes_and_flip_swaps_the_separators():
    rows = importers.from_regional_prompter({**RP, "RP Matrix submode": "Rows", "RP Ratios": "1;1;1,2;1;2"}, "a BREAK b BREAK c BREAK d")
    third = round(1 / 3, 6)
    assert [i["box"] for i in rows.instances] == [[0, 0, third, 0.5], [0, 0.5, third, 1], [third, 0, 1, third], [third, third, 1, 1]]
    flipped = importers.from_regional_prompter({**RP, "RP Matrix submode": "Rows", "RP Ratios": "1,1,1;2,1,2", "RP Flip": "True"},
                                               "a BREAK b BREAK c BREAK d")
    assert boxes(flipped) == boxes(rows)


def test_regional_prompter_modes_without_boxes_are_refused():
    with pytest.raises(MigcError, match="Mask mode"):
        importers.from_regional_prompter({**RP, "RP Divide mode": "Mask"}, "a BREAK b")
    out = importers.from_regional_prompter(RP, "a BREAK b")
    assert "2 prompt part(s) for 3 region(s)" in out.message()


FC = {"forge_couple": "True", "forge_couple_compatibility": "False", "forge_couple_mode": "Basic", "forge_couple_separator": "\\n",
      "forge_couple_direction": "Horizontal", "forge_couple_background": "First Line", "forge_couple_background_weight": "0.5"}


def test_forge_couple_basic_with_a_background_line():
    out = importers.from_forge_couple(FC, "a park\na man\na woman\na dog", width=1000, height=512)
    tile = 334 / 1000  # ceil(1000 / 3) px per tile, the last one clipped
    assert out.global_prompt == "a park"
    assert boxes(out) == [("a man", [0, 0, tile, 1]), ("a woman", [tile, 0, 2 * tile, 1]), ("a dog", [2 * tile, 0, 1, 1])]


def test_forge_couple_advanced_mapping_in_both_of_its_formats():
    mapping = json.dumps([[0.0, 0.5, 0.0, 1.0, 1.0], [0.5, 1.0, 0.2, 0.8, 1.5]])
    params = {**FC, "forge_couple_mode": "Advanced", "forge_couple_mapping": mapping, "forge_couple_separator": "|"}
    out = importers.from_forge_couple(params, "a cat | a dog")
    assert boxes(out) == [("a cat", [0, 0, 0.5, 1]), ("a dog", [0.5, 0.2, 1, 0.8])] and "weights" in out.message()
    legacy = {**params, "forge_couple_mapping": [["0.00:0.50", "0.00:1.00", "1.0"], ["0.50:1.00", "0.20:0.80", "1.5"]]}
    assert boxes(importers.from_forge_couple(legacy, "a cat | a dog")) == boxes(out)


def test_tiled_diffusion_infotext_and_saved_config():
    region = {"enable": True, "x": 0.1, "y": 0.2, "w": 0.3, "h": 0.5, "prompt": "a red car", "neg_prompt": "blurry",
              "blend_mode": "Foreground", "feather_ratio": 0.2, "seed": -1}
    infotext = {"Method": "MultiDiffusion", "Region control": {"Region 1": region, "Region 3": {**region, "enable": False}}}
    out = importers.from_tiled_diffusion({"Tiled Diffusion": infotext})
    assert boxes(out) == [("a red car", [0.1, 0.2, 0.4, 0.7])] and out.instances[0]["negative"] == "blurry"
    assert "feathering" in out.message()
    saved = importers.from_text(json.dumps({"bbox_controls": [region]}))
    assert boxes(saved) == boxes(out)


def test_gligen_gui_file_in_canvas_pixels():
    saved = {"stringProps": {"canvasWidth": "768", "canvasHeight": 512, "positivePrompt": "a beach"},
             "mapProps": {"loraMap": [], "boxMap": [[1709000000000, {"id": 1, "x1": 384, "y1": 256, "x2": 96, "y2": 64,
                                                                       "color": "#f00", "visible": True, "caption": "a crab"}],
                                                    [1709000000001, {"id": 2, "x1": 0, "y1": 0, "x2": 8, "y2": 8}]]}}
    out = importers.from_text(json.dumps(saved))
    assert boxes(out) == [("a crab", [0.125, 0.125, 0.5, 0.5])] and out.global_prompt == "a beach"
    assert "1 box(es) without a caption" in out.message()


def test_pasting_an_infotext_with_regional_prompter_entries_turns_migc_on_with_those_boxes():
    values, message = pasted_values({**RP, "Prompt": "a cat BREAK a dog BREAK a bird", "Size-1": "512", "Size-2": "512"})
    panel = dict(zip(UI_FIELDS, values))
    assert panel["enabled"] is True and json.loads(panel["layout"])["instances"][0]["description"] == "a cat"
    assert message.startswith("Imported 3 box(es) from Regional Prompter")


def test_nothing_to_import_says_what_can_be():
    with pytest.raises(MigcError, match="GLIGEN GUI file"):
        importers.from_text('{"something": 1}')
