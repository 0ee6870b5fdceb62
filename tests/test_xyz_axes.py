"""MIGC's axes in the X/Y/Z plot: registered on the loaded ``xyz_grid`` module, applied per cell, checked."""
import sys
import types
from copy import copy
from types import SimpleNamespace

import pytest

import fake_webui
from conftest import INSTANCES
from helpers import finish_job, start_job
from lib_migc import xyz_axes
from lib_migc.params import INFOTEXT_KEY, MigcParams


class AxisOption:  # scripts/xyz_grid.py's AxisOption (A1111 v1.10 and Forge): the constructor's signature
    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.format_value = label, type, apply, format_value
        self.confirm, self.cost, self.choices, self.prepare = confirm, cost, choices, prepare


@pytest.fixture()
def xyz_grid(webui_modules):
    """A loaded ``xyz_grid.py`` among ``modules.scripts.scripts_data``, as the WebUI lists its scripts."""
    module = types.ModuleType("xyz_grid.py")
    module.AxisOption = AxisOption
    module.axis_options = [AxisOption("Nothing", str, lambda p, x, xs: None), AxisOption("Seed", int, lambda p, x, xs: None)]
    script_class = type("Script", (), {"__module__": "xyz_grid.py"})
    scripts = sys.modules["modules"].scripts = types.ModuleType("modules.scripts")
    scripts.scripts_data = [SimpleNamespace(script_class=type("Other", (), {"__module__": "other.py"}), module=None),
                            SimpleNamespace(script_class=script_class, module=module)]
    sys.modules["modules.scripts"] = scripts
    yield module
    del sys.modules["modules.scripts"]


def test_every_axis_is_registered_once(xyz_grid):
    assert xyz_axes.register() == len(xyz_axes.AXES)
    assert xyz_axes.register() == 0
    labels = [option.label for option in xyz_grid.axis_options]
    assert labels[:2] == ["Nothing", "Seed"] and labels[2:] == [axis.label for axis in xyz_axes.AXES]


def test_a_cell_gets_its_own_values_and_the_plot_copy_is_not_shared(xyz_grid):
    xyz_axes.register()
    options = {option.label: option for option in xyz_grid.axis_options}
    p = SimpleNamespace()
    cell_a, cell_b = copy(p), copy(p)
    options["MIGC steps"].apply(cell_a, 0.3, [0.3, 0.7])
    options["MIGC EA scale (every instance)"].apply(cell_a, 2.0, [2.0])
    options["MIGC steps"].apply(cell_b, 0.7, [0.3, 0.7])
    assert getattr(cell_a, xyz_axes.OVERRIDES) == {"migc_steps": 0.3, "ea": 2.0}
    assert getattr(cell_b, xyz_axes.OVERRIDES) == {"migc_steps": 0.7}
    assert not hasattr(p, xyz_axes.OVERRIDES)


@pytest.mark.parametrize("label, bad", [("MIGC steps", 1.5), ("MIGC mode", "tiles"), ("MIGC MagicFusion k_a", -1.0),
                                        ("MIGC StructureDiffusion mode", "loud")])
def test_bad_values_stop_the_plot_with_the_webuis_message(xyz_grid, label, bad):
    xyz_axes.register()
    option = {option.label: option for option in xyz_grid.axis_options}[label]
    with pytest.raises(RuntimeError, match=label):
        option.confirm(None, [bad])


def test_section_axes_turn_their_section_on_and_instance_axes_reach_every_instance():
    params = MigcParams.from_api({"instances": INSTANCES, "md_window": 768, "mode": "migc"})
    out = xyz_axes.with_overrides(params, {"sac": 1.5, "structure.mode": "conjunction", "mode": "multidiffusion"})
    assert [inst.sac for inst in out.layout.instances] == [1.5, 1.5]
    assert out.structure.enabled and out.structure.mode == "conjunction"
    assert out.mode == "multidiffusion" and out.md_window == 768, "the panel's window survives the mode switch"
    assert xyz_axes.with_overrides(params, None) is params


def test_the_job_applies_the_cell_values_and_its_infotext_pastes_back(webui_modules, unet, text_model):
    model = fake_webui.FakeSDModel(unet, text_model)
    payload = {"enabled": True, "weights": "tiny.safetensors", "instances": INSTANCES, "migc_steps": 0.5}
    entries = {}
    for steps in (0.3, 0.8):
        p = fake_webui.FakeProcessing(model)
        setattr(p, xyz_axes.OVERRIDES, {"migc_steps": steps})
        start_job(p, [payload])
        finish_job(p)
        entries[steps] = p.extra_generation_params[INFOTEXT_KEY]
        assert MigcParams.from_infotext(entries[steps]).migc_steps == steps
    assert entries[0.3].replace('"migc_steps":0.3', '"migc_steps":0.8') == entries[0.8], "only that field differs"
