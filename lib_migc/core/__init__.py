"""Pieces every mode and host uses, free of any mode and any host: the layout and its masks, the mask
codec, errors, drawing, UNet layer naming, text encoding, safe loading, memory release, settings."""
