"""Consistent-MIG's field (``consistent``): off, on (record, then edit), or "reset" (forget the record,
then record this image). Torch-free. Infotexts say which of the two an image was ("record" / "edit");
pasted back, either turns the option on."""
from __future__ import annotations

from typing import Any

from ...core.errors import MigcError

RESET = "reset"
#: The tab whose last image is recorded (one record; the panel and the API share it).
TAB = "txt2img"
#: What the infotext says an image was: the first of a series, or an edit of the one before.
RECORDED, EDITED = "record", "edit"


def check(value: Any) -> bool | str:
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in (RESET, RECORDED, EDITED):
        return RESET if value.strip().lower() == RESET else True
    raise MigcError(f"MIGC: field 'consistent' = {value!r} is not allowed; use true (keep unchanged instances: "
                    f"record, then edit), false, or \"{RESET}\" (forget the record and record this image).")
