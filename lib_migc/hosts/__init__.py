"""Thin adapters between the WebUI hosts (AUTOMATIC1111, Forge) and the shared MIGC core."""
