"""Writes the demo's inputs into a folder: a tiny random base model and a small concept image set with masks.

Run: python scripts/make_demo_inputs.py OUT_DIR
"""

import sys
from pathlib import Path

from PIL import Image, ImageDraw

from mixofshow.testing import save_tiny_base


def main(out: Path) -> None:
    if not (out / "tiny-base" / "model_index.json").is_file():
        save_tiny_base(out / "tiny-base")
    images, masks = out / "concept" / "images", out / "concept" / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        box = (4 + 2 * i, 6 + i, 26 + 2 * i, 28 + i)
        image = Image.new("RGB", (48, 48), (60 + 20 * i, 140, 90))
        ImageDraw.Draw(image).ellipse(box, fill=(230, 60, 40), outline=(250, 230, 0), width=3)
        image.save(images / f"dot{i}.png")
        mask = Image.new("L", (48, 48), 0)
        ImageDraw.Draw(mask).ellipse(box, fill=255)
        mask.save(masks / f"dot{i}.png")
        (images / f"dot{i}.txt").write_text("a photo of a <TOK>, on the grass")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
