"""MultiDiffusion's region mode: each box a prompt of its own, the denoiser's rows fused per pixel
(``method``: the official fusion; ``runtime``: rows, chunks and bootstrapping; ``mode``: checks and install)."""
