"""Convert MIGC weights to ``.safetensors`` once, so later loads never touch pickle.

    python -m lib_migc.convert MIGC_SD14.ckpt MIGC_SD14.safetensors

The input is read with the allow-list unpickler (lib_migc.core.safe_pickle) and validated as MIGC weights; keys are kept
as they are. ``--trust`` allows a full unpickle for a file whose top level holds other Python objects
that the safe loader refuses: use it only for a file you trust, since unpickling can run code.
"""
from __future__ import annotations

import argparse
import sys

from .core.errors import CheckpointError
from .core.unet_layers import layer_sort_key
from .modes.migc.checkpoint import check_state, read_state_dict


def convert(src: str, dst: str, trust_pickle: bool = False) -> int:
    """Write the validated tensors of ``src`` to ``dst`` (safetensors); return the number of tensors."""
    from safetensors.torch import save_file

    state = read_state_dict(src, trust_pickle=trust_pickle)
    kind, layers, _ = check_state(state, src)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        dst,
        metadata={"format": "pt", "migc_kind": kind, "migc_layers": ",".join(sorted(layers, key=layer_sort_key))},
    )
    return len(state)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_migc.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="MIGC weights (.ckpt/.pt/.pth or .safetensors)")
    parser.add_argument("dst", help="output .safetensors file")
    parser.add_argument("--trust", action="store_true", help="fully unpickle SRC (runs code from the file; only for files you trust)")
    args = parser.parse_args(argv)
    if not args.dst.lower().endswith(".safetensors"):
        parser.error("the output file must end in .safetensors")
    if args.trust:
        print("warning: --trust unpickles the file completely; only do this for files you trust", file=sys.stderr)
    try:
        count = convert(args.src, args.dst, trust_pickle=args.trust)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {count} tensors to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
