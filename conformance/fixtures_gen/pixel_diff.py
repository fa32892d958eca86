"""Dev-time measurement: the Rust image preprocessing against the reference processor on real
photographs (the ones shipped in scikit-image's wheel, `skimage/data`).

Writes, for every photo, PIL's decoded RGB (what transformers' convert_to_rgb gives the processor)
and the reference processor's resized uint8 image at every budget (70 ... 1120) as raw bytes, plus
index.json, into $PIXEL_DIFF_DIR (default /tmp/gemma4-pixel-diff). Then run

    PIXEL_DIFF_DIR=/tmp/gemma4-pixel-diff cargo test -p gemma4-model --test preprocess -- --ignored --nocapture pixel_diff_real_photos

which prints max / mean |Rust - reference| in 1/255 units for the decoded RGB and the pixel values.

Usage: python conformance/fixtures_gen/pixel_diff.py [--out DIR]   (venv with requirements.txt)
"""

from __future__ import annotations

import argparse
import io
import json
import os

import numpy as np

PHOTOS = [
    "astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "color.png", "logo.png", "camera.png",
    "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg", "no_time_for_that_tiny.gif",
]
BUDGETS = (70, 140, 280, 560, 1120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("PIXEL_DIFF_DIR", "/tmp/gemma4-pixel-diff"))
    args = ap.parse_args()
    import skimage
    import torch
    from PIL import Image
    from transformers import Gemma4ImageProcessor
    from transformers.image_transforms import convert_to_rgb

    torch.set_num_threads(1)
    data_dir = os.path.join(os.path.dirname(skimage.__file__), "data")
    os.makedirs(args.out, exist_ok=True)
    ip = Gemma4ImageProcessor()
    assert ip.backend == "torchvision"
    photos = []
    for name in PHOTOS:
        path = os.path.join(data_dir, name)
        raw = open(path, "rb").read()
        im = Image.open(io.BytesIO(raw))
        dec = convert_to_rgb(im, return_numpy=True)
        stem = os.path.splitext(name)[0]
        dec_file = f"{stem}.decoded.rgb"
        open(os.path.join(args.out, dec_file), "wb").write(np.ascontiguousarray(dec).tobytes())
        entry = {"name": name, "path": path, "format": im.format, "mode": im.mode, "height": dec.shape[0], "width": dec.shape[1],
                 "decoded": dec_file, "budgets": []}
        for b in BUDGETS:
            out = ip(images=[Image.open(io.BytesIO(raw))], max_soft_tokens=b, return_tensors="pt")
            pos = out["image_position_ids"][0]
            n = int((pos != -1).all(-1).sum())
            pv = out["pixel_values"][0][:n].numpy()
            pw = int(pos[:n, 0].max()) + 1
            ph = int(pos[:n, 1].max()) + 1
            u8 = np.rint(pv * 255).astype(np.uint8)
            assert np.array_equal(u8.astype(np.float32) * np.float32(1 / 255), pv)
            img = u8.reshape(ph, pw, 16, 16, 3).transpose(0, 2, 1, 3, 4).reshape(ph * 16, pw * 16, 3)
            rfile = f"{stem}.{b}.rgb"
            open(os.path.join(args.out, rfile), "wb").write(np.ascontiguousarray(img).tobytes())
            entry["budgets"].append({"max_soft_tokens": b, "height": int(img.shape[0]), "width": int(img.shape[1]), "resized": rfile})
        photos.append(entry)
        print(f"{name}: {im.format} {im.mode} {dec.shape[1]}x{dec.shape[0]}")
    with open(os.path.join(args.out, "index.json"), "w") as fh:
        json.dump({"photos": photos}, fh, indent=1)


if __name__ == "__main__":
    main()
