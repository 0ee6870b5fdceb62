"""MagicFusion: a second checkpoint's predictions blended in by saliency (``params``, ``method``: the
official blend; ``runtime``: rows and model B's cache; ``weights``: model B's file; ``mode``: checks and install)."""
