"""Integration tests drive a running WebUI (A1111 or Forge) with this extension installed.

Set MIGC_WEBUI_URL (e.g. http://127.0.0.1:7860) and put MIGC weights named MIGC_SD14.ckpt in its
models/MIGC folder (random weights in the official layout are fine). Without the variable every
test here is skipped.
"""
import base64
import io
import json
import os
import urllib.error
import urllib.request

from pathlib import Path

import pytest

URL = os.environ.get("MIGC_WEBUI_URL", "").rstrip("/")


def belongs_here(item) -> bool:
    """Whether ``item`` is a test of this folder, by its node id (relative to the rootdir), so a checkout
    that happens to sit under a folder of the same name still runs every other suite."""
    here = Path(__file__).resolve().parent.relative_to(Path(str(item.config.rootpath)).resolve()).as_posix()
    return item.nodeid.startswith(here + "/")


def pytest_collection_modifyitems(items):
    for item in items:
        if belongs_here(item):
            item.add_marker(pytest.mark.integration)
            if not URL:
                item.add_marker(pytest.mark.skip(reason="set MIGC_WEBUI_URL to run against a WebUI"))


class WebUI:
    def __init__(self, url: str) -> None:
        self.url = url

    def request(self, path: str, data=None, timeout: float = 900):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            text = exc.read()
            try:
                return exc.code, json.loads(text)
            except ValueError:
                return exc.code, {"raw": text.decode(errors="replace")}

    def txt2img(self, payload):
        return self.request("/sdapi/v1/txt2img", payload)


def pixels(b64: str):
    """Decoded pixels (infotext chunks make PNG bytes differ even for equal images)."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype("int16")


def migc_entry(infotext: str) -> dict:
    """An image's MIGC infotext entry as a dict (the WebUI quotes its JSON as a string)."""
    quoted, _ = json.JSONDecoder().raw_decode(infotext[infotext.index("MIGC: ") + len("MIGC: "):])
    return json.loads(quoted)


def payload(base: dict, prompt: str, args=None, **extra) -> dict:
    """A txt2img request: ``base`` with ``prompt``, and the MIGC script's ``args`` when given."""
    out = {**base, "prompt": prompt, **extra}
    if args is not None:
        out["alwayson_scripts"] = {"MIGC": {"args": args}}
    return out


def generate(webui, request: dict) -> dict:
    """POST a txt2img request that must succeed; its answer."""
    status, body = webui.txt2img(request)
    assert status == 200, body
    return body


@pytest.fixture(scope="session")
def webui():
    return WebUI(URL)


def find_model_b(webui) -> str | None:
    """The title of MagicFusion's model B: MIGC_MODEL_B, else the first checkpoint other than the loaded one."""
    webui.request("/sdapi/v1/refresh-checkpoints", {})
    _, models = webui.request("/sdapi/v1/sd-models")
    _, options = webui.request("/sdapi/v1/options")
    loaded = options.get("sd_model_checkpoint", "")
    titles = [m["title"] for m in models]
    wanted = os.environ.get("MIGC_MODEL_B")
    if wanted:
        match = [t for t in titles if wanted in t]
        assert match, f"MIGC_MODEL_B={wanted!r} is not in the checkpoint list {titles}"
        return match[0]
    others = [t for t in titles if t != loaded and t.split(" [")[0] not in loaded]
    return others[0] if others else None


def alwayson_script(webui, name_part: str, txt2img: bool = True) -> dict | None:
    """The script-info entry of an always-on script whose name contains ``name_part`` (case-insensitive)."""
    _, info = webui.request("/sdapi/v1/script-info")
    for script in info:
        if name_part.lower() in script["name"].lower() and script["is_img2img"] != txt2img and script["is_alwayson"]:
            return script
    return None


def enabled_args(script: dict, **overrides) -> list:
    """A script's argument defaults with its first argument (its on/off switch) turned on."""
    values = [arg.get("value") for arg in script["args"]]
    values[0] = True
    for index, value in overrides.items():
        values[int(index.lstrip("a"))] = value
    return values


def server_rss_bytes(url: str) -> int | None:
    """Resident memory of the local process listening on ``url``'s port (Linux /proc), or None."""
    import re

    port = int(re.search(r":(\d+)", url.split("//", 1)[-1]).group(1))
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                for line in f.readlines()[1:]:
                    parts = line.split()
                    if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "0A":
                        inodes.add(parts[9])
        except OSError:
            continue
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            return int(line.split()[1]) * 1024
    return None
