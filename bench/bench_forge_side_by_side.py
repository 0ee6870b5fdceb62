"""This extension's MultiDiffusion panorama beside Forge's built-in ``sd_forge_multidiffusion``, on a running Forge.

    python bench/bench_forge_side_by_side.py --url http://127.0.0.1:7861 --pid PID_OF_FORGE
                                             [--size 512x2048] [--tile 512] [--stride 128] [--steps 10] [--repeats 2]

The same prompt, seed, sampler and size through the HTTP API: once with Forge's "MultiDiffusion
Integrated" script (method MultiDiffusion, ``--tile`` square tiles, overlap = tile - stride, 4 tiles
per batch) and once with this extension (mode multidiffusion, no boxes, ``md_window`` = tile,
``md_stride``), alternating, ``--repeats`` times each. Prints the median whole-request time of each and
the peak growth of the server's resident memory during its requests (``/proc/PID/status`` VmRSS
sampled every 50 ms: on a CPU host that is where the UNet's and the VAE's memory go; on a GPU host read
the GPU's instead), and how far the two images are apart. Asserts nothing.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import threading
import time
import urllib.request


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url + "/sdapi/v1/txt2img", json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3600) as response:
        return json.loads(response.read())


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def measured(url: str, pid: int, payload: dict) -> tuple[float, float, dict]:
    """(seconds, peak RSS growth in MiB, response) of one request."""
    base, peak, done = rss_mib(pid), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    body = post(url, payload)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return seconds, max(0.0, peak[0] - base), body


def pixels(body: dict):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).convert("RGB")).astype("int16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7861")
    parser.add_argument("--pid", type=int, required=True, help="the Forge server's process id")
    parser.add_argument("--size", default="512x2048", help="HxW")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    height, width = map(int, args.size.split("x"))
    base = {"prompt": "a mountain lake at sunrise, panorama", "negative_prompt": "", "width": width, "height": height,
            "steps": args.steps, "sampler_name": "Euler", "cfg_scale": 7, "seed": 7, "batch_size": 1}
    runs = {
        "Forge sd_forge_multidiffusion": {**base, "alwayson_scripts": {"MultiDiffusion Integrated": {
            "args": [True, "MultiDiffusion", args.tile, args.tile, args.tile - args.stride, 4]}}},
        "sd-webui-migc multidiffusion": {**base, "alwayson_scripts": {"MIGC": {"args": [{
            "mode": "multidiffusion", "instances": [], "md_window": args.tile, "md_stride": args.stride}]}}},
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    peaks: dict[str, list[float]] = {name: [] for name in runs}
    images = {}
    for _ in range(args.repeats):
        for name, payload in runs.items():
            seconds, peak, body = measured(args.url, args.pid, payload)
            times[name].append(seconds)
            peaks[name].append(peak)
            images[name] = pixels(body)
    print(f"# Forge at {args.url}: {height}x{width}, {args.tile}-px tiles every {args.stride} px, {args.steps} Euler steps, "
          f"{args.repeats} runs each, alternating")
    print("| extension | median s | peak RSS growth MiB |")
    print("|---|---|---|")
    for name in runs:
        print(f"| {name} | {statistics.median(times[name]):.1f} | {max(peaks[name]):.0f} |")
    ours, forge = images["sd-webui-migc multidiffusion"], images["Forge sd_forge_multidiffusion"]
    print(f"mean |difference| between the two images: {abs(ours - forge).mean():.2f} grey levels")


if __name__ == "__main__":
    main()
