"""Layouts from a file: JSON Lines and the COCO-MIG YAML parsed and checked, and the loop the Script runs."""
import json
import sys
import types
from types import SimpleNamespace

import pytest

from lib_migc import layout_file
from lib_migc.core.errors import MigcError
from lib_migc.params import MigcParams
from lib_migc.xyz_axes import OVERRIDES, with_overrides

# Two entries in the format of the official bench_file/mig_bench_anno.yaml (written here, not copied).
COCO_MIG = """\
a photo of a red cup and a blue cup:
  a blue cup:
  - - 0.5
    - 0.1
    - 0.9
    - 0.6
  a red cup:
  - - 0.05
    - 0.2
    - 0.4
    - 0.7
  - - 0.1
    - 0.75
    - 0.3
    - 0.95
  coco_id: '12'
? a photo of a green apple and a yellow banana and a long prompt that yaml folds onto a
  second line
: a green apple:
  - - 0.0
    - 0.0
    - 0.5
    - 0.5
  coco_id: '7'
"""
LINE = {"prompt": "a kitchen", "layout": {"instances": [{"description": "a red cup", "box": [0.1, 0.1, 0.4, 0.5]}]}}


def test_coco_mig_yaml_gives_one_instance_per_box_and_the_coco_id():
    entries = layout_file.parse(COCO_MIG)
    assert [e.name for e in entries] == ["12", "7"]
    assert entries[0].prompt == "a photo of a red cup and a blue cup"
    assert [(i["description"], i["box"]) for i in entries[0].layout["instances"]] == [
        ("a blue cup", [0.5, 0.1, 0.9, 0.6]), ("a red cup", [0.05, 0.2, 0.4, 0.7]), ("a red cup", [0.1, 0.75, 0.3, 0.95])]
    assert entries[1].prompt.endswith("long prompt that yaml folds onto a second line")


def test_json_lines_with_comments_and_blank_lines():
    text = "# my layouts\n\n" + json.dumps(LINE) + "\n" + json.dumps({**LINE, "seed": 5, "negative_prompt": "blurry"}) + "\n"
    entries = layout_file.parse(text)
    assert [(e.where, e.seed, e.negative_prompt) for e in entries] == [("line 3", None, None), ("line 4", 5, "blurry")]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x", "layout": {"instances": [{"description": "a", "box": [0.5, 0, 0.2, 1]}]}}', "line 2: .*instances\\[0\\]"),
    ('{"prompt": "x", "layout": {}, "steps": 3}', "line 2: unknown key\\(s\\) 'steps'"),
    ('{"prompt": "x", "layout": {}, "seed": "7"}', "line 2: 'seed' must be an integer"),
    ('{"prompt": "x", ', "line 2: not valid JSON"),
])
def test_errors_name_the_line(line, message):
    with pytest.raises(MigcError, match=message):
        layout_file.parse(json.dumps(LINE) + "\n" + line)


def test_yaml_errors_name_the_entry():
    with pytest.raises(MigcError, match="entry 1 \\('a photo'\\): 'a cup' must have a list"):
        layout_file.parse("a photo:\n  a cup: 3\n")
    with pytest.raises(MigcError, match="empty"):
        layout_file.parse("\n# nothing\n")


def test_an_entry_replaces_the_panels_instances_and_keeps_its_settings():
    panel = MigcParams.from_api({"instances": [{"description": "old", "box": [0, 0, 1, 1]}], "migc_steps": 0.3, "enabled": False})
    entry = layout_file.parse(COCO_MIG)[0]
    out = with_overrides(panel, {"enabled": True, **entry.layout})
    assert out.enabled and out.migc_steps == 0.3 and out.layout.descriptions == ["a blue cup", "a red cup", "a red cup"]


@pytest.fixture()
def webui(monkeypatch):
    """``modules.processing`` / ``shared`` / ``images`` as far as the loop uses them (their signatures)."""
    calls, saved = [], []
    processing = types.ModuleType("modules.processing")

    class Processed:
        def __init__(self, p, images_list, seed=-1, info="", subseed=None, all_prompts=None, all_seeds=None,
                     all_subseeds=None, index_of_first_image=0, infotexts=None, comments=""):
            self.images, self.all_prompts, self.infotexts = images_list, all_prompts, infotexts

    def process_images(p):
        calls.append(SimpleNamespace(prompt=p.prompt, seed=p.seed, overrides=getattr(p, OVERRIDES), negative=p.negative_prompt,
                                     no_save=getattr(p, "do_not_save_samples", False)))
        return Processed(p, [f"image {len(calls)}"], all_prompts=[p.prompt], infotexts=[f"info {len(calls)}"])

    def fix_seed(p):
        p.seed = 1000 if p.seed == -1 else p.seed

    processing.Processed, processing.process_images, processing.fix_seed = Processed, process_images, fix_seed
    shared = types.ModuleType("modules.shared")
    shared.state = SimpleNamespace(job_count=0, job="", interrupted=False)
    shared.opts = SimpleNamespace(samples_format="png")
    images = types.ModuleType("modules.images")
    images.save_image = lambda image, path, basename, seed=None, prompt=None, extension="png", info=None, p=None, suffix="", **kw: \
        saved.append((image, seed, suffix, info))
    modules = types.ModuleType("modules")
    modules.processing, modules.shared, modules.images = processing, shared, images
    for name, module in {"modules": modules, "modules.processing": processing, "modules.shared": shared, "modules.images": images}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return SimpleNamespace(calls=calls, saved=saved, state=shared.state)


def test_the_loop_makes_seeds_per_layout_images_and_names_files_by_coco_id(webui):
    p = SimpleNamespace(prompt="panel prompt", negative_prompt="panel negative", seed=-1, n_iter=1, outpath_samples="out")
    processed = layout_file.run(p, COCO_MIG, 2)
    assert webui.state.job_count == 4
    assert [(c.prompt[:20], c.seed) for c in webui.calls] == [("a photo of a red cup", 1000), ("a photo of a red cup", 1001),
                                                              ("a photo of a green a", 1000), ("a photo of a green a", 1001)]
    assert all(c.overrides["enabled"] and c.no_save and c.negative == "panel negative" for c in webui.calls)
    assert [s[2] for s in webui.saved] == ["-coco12-0", "-coco12-1", "-coco7-0", "-coco7-1"]
    assert [s[3] for s in webui.saved] == ["info 1", "info 2", "info 3", "info 4"], "each image keeps its own infotext"
    assert processed.images == ["image 1", "image 2", "image 3", "image 4"]
    assert not hasattr(p, OVERRIDES), "the job's own p is left as it was"
