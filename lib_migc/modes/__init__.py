"""One package per mode: ``migc`` (MIGC, MIGC++ and the naive shader), ``multidiffusion``, ``structure``
(StructureDiffusion) and ``magicfusion``. Each holds its torch-free parameters, its pure method, its
runtime and what it checks before a job; a mode package never imports a host module."""
