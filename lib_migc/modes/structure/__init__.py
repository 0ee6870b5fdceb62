"""StructureDiffusion: noun-phrase encodings mixed into the cross-attention values (``params``, ``spans``,
``attention``: the official attention; ``method``: the per-pass runtime)."""
