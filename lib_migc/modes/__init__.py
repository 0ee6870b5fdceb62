"""One package per mode: ``migc`` (MIGC, MIGC++ and the naive shader), ``multidiffusion``, ``structure``
(StructureDiffusion) and ``magicfusion``, each behind the interface of :mod:`.base` and listed in
:mod:`.registry`; ``README.md`` here documents the interface and how to add a mode. A mode package never
imports a host module."""
