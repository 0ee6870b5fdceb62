"""Each mode together with the extensions that ship with the WebUIs and need no model files.

Forge: its built-in Dynamic Thresholding, FreeU, Perturbed-Attention Guidance and Self-Attention Guidance
(CFG functions, extra UNet passes, attention patches). A1111: the built-in Hypertile (tiles self-attention)
and the standalone Dynamic Thresholding extension, when installed. Each combination runs and is
deterministic; where our mode is inactive, the image equals "that extension alone" bit for bit.
"""
import pytest

from .conftest import alwayson_script, enabled_args, find_model_b, pixels

BASE = {"prompt": "a red ball and a gray cat in a room", "negative_prompt": "", "steps": 3, "width": 128, "height": 128,
        "sampler_name": "Euler", "cfg_scale": 7, "seed": 4242, "batch_size": 1}
BOXES = [{"description": "a red ball", "box": [0.0625, 0.125, 0.5, 0.875]},
         {"description": "a gray cat", "box": [0.5, 0.25, 0.9375, 0.75]}]
#: How each extension's always-on script is named in script-info (Forge's built-ins, A1111's standalone DT).
SCRIPTS = {"dynamic thresholding": ("dynamicthresholding", "dynamic thresholding"), "freeu": ("freeu",),
           "pag": ("perturbedattentionguidance",), "sag": ("selfattentionguidance",)}
MODES = {
    "migc": {"weights": "MIGC_SD14.ckpt", "instances": BOXES, "migc_steps": 1.0},
    "naive": {"mode": "naive", "weights": "none.ckpt", "instances": BOXES},
    "multidiffusion": {"mode": "multidiffusion", "instances": BOXES},
    "structure": {"enabled": False, "instances": BOXES, "structure": {"enabled": True}},
    "magicfusion": None,  # needs model B, filled in by the fixture
}
#: Our part present but doing nothing: MIGC outside its steps, MagicFusion outside its window.
INACTIVE = {
    "migc": {"weights": "MIGC_SD14.ckpt", "instances": BOXES, "migc_steps": 0.0, "naive_steps": 0.0, "append_descriptions": False},
    "magicfusion": None,
}


def _other(webui, key: str) -> tuple[str, dict]:
    """(name for alwayson_scripts, how to turn the extension on) — a script, or A1111's Hypertile options."""
    if key == "hypertile":
        return "hypertile", {}
    script = next(filter(None, (alwayson_script(webui, name) for name in SCRIPTS[key])), None)
    if script is None:
        pytest.skip(f"this WebUI has no '{key}' extension")
    return script["name"], {"args": enabled_args(script)}


@pytest.fixture(scope="module")
def model_b(webui):
    return find_model_b(webui)


def _request(webui, key, ours, hypertile_options=None):
    request = dict(BASE)
    scripts = {}
    if key == "hypertile":
        request["override_settings"] = hypertile_options
        request["override_settings_restore_afterwards"] = True
    else:
        name, entry = _other(webui, key)
        scripts[name] = entry
    if ours is not None:
        scripts["MIGC"] = {"args": [ours]}
    request["alwayson_scripts"] = scripts
    return request


def _image(webui, request):
    status, body = webui.txt2img(request)
    assert status == 200, body
    return pixels(body["images"][0])


def _mode_args(mode, model_b):
    if mode == "magicfusion":
        if model_b is None:
            pytest.skip("no second checkpoint for MagicFusion's model B")
        return {"enabled": False, "magicfusion": {"enabled": True, "model_b": model_b, "switch_t": 0}}
    return MODES[mode]


def _inactive_args(mode, model_b):
    if mode == "magicfusion":
        if model_b is None:
            pytest.skip("no second checkpoint for MagicFusion's model B")
        return {"enabled": False, "magicfusion": {"enabled": True, "model_b": model_b, "window_mode": "SNB-then-A", "switch_t": 1000}}
    return INACTIVE[mode]


EXTENSIONS = ["dynamic thresholding", "freeu", "pag", "sag", "hypertile"]


@pytest.fixture(scope="module")
def alone(webui):
    """Each extension alone (cached per extension)."""
    return {}


def _alone(webui, alone, key, hypertile_options=None):
    if key not in alone:
        alone[key] = _image(webui, _request(webui, key, None, hypertile_options))
    return alone[key]


def _hypertile_options(webui, key):
    if key != "hypertile":
        return None
    _, options = webui.request("/sdapi/v1/options")
    if "hypertile_enable_unet" not in options:
        pytest.skip("this WebUI has no Hypertile")
    return {"hypertile_enable_unet": True, "hypertile_max_tile_unet": 64, "hypertile_swap_size_unet": 3}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("key", EXTENSIONS)
def test_each_mode_runs_beside_the_extension_deterministically(webui, model_b, alone, key, mode):
    options = _hypertile_options(webui, key)
    request = _request(webui, key, _mode_args(mode, model_b), options)
    first, second = _image(webui, request), _image(webui, request)
    assert (first == second).all(), f"{mode} with {key} is not deterministic"
    assert abs(first - _alone(webui, alone, key, options)).mean() > 0.1, f"{mode} changed nothing beside {key}"


@pytest.mark.parametrize("mode", list(INACTIVE))
@pytest.mark.parametrize("key", EXTENSIONS)
def test_where_our_mode_is_inactive_the_image_is_the_extension_alone(webui, model_b, alone, key, mode):
    options = _hypertile_options(webui, key)
    image = _image(webui, _request(webui, key, _inactive_args(mode, model_b), options))
    assert (image == _alone(webui, alone, key, options)).all(), f"inactive {mode} changed the image made with {key}"
    disabled = _image(webui, _request(webui, key, {"enabled": False}, options))
    assert (disabled == _alone(webui, alone, key, options)).all()
