"""sd-webui-migc: MIGC (Multi-Instance Generation Controller) for the AUTOMATIC1111 WebUI and Forge.

Everything but the WebUI wiring lives here; ``scripts/migc.py`` only connects WebUI callbacks to it.
"""
