"""``python -m bench.samples``: the demo page's sample images (``app/static/samples/``).

Twelve easy-VQA-like scenes drawn by the project's own generator (``bench.workloads.draw_scene``:
easy-VQA's colours, light backgrounds, anti-aliased), every shape four times and every colour at
least once, plus ``index.json`` naming what each shows (the page's alt texts). Deterministic:
rerunning it rewrites the same bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

from .server import REPO
from .workloads import EASY_VQA_COLORS, SHAPES, draw_scene

OUT = REPO / "app" / "static" / "samples"
COUNT = 12
SIZE = 128  # shown enlarged on the page; the server resizes to the model's 64x64


def generate(out: Path = OUT, seed: int = 12) -> list[dict]:
    rng = random.Random(seed)
    colors = sorted(EASY_VQA_COLORS)
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for i in range(COUNT):
        shape, color = SHAPES[i % len(SHAPES)], colors[(5 * i) % len(colors)]
        scene = draw_scene(rng, SIZE, side=(0.3, 0.6), palette=EASY_VQA_COLORS, background=(230, 256),
                           supersample=4, shape=shape, color=color)
        name = f"{i + 1:02d}-{color}-{shape}.png"
        buf = io.BytesIO()
        scene.image.save(buf, format="PNG", optimize=True)
        (out / name).write_bytes(buf.getvalue())
        index.append({"file": name, "shape": shape, "color": color, "alt": f"a {color} {shape}"})
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.samples", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    for item in generate(args.out):
        print(args.out / item["file"], item["alt"])


if __name__ == "__main__":
    main()
