"""Saved layouts: files in the WebUI's data directory, validated both ways, listed over the API."""
import json
import os
import sys
import types

import pytest

from conftest import INSTANCES
from lib_migc import layout_library
from lib_migc.core.errors import MigcError
from lib_migc.core.layout import LayoutError

LAYOUT = json.dumps({"instances": INSTANCES})


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    """``modules.paths_internal.data_path`` as the WebUI sets it (--data-dir)."""
    module = types.ModuleType("modules.paths_internal")
    module.data_path = str(tmp_path)
    monkeypatch.setitem(sys.modules, "modules.paths_internal", module)
    monkeypatch.setitem(sys.modules, "modules", types.ModuleType("modules"))
    sys.modules["modules"].paths_internal = module
    return tmp_path


def test_save_list_load_delete(data_dir):
    assert layout_library.names() == []
    assert layout_library.save(" cat and ball ", LAYOUT) == "cat and ball"
    layout_library.save("Bedroom-2.v1", LAYOUT)
    assert layout_library.names() == ["Bedroom-2.v1", "cat and ball"]
    assert os.path.isfile(data_dir / "migc_layouts" / "cat and ball.json")
    assert json.loads(layout_library.load("cat and ball"))["instances"][1]["description"] == "a blue cube"
    assert layout_library.delete("cat and ball") and not layout_library.delete("cat and ball")
    assert layout_library.names() == ["Bedroom-2.v1"]


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "x" * 65, "ends with dot."])
def test_names_that_could_leave_the_folder_or_confuse_it_are_refused(name):
    with pytest.raises(MigcError, match="is not allowed"):
        layout_library.save(name, LAYOUT)


def test_invalid_and_empty_layouts_are_refused_with_the_layouts_own_message(data_dir):
    with pytest.raises(LayoutError, match="instances\\[0\\]"):
        layout_library.save("bad", json.dumps({"instances": [{"description": "x", "box": [0.5, 0, 0.2, 1]}]}))
    with pytest.raises(MigcError, match="no instances"):
        layout_library.save("empty", "{}")
    (data_dir / "migc_layouts").mkdir(exist_ok=True)
    (data_dir / "migc_layouts" / "edited by hand.json").write_text('{"instances": [{"description": "x"}]}')
    with pytest.raises(LayoutError):
        layout_library.load("edited by hand")
    with pytest.raises(MigcError, match="there is no layout named 'missing'; saved: edited by hand"):
        layout_library.load("missing")


def test_the_api_lists_and_returns_layouts(data_dir):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    layout_library.add_api_routes(app)
    client = TestClient(app)
    layout_library.save("two", LAYOUT)
    listed = client.get("/migc/layouts").json()
    assert listed["layouts"] == ["two"] and listed["folder"].endswith("migc_layouts")
    assert client.get("/migc/layouts/two").json()["layout"]["instances"][0]["box"] == INSTANCES[0]["box"]
    assert client.get("/migc/layouts/nothing").status_code == 404
    assert client.get("/migc/layouts/..%2Fx").status_code in (404, 422)
