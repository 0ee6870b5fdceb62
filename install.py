"""Runs at WebUI start (and after "Install from URL"): install only what is missing, with the WebUI's pip."""
import launch

for module, requirement in (("einops", "einops"), ("safetensors", "safetensors")):
    if not launch.is_installed(module):
        launch.run_pip(f"install {requirement}", f"sd-webui-migc requirement: {requirement}")
