"""MIGC and MIGC++ (trained layers on the attn2 of the 8x8 middle block and 16x16 decoder blocks) and the
weight-free naive shader: the modules, the checkpoint reader, the weights store, the shading and the
per-job session the attention hooks call."""
