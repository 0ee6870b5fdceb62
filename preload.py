"""Command-line options of sd-webui-migc, read by the WebUI before it parses its arguments."""


def preload(parser):
    parser.add_argument(
        "--migc-models-dir",
        type=str,
        default=None,
        help="folder with MIGC weights (MIGC_SD14.ckpt / .safetensors); default: models/MIGC",
    )
