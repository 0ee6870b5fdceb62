import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import SHARED, build_unet, random_official_state  # noqa: E402

#: Two instances used by the host-adapter tests.
INSTANCES = [{"description": "a red ball", "box": [0.05, 0.1, 0.5, 0.9]},
             {"description": "a blue cube", "box": [0.45, 0.2, 0.95, 0.7]}]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.fail(f"the shared reference data is missing at {SHARED} (set MIGC_SHARED_DIR)")
    return SHARED


@pytest.fixture(scope="session")
def unet():
    """The real ldm UNet, SD1.x layout, model_channels=32 (C = 128 at the MIGC layers)."""
    return build_unet(model_channels=32, seed=0)


@pytest.fixture(scope="session")
def text_model():
    import fake_webui

    return fake_webui.tiny_text_model()


@pytest.fixture()
def webui_modules(tmp_path):
    """The WebUI's ``modules.*`` stand-ins with a models folder holding tiny MIGC weights (``tiny.safetensors``)."""
    from safetensors.torch import save_file

    import fake_webui
    from lib_migc import job

    save_file(random_official_state(seed=5, channels=128), str(tmp_path / "tiny.safetensors"))
    fake_webui.install_fake_modules(str(tmp_path))
    job._finish()
    yield tmp_path
    job._finish()
    fake_webui.remove_fake_modules()
