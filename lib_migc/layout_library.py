"""Saved layouts: a small library of named layouts, one JSON file each, in the WebUI's data directory.

Why files and not the WebUI's settings: a layout can carry masks (PNG data URLs, tens of KB) and users
share them; a folder of ``<name>.json`` files (``<data dir>/migc_layouts``) can be copied, versioned
and edited by hand. Every layout is validated when saved and when loaded, with the layout's own
messages. Listed over the API at ``GET /migc/layouts`` (names) and ``GET /migc/layouts/{name}``.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any

from .core.errors import MigcError
from .core.layout import parse_layout

FOLDER_NAME = "migc_layouts"
_NAME = re.compile(r"^[\w][\w .\-]{0,63}$")


def folder() -> str:
    """``<WebUI data dir>/migc_layouts`` (outside the WebUI, e.g. the demo app: ``$MIGC_DATA_DIR`` or ``.``)."""
    try:
        from modules import paths_internal

        base = paths_internal.data_path
    except (ImportError, AttributeError):
        base = os.environ.get("MIGC_DATA_DIR") or os.getcwd()
    return os.path.join(base, FOLDER_NAME)


def _path(name: str) -> str:
    name = (name or "").strip()
    if not _NAME.match(name) or name.endswith("."):
        raise MigcError(f"MIGC saved layouts: the name {name!r} is not allowed; use 1 to 64 letters, digits, spaces, "
                        "'_', '-' or '.', starting with a letter or digit.")
    return os.path.join(folder(), name + ".json")


def names() -> list[str]:
    """The saved layouts' names, sorted case-insensitively."""
    try:
        files = os.listdir(folder())
    except FileNotFoundError:
        return []
    return sorted((f[:-5] for f in files if f.endswith(".json") and _NAME.match(f[:-5])), key=str.lower)


def save(name: str, layout_json: str) -> str:
    """Validate and store ``layout_json`` under ``name`` (replacing one of that name); returns the name."""
    layout = parse_layout(layout_json)
    if not len(layout):
        raise MigcError("MIGC saved layouts: the layout has no instances; draw at least one box before saving.")
    path = _path(name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump(layout.to_dict(), out, ensure_ascii=False, indent=1)
    os.replace(temporary, path)  # a reader never sees half a file
    return name.strip()


def load(name: str) -> str:
    """The saved layout's JSON (validated), as the panel's layout box holds it."""
    path = _path(name)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise MigcError(f"MIGC saved layouts: there is no layout named {name.strip()!r}; saved: {', '.join(names()) or 'none'}.") from None
    return parse_layout(text).to_json()


def delete(name: str) -> bool:
    """Remove a saved layout; False when there was none of that name."""
    try:
        os.remove(_path(name))
    except FileNotFoundError:
        return False
    return True


def add_api_routes(app: Any) -> None:
    """``GET /migc/layouts`` and ``GET /migc/layouts/{name}`` (404 for an unknown name, 422 for a bad one)."""
    from fastapi import HTTPException

    def list_layouts() -> dict[str, Any]:
        return {"folder": folder(), "layouts": names()}

    def get_layout(name: str) -> dict[str, Any]:
        try:
            return {"name": name, "layout": json.loads(load(name))}
        except MigcError as exc:
            raise HTTPException(status_code=404 if "there is no layout" in str(exc) else 422, detail=str(exc)) from None

    app.add_api_route("/migc/layouts", list_layouts, methods=["GET"])
    app.add_api_route("/migc/layouts/{name}", get_layout, methods=["GET"])
