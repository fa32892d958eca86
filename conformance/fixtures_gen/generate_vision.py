"""Generates the vision golden fixture <repo>/fixtures/tiny-vision/ (run through run.sh).

  1. build a tiny random `Gemma4ForConditionalGeneration` WITH a vision tower (patch 16, pooling 3,
     standardize), every parameter and buffer random, cast to bf16, save, load back;
  2. `mtq.quantize` with the 31B recipe (NVFP4 MLP only, attention / vision / embed_vision bf16,
     FP8 KV-cache scales), `export_hf_checkpoint`; the vision tensors are asserted bf16 and equal to
     the random ones;
  3. the shared tokenizer (generate.py) and processor_config.json as `Gemma4Processor.save_pretrained`
     writes it (max_soft_tokens 70);
  4. test images (PNG, JPEG, WebP, animated GIF; several sizes and aspect ratios) and what the
     reference processor (`Gemma4ImageProcessor`, torchvision backend, as AutoProcessor picks) makes
     of them: decoded RGB, the resized uint8 image, pixel values, positions, soft-token counts; the
     PIL backend compared; a size table; direct resize cases;
  5. the float32 W4A16 reference model (reference_model.py) on the exported files: soft tokens per
     image, text-only cases and multimodal cases (logits at every position, 12-token greedy
     continuation checked against generate() with its KV cache), cross-checked against an
     independent float64 implementation of fixtures/tiny-vision/README.md's semantics;
  6. reference.safetensors, reference.json, README.md, MANIFEST.json in fixtures/tiny-vision/.
Deterministic: fixed seeds, one CPU thread.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import shutil
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import generate  # noqa: E402
import tokenizer_build  # noqa: E402
from reference_model import bf16_embed_scale, dequant_nvfp4_direct, load_dequantized_state_dict, load_reference_model  # noqa: E402
from spec_forward import _gelu_tanh, _rms, _rope  # noqa: E402

SCRIPT = "conformance/fixtures_gen/generate_vision.py"
NAME = "tiny-vision"
SEED = 20260501
MAX_SOFT_TOKENS = 70  # the fixture processor's default budget (the real model's default is 280)
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
MIN_DISTINCT = 4  # greedy continuations of at least 4 distinct tokens (no single repeated token)
GREEDY_TOKENS = generate.GREEDY_TOKENS
MIN_MARGIN = generate.MIN_MARGIN
STOP_IDS = generate.STOP_IDS
S, F = generate.S, generate.F
F32_INV255 = np.float32(1 / 255)  # the processor multiplies the uint8 values by float32(1/255) in float32
TEXT_VOCAB = tokenizer_build.VOCAB_SIZE
# Images whose decoded RGB is stored: every format / mode whose decoding is more than copying
# (JPEG, WebP, GIF, palette, alpha compositing).
DECODED_STORED = {"alpha_tiny.png", "extreme_wide.png", "photo.jpg", "stripes.webp", "lossless_alpha.webp", "stripes_anim.gif"}
_ids = tokenizer_build.token_ids()
AVOID = set(STOP_IDS) | {0, _ids["<|image|>"], _ids["<|audio|>"], _ids["<|video|>"], _ids["<|image>"], _ids["<image|>"]}

TEXT = dict(
    hidden_size=96,
    intermediate_size=192,
    num_hidden_layers=6,
    layer_types=[S, S, F, S, S, F],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    global_head_dim=48,
    num_global_key_value_heads=1,
    attention_k_eq_v=True,
    sliding_window=24,
    final_logit_softcapping=30.0,
)
VISION = dict(
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=12,
    hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=1e-6,
    patch_size=16,
    pooling_kernel_size=3,
    position_embedding_size=256,  # > 210 = the widest patch grid at 70 soft tokens (48 x 3360 pixels)
    standardize=True,
    use_clipped_linears=False,
    rope_parameters={"rope_type": "default", "rope_theta": 100.0},  # as the 31B config spells it
)
# Random-init scales (generate.INIT for the text tower) plus the vision ones.
INIT = dict(
    generate.INIT,
    vision_linear_gain=1.0,
    vision_norm=(0.4, 1.8),
    vision_qk_norm=(0.25, 0.75),
    pos_table_std=0.5,
    std_bias_std=2.0,
    std_scale=(0.3, 1.5),
    embed_vision_gain=1.0,
)


# --------------------------------------------------------------------------------------------
# checkpoint


def make_config():
    from transformers import Gemma4Config

    ids = tokenizer_build.token_ids()
    cfg = Gemma4Config(
        text_config=dict(generate.COMMON_TEXT, **TEXT),
        vision_config=copy.deepcopy(VISION),
        audio_config=None,
        boi_token_id=ids["<|image>"],
        image_token_id=ids["<|image|>"],
        eoi_token_id=ids["<image|>"],
        boa_token_id=ids["<|audio>"],
        audio_token_id=ids["<|audio|>"],
        eoa_token_index=ids["<audio|>"],
        video_token_id=ids["<|video|>"],
        tie_word_embeddings=True,
    )
    cfg.architectures = ["Gemma4ForConditionalGeneration"]
    return cfg


@torch.no_grad()
def randomize(model, gen: torch.Generator) -> None:
    """Every parameter and persistent buffer random (float32, before the bf16 cast)."""
    i = INIT
    for name, p in model.named_parameters():
        vision = name.startswith("model.vision_tower.")
        if name.endswith("embed_tokens.weight"):
            w = torch.randn(p.shape, generator=gen) * i["embed_std"]
            w *= torch.empty(p.shape[0], 1).uniform_(0.5, 1.7, generator=gen)
            p.copy_(w)
        elif name.endswith("position_embedding_table"):
            p.copy_(torch.randn(p.shape, generator=gen) * i["pos_table_std"])
        elif name.endswith("norm.weight"):
            if name.endswith("language_model.norm.weight"):
                lo, hi = i["final_norm"]
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                lo, hi = i["vision_qk_norm"] if vision else i["qk_norm"]
            else:
                lo, hi = i["vision_norm"] if vision else i["norm"]
            p.copy_(torch.empty(p.shape).uniform_(lo, hi, generator=gen))
        elif p.dim() == 2:
            if vision:
                gain = i["vision_linear_gain"]
            elif name.startswith("model.embed_vision."):
                gain = i["embed_vision_gain"]
            else:
                gain = i["linear_gain"]
            p.copy_(torch.randn(p.shape, generator=gen) * (gain / math.sqrt(p.shape[1])))
        else:
            raise AssertionError(f"unhandled parameter {name} {tuple(p.shape)}")
    n_scalars = 0
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):
            b.copy_(torch.empty(b.shape).uniform_(0.5, 1.5, generator=gen))
            n_scalars += 1
        elif name == "model.vision_tower.std_bias":
            b.copy_(torch.randn(b.shape, generator=gen) * i["std_bias_std"])
        elif name == "model.vision_tower.std_scale":
            b.copy_(torch.empty(b.shape).uniform_(*i["std_scale"], generator=gen))
    assert n_scalars == model.config.text_config.num_hidden_layers


def build_checkpoint(out_dir: str, seed: int, log: dict) -> None:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import Gemma4ForConditionalGeneration, GenerationConfig

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    config = make_config()
    model = Gemma4ForConditionalGeneration(config).eval()
    assert model.model.vision_tower is not None and model.model.embed_vision is not None
    assert model.model.audio_tower is None and model.model.embed_audio is None
    randomize(model, gen)
    model = model.to(torch.bfloat16)

    with tempfile.TemporaryDirectory() as raw_dir:
        model.save_pretrained(raw_dir)
        raw = load_file(os.path.join(raw_dir, "model.safetensors"))
        model = Gemma4ForConditionalGeneration.from_pretrained(raw_dir, dtype=torch.bfloat16).eval()
    assert "model.vision_tower.std_bias" in raw and "model.vision_tower.std_scale" in raw

    model.generation_config = GenerationConfig(
        bos_token_id=2, pad_token_id=0, eos_token_id=list(STOP_IDS), do_sample=True, temperature=1.0, top_k=64, top_p=0.95
    )
    vocab = config.text_config.vocab_size
    calib_gen = torch.Generator().manual_seed(seed + 1)
    calib = [torch.randint(tokenizer_build.FIRST_NORMAL_ID, vocab, (2, 48), generator=calib_gen) for _ in range(4)]
    for b in calib:
        b[:, 0] = 2

    def forward_loop(m):
        with torch.no_grad():
            for b in calib:
                m(input_ids=b)

    qc = generate.quant_config({"quant": "mlp_only", "kv_fp8": True})
    model = mtq.quantize(model, qc, forward_loop=forward_loop)
    # No quantizer inside the vision branch is enabled (modelopt's default exclusions
    # `*vision_tower*` / `*embed_vision*` disable them).
    from modelopt.torch.quantization.nn import TensorQuantizer

    enabled = [
        n for n, m in model.named_modules()
        if n.startswith(("model.vision_tower", "model.embed_vision")) and isinstance(m, TensorQuantizer) and m.is_enabled
    ]
    # FP8_KV_CFG (appended after the exclusions) re-enables the K/V bmm quantizers of every
    # attention module, the vision ones included; text-only calibration never feeds them, so
    # nothing of theirs is exported (checked below). No weight/input quantizer is enabled there.
    assert all(n.endswith(("k_bmm_quantizer", "v_bmm_quantizer")) for n in enabled), enabled
    log["vision_enabled_quantizers"] = enabled
    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out_dir)

    n_nvfp4 = 0
    n_vision = 0
    with safe_open(os.path.join(out_dir, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for k, v in raw.items():
            if k == "lm_head.weight":
                continue
            assert k in keys, f"{k} missing from export"
            e = f.get_tensor(k)
            if k.startswith(("model.vision_tower.", "model.embed_vision.")):
                assert e.dtype == torch.bfloat16 and torch.equal(e, v), k
                n_vision += 1
                continue
            if e.dtype == torch.uint8:
                assert ".mlp." in k, k
                base = k[: -len(".weight")]
                w = dequant_nvfp4_direct(e, f.get_tensor(base + ".weight_scale"), f.get_tensor(base + ".weight_scale_2"))
                rel = float((w - v.float()).norm() / v.float().norm())
                assert rel < 0.15, (k, rel)
                n_nvfp4 += 1
                continue
            assert e.dtype == torch.bfloat16 and torch.equal(e, v), k
        extra = sorted(k for k in keys if k.startswith(("model.vision_tower.", "model.embed_vision.")) and k not in raw)
        assert not extra, extra
        assert "lm_head.weight" not in keys
    log["nvfp4_weights"] = n_nvfp4
    log["vision_tensors"] = n_vision
    assert n_nvfp4 == 3 * TEXT["num_hidden_layers"], n_nvfp4

    hq = json.load(open(os.path.join(out_dir, "hf_quant_config.json")))["quantization"]
    cq = json.load(open(os.path.join(out_dir, "config.json")))["quantization_config"]
    log["exclude_modules"] = hq["exclude_modules"]
    log["quantization_config_ignore"] = cq.get("ignore")
    for pat in ("model.vision_tower*", "model.embed_vision*"):
        assert pat in hq["exclude_modules"], (pat, hq["exclude_modules"])


# --------------------------------------------------------------------------------------------
# processor config and images


def write_processor_config(out_dir: str) -> dict:
    """processor_config.json exactly as Gemma4Processor.save_pretrained writes it (the tokenizer
    files it would rewrite stay the shared ones written by generate.write_tokenizer)."""
    from transformers import AutoProcessor, AutoTokenizer, Gemma4ImageProcessor, Gemma4Processor
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor

    tok = AutoTokenizer.from_pretrained(out_dir)
    proc = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(max_soft_tokens=MAX_SOFT_TOKENS),
        tokenizer=tok,
        video_processor=Gemma4VideoProcessor(),
        image_seq_length=MAX_SOFT_TOKENS,
    )
    with tempfile.TemporaryDirectory() as d:
        proc.save_pretrained(d)
        assert "preprocessor_config.json" not in os.listdir(d), os.listdir(d)
        shutil.copyfile(os.path.join(d, "processor_config.json"), os.path.join(out_dir, "processor_config.json"))
    p = AutoProcessor.from_pretrained(out_dir)
    ip = p.image_processor
    assert type(p).__name__ == "Gemma4Processor", type(p)
    assert type(ip).__name__ == "Gemma4ImageProcessor" and ip.backend == "torchvision", (type(ip), ip.backend)
    assert (ip.patch_size, ip.pooling_kernel_size, ip.max_soft_tokens) == (16, 3, MAX_SOFT_TOKENS)
    assert p.image_token_id == tokenizer_build.token_ids()["<|image|>"]
    return {"processor": type(p).__name__, "image_processor": type(ip).__name__, "backend": ip.backend}


def _png(a: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(a, mode=mode).save(b, "PNG", optimize=True)
    return b.getvalue()


def make_images() -> list[dict]:
    """The test images: generated patterns, deterministic bytes (PIL encoders, fixed seeds)."""
    from PIL import Image

    rng = np.random.default_rng(SEED)
    imgs = []

    def add(name, data, about):
        imgs.append({"name": name, "bytes": data, "about": about})

    # Tall RGB gradient (upscaled).
    h, w = 300, 100
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    a = np.stack([x / (w - 1) * 255, y / (h - 1) * 255, 127.5 + 127.5 * np.sin(x / 9 + y / 23)], -1)
    add("gradient_tall.png", _png(a.round().astype(np.uint8)), "RGB PNG, 100x300 (w x h), smooth gradients; upscaled")

    # Square uniform noise (upscaled x4).
    add("noise_square.png", _png(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)), "RGB PNG, 48x48 uniform noise; upscaled to 384x384")

    # Grayscale checkerboard that already has the target size: no resize at all.
    c = ((np.arange(384)[:, None] // 8 + np.arange(384)[None, :] // 8) % 2 * 255).astype(np.uint8)
    add("checker_gray.png", _png(c, "L"), "grayscale (L) PNG, 384x384 checkerboard of 8-pixel squares: already 384x384, not resized")

    # Larger than the budget: a big smooth gradient (downscaled ~3x at 70 tokens).
    h, w = 900, 1200
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    a = np.stack([x / (w - 1) * 255, y / (h - 1) * 255, ((x // 7 + y // 7) % 2) * 255], -1)
    add("large_gradient.png", _png(a.round().astype(np.uint8)), "RGB PNG, 1200x900, gradients in R and G, a 7-pixel checkerboard in B (aliasing-prone); larger than the budgets up to 280 tokens, downscaled")

    # Tiny and tall, with an alpha channel: composited onto white.
    h, w = 300, 20
    y, x = np.mgrid[0:h, 0:w]
    chk = ((x // 4 + y // 4) % 2).astype(np.float64)
    rgba = np.stack([255 * chk, 80 + 100 * (1 - chk), (y * 255 // (h - 1)), np.clip(y * 300 // h + 0 * x, 0, 255)], -1)
    rgba[:8, :, 3] = 0  # fully transparent rows
    add("alpha_tiny.png", _png(rgba.astype(np.uint8), "RGBA"), "RGBA PNG, 20x300, checkerboard with an alpha ramp (top rows transparent): composited onto white")

    # Extreme aspect ratio (one side rounds to 0: the edge-case branch), palette PNG with a
    # transparent palette entry.
    h, w = 6, 700
    idx = ((np.arange(w)[None, :] // 5 + np.arange(h)[:, None]) % 16).astype(np.uint8)
    im = Image.fromarray(idx, "P")
    pal = []
    for k in range(16):
        pal += [(k * 53) % 256, (k * 97 + 40) % 256, (255 - k * 16) % 256]
    im.putpalette(pal + [0] * (768 - len(pal)))
    b = io.BytesIO()
    im.save(b, "PNG", transparency=3)
    add("extreme_wide.png", b.getvalue(), "palette (P) PNG with one transparent index, 700x6: the height rounds to 0, edge-case branch (48 x 3360)")

    # Photo-like JPEG (4:2:0, quality 90): smooth blobs, edges and noise.
    h, w = 150, 200
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack(
        [
            120 + 90 * np.sin(x / 17) * np.cos(y / 23),
            100 + 80 * np.cos((x + y) / 31),
            140 + 70 * np.sin((x - 2 * y) / 19),
        ],
        -1,
    )
    base[(x - 120) ** 2 + (y - 70) ** 2 < 900] = [230, 40, 30]
    base += rng.normal(0, 6, base.shape)
    b = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).round().astype(np.uint8)).save(b, "JPEG", quality=90)
    add("photo.jpg", b.getvalue(), "RGB JPEG (baseline, 4:2:0, quality 90), 200x150, photo-like: blobs, a disc, noise; upscaled")

    # Lossy WebP, tall-ish stripes.
    h, w = 170, 120
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    a = np.stack([128 + 127 * np.sign(np.sin(x / 4)), 128 + 127 * np.sin(y / 7), (2 * (x + y)) % 256], -1)
    b = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(b, "WEBP", quality=80, method=4)
    add("stripes.webp", b.getvalue(), "lossy WebP (quality 80), 120x170, stripes and a diagonal ramp")

    # Lossless WebP with alpha.
    h, w = 64, 64
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 4, y * 4, (x * y) % 256, np.where((x - 32) ** 2 + (y - 32) ** 2 < 600, 255, 90)], -1).astype(np.uint8)
    b = io.BytesIO()
    Image.fromarray(a, "RGBA").save(b, "WEBP", lossless=True)
    add("lossless_alpha.webp", b.getvalue(), "lossless WebP with alpha, 64x64: composited onto white")

    # Animated GIF: the first frame is used.
    h, w = 80, 240
    y, x = np.mgrid[0:h, 0:w]
    frames = []
    for t in range(3):
        a = np.stack([((x + 7 * t) // 8 % 2) * 255, (y // 7 % 2) * 200, ((x + y + 40 * t) // 20 % 4) * 60], -1).astype(np.uint8)
        frames.append(Image.fromarray(a).convert("P", palette=Image.Palette.ADAPTIVE, colors=16))
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    add("stripes_anim.gif", b.getvalue(), "animated GIF (3 frames, 16 colours), 240x80 stripes: the first frame is used; wide")

    # A single pixel.
    add("pixel_1x1.png", _png(np.array([[[200, 30, 90]]], dtype=np.uint8)), "RGB PNG, 1x1: upscaled to 384x384")
    return imgs


def _png_raw(arr: np.ndarray, color_type: int, bit_depth: int, interlace: bool = False) -> bytes:
    """A minimal PNG writer (PIL cannot write 16-bit colour or Adam7): filter 0 on every row."""
    import struct
    import zlib

    h, w = arr.shape[:2]
    dt = ">u2" if bit_depth == 16 else "u1"

    def rows(a):
        return b"".join(b"\x00" + a[y].astype(dt).tobytes() for y in range(a.shape[0]))

    if interlace:
        passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
        raw = b"".join(rows(arr[y0::dy, x0::dx]) for x0, y0, dx, dy in passes if arr[y0::dy, x0::dx].size)
    else:
        raw = rows(arr)

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, int(interlace))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def make_decode_images() -> list[dict]:
    """Small images for the decoder only (colour types, bit depths, transparency, JPEG variants)."""
    from PIL import Image

    rng = np.random.default_rng(SEED + 2)
    h, w = 24, 32
    y, x = np.mgrid[0:h, 0:w]
    v16 = ((x * 2111 + y * 977) * 13 % 65536).astype(np.uint16)
    v16[0, :9] = [0, 255, 256, 1000, 0x1280, 0x12FF, 0x1300, 40000, 65535]
    a16 = ((x * 4096 + y * 300) % 65536).astype(np.uint16)
    out = []

    def add(name, data, about, exact=True):
        out.append({"name": name, "bytes": data, "about": about, "exact": exact})

    add("gray16.png", _png_raw(v16, 0, 16), "16-bit grey PNG: PIL opens it as I;16, convert('RGB') clips to 255")
    add("rgb16.png", _png_raw(np.stack([v16, v16[::-1], 65535 - v16], -1), 2, 16), "16-bit RGB PNG: PIL keeps the high byte")
    add("rgba16.png", _png_raw(np.stack([v16, 65535 - v16, v16[:, ::-1], a16], -1), 6, 16), "16-bit RGBA PNG: high bytes, then composited onto white")
    add("la16.png", _png_raw(np.stack([v16, a16], -1), 4, 16), "16-bit grey+alpha PNG: high bytes, composited onto white")
    add("interlaced.png", _png_raw(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 2, 8, interlace=True), "Adam7-interlaced RGB PNG")
    b = io.BytesIO()
    Image.fromarray(((x + y) % 3 == 0)).save(b, "PNG")
    add("gray1.png", b.getvalue(), "1-bit PNG (PIL mode 1)")
    la = np.stack([(x * 8).astype(np.uint8), ((y * 11) % 256).astype(np.uint8)], -1)
    b = io.BytesIO()
    Image.fromarray(la, "LA").save(b, "PNG")
    add("la8.png", b.getvalue(), "8-bit grey+alpha PNG")
    rgb = np.stack([(x * 8) % 256, (y * 10) % 256, ((x // 4 + y // 4) % 2) * 255], -1).astype(np.uint8)
    rgb[5:9, 5:9] = [10, 20, 30]
    b = io.BytesIO()
    Image.fromarray(rgb).save(b, "PNG", transparency=(10, 20, 30))
    add("rgb_trns.png", b.getvalue(), "RGB PNG with a tRNS colour key (10, 20, 30): those pixels become white")
    idx = ((x // 3 + y // 3) % 8).astype(np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette([c for k in range(8) for c in ((k * 37) % 256, (k * 71) % 256, (k * 113) % 256)] + [0] * (768 - 24))
    b = io.BytesIO()
    im.save(b, "GIF", transparency=2)
    add("gif_transparent.gif", b.getvalue(), "GIF with a transparent palette index: those pixels become white")
    rgba = np.stack([(x * 8) % 256, (y * 10) % 256, 200 + 0 * x, (x * y * 3) % 256], -1).astype(np.uint8)
    b = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(b, "WEBP", quality=70)
    add("lossy_alpha.webp", b.getvalue(), "lossy WebP with alpha")
    photo = np.stack([128 + 100 * np.sin(x / 3) * np.cos(y / 4), 90 + 60 * np.cos((x + y) / 5), 160 + 50 * np.sin((x - y) / 4)], -1)
    photo = np.clip(photo + rng.normal(0, 8, photo.shape), 0, 255).round().astype(np.uint8)
    for name, kw, about in [
        ("jpeg_444.jpg", dict(quality=90, subsampling=0), "baseline JPEG 4:4:4"),
        ("jpeg_422.jpg", dict(quality=90, subsampling=1), "baseline JPEG 4:2:2"),
        ("jpeg_progressive.jpg", dict(quality=85, progressive=True), "progressive JPEG 4:2:0"),
    ]:
        b = io.BytesIO()
        Image.fromarray(photo).save(b, "JPEG", **kw)
        add(name, b.getvalue(), about, exact=False)
    b = io.BytesIO()
    Image.fromarray(photo[..., 0]).save(b, "JPEG", quality=90)
    add("jpeg_gray.jpg", b.getvalue(), "greyscale JPEG", exact=False)
    return out


def pil_open(data: bytes):
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.seek(0)
    return im


def decoded_rgb(data: bytes) -> np.ndarray:
    """What the processor works on: transformers' convert_to_rgb of the opened PIL image (alpha or
    a transparency entry composited onto white, else PIL convert("RGB"))."""
    from transformers.image_transforms import convert_to_rgb

    return convert_to_rgb(pil_open(data), return_numpy=True)


def process_image(ip_tv, ip_pil, data: bytes, budget: int) -> dict:
    out = ip_tv(images=[pil_open(data)], max_soft_tokens=budget, return_tensors="pt")
    pv = out["pixel_values"][0]
    pos = out["image_position_ids"][0]
    n_soft = int(out["num_soft_tokens_per_image"][0])
    real = (pos != -1).all(-1)
    n = int(real.sum())
    assert bool(real[:n].all()) and not bool(real[n:].any()), "real patches first"
    assert pv.shape == (budget * 9, 768) and pv.dtype == torch.float32
    assert bool((pv[n:] == 0).all()) and bool((pos[n:] == -1).all())
    pv = pv[:n].numpy()
    pos = pos[:n].numpy()
    pw = int(pos[:, 0].max()) + 1
    ph = int(pos[:, 1].max()) + 1
    assert ph * pw == n and n == 9 * n_soft and ph % 3 == 0 and pw % 3 == 0
    # positions: (x, y), x fastest
    gy, gx = np.meshgrid(np.arange(ph), np.arange(pw), indexing="ij")
    assert (pos == np.stack([gx.ravel(), gy.ravel()], -1)).all()
    # pixel values are exactly u8 * float32(1/255) (float32 product)
    u8 = np.rint(pv * 255).astype(np.int64)
    assert u8.min() >= 0 and u8.max() <= 255
    u8 = u8.astype(np.uint8)
    assert np.array_equal(u8.astype(np.float32) * F32_INV255, pv), "pixel values are not u8 * f32(1/255)"
    # unpatchify: patch (py, px) row-major, inside a patch (row, col, channel)
    img = u8.reshape(ph, pw, 16, 16, 3).transpose(0, 2, 1, 3, 4).reshape(ph * 16, pw * 16, 3)
    r = {"pixel_values": pv, "positions": pos, "num_soft_tokens": n_soft, "patches_h": ph, "patches_w": pw, "resized": img}
    if ip_pil is not None:
        o2 = ip_pil(images=[pil_open(data)], max_soft_tokens=budget, return_tensors="pt")
        pv2 = o2["pixel_values"][0][:n].numpy()
        assert o2["pixel_values"].shape == out["pixel_values"].shape and int(o2["num_soft_tokens_per_image"][0]) == n_soft
        assert np.array_equal(o2["image_position_ids"][0].numpy()[:n], pos)
        d = np.abs(pv2.astype(np.float64) - pv.astype(np.float64)) * 255
        r["pil_max_diff_255"] = float(d.max())
        r["pil_mean_diff_255"] = float(d.mean())
        r["pil_frac_differ"] = float((d > 1e-3).mean())
    return r


def resize_cases(rng: np.random.Generator) -> list[dict]:
    """Direct cases for the resize kernel: torchvision resize(BICUBIC, antialias=True) of a uint8
    CHW tensor, as the processor calls it, including one-axis and extreme factors."""
    from torchvision.transforms.v2 import functional as tvF

    shapes = [
        ((17, 23), (40, 31)), ((40, 31), (17, 23)), ((32, 32), (32, 19)), ((32, 32), (45, 32)), ((1, 1), (5, 7)),
        ((1, 40), (3, 9)), ((40, 1), (9, 3)), ((7, 64), (64, 7)), ((64, 64), (2, 2)), ((64, 3), (1, 48)),
        ((13, 29), (48, 48)), ((48, 48), (13, 29)), ((9, 60), (9, 2)), ((60, 9), (3, 9)), ((5, 5), (50, 5)),
        ((31, 17), (31, 17)),
    ]
    cases = []
    for k, ((h, w), (th, tw)) in enumerate(shapes):
        kind = k % 4
        if kind == 0:
            a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        elif kind == 1:  # saturated: overshoot must clamp
            a = (rng.integers(0, 2, (h, w, 3)) * 255).astype(np.uint8)
        elif kind == 2:
            yy, xx = np.mgrid[0:h, 0:w]
            a = np.stack([(xx * 37) % 256, (yy * 53) % 256, ((xx + yy) * 11) % 256], -1).astype(np.uint8)
        else:
            yy, xx = np.mgrid[0:h, 0:w]
            a = np.where(((xx // 2 + yy // 3) % 2)[..., None] == 1, np.array([250, 5, 128]), np.array([3, 252, 60])).astype(np.uint8)
        t = torch.from_numpy(a).permute(2, 0, 1).contiguous()
        o = tvF.resize(t, [th, tw], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        assert o.dtype == torch.uint8
        cases.append({"input": a, "output": o.permute(1, 2, 0).contiguous().numpy(), "target": [th, tw]})
    return cases


def size_table(rng: np.random.Generator) -> list[list[int]]:
    """(h, w, budget) -> (th, tw) from the reference get_aspect_ratio_preserving_size."""
    from transformers.models.gemma4.image_processing_gemma4 import get_aspect_ratio_preserving_size

    sizes = [
        (1, 1), (1, 2), (2, 1), (3, 1000), (1000, 3), (1, 100000), (100000, 1), (6, 700), (700, 6), (47, 4000),
        (48, 48), (47, 47), (49, 49), (384, 384), (383, 384), (385, 385), (401, 401), (402, 402), (100, 100),
        (300, 20), (20, 300), (900, 1200), (1200, 900), (480, 640), (640, 480), (1080, 1920), (1920, 1080),
        (3024, 4032), (4032, 3024), (2048, 2048), (512, 512), (224, 224), (336, 336), (768, 1024), (1, 3360),
        (48, 3360), (96, 1536), (7, 490), (7, 491), (10, 701), (50, 3500), (12345, 67), (67, 12345),
        (8000, 8000), (16384, 16384), (257, 259), (1000, 1), (999, 10), (10, 999),
    ]
    for _ in range(120):
        e = rng.uniform(0, np.log(6000))
        f = rng.uniform(0, np.log(6000))
        sizes.append((max(1, int(np.exp(e))), max(1, int(np.exp(f)))))
    table = []
    for h, w in sizes:
        for b in SUPPORTED_SOFT_TOKENS:
            th, tw = get_aspect_ratio_preserving_size(height=h, width=w, patch_size=16, max_patches=9 * b, pooling_kernel_size=3)
            assert th % 48 == 0 and tw % 48 == 0 and th * tw <= b * 9 * 256, (h, w, b, th, tw)
            table.append([h, w, b, th, tw])
    return table


# --------------------------------------------------------------------------------------------
# independent float64 implementation of the README semantics


def spec_soft_tokens(sd: dict, cfg: dict, pv: np.ndarray, pos: np.ndarray, dtype=torch.float64) -> torch.Tensor:
    """Vision tower + embed_vision for ONE image's real patches, written from README.md."""
    v = cfg["vision_config"]
    g = {k: t.to(dtype) for k, t in sd.items() if k.startswith(("model.vision_tower.", "model.embed_vision."))}
    pre = "model.vision_tower."
    eps = v["rms_norm_eps"]
    nh, hd = v["num_attention_heads"], v["head_dim"]
    assert v["num_key_value_heads"] == nh
    n = pv.shape[0]
    px = torch.from_numpy(pv).to(dtype)
    p = torch.from_numpy(pos).long()
    x = (2 * (px - 0.5)) @ g[pre + "patch_embedder.input_proj.weight"].T
    tab = g[pre + "patch_embedder.position_embedding_table"]
    x = x + tab[0][p[:, 0]] + tab[1][p[:, 1]]
    # 2-D RoPE: the first half of each head rotated (rotate-half within that half) by x, the
    # second half by y; inv_freq[i] = theta^(-2i / (hd/2)), i < hd/4.
    half = hd // 2
    theta = v["rope_parameters"]["rope_theta"]
    inv = theta ** (-(2.0 * torch.arange(half // 2, dtype=torch.float64)) / half)

    def rope2d(t):  # t [n, heads, hd]
        out = []
        for axis in range(2):
            part = t[..., axis * half : (axis + 1) * half]
            ang = p[:, axis].to(torch.float64)[:, None] * inv[None, :]
            cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :].to(dtype)
            sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :].to(dtype)
            rot = torch.cat([-part[..., half // 2 :], part[..., : half // 2]], -1)
            out.append(part * cos + rot * sin)
        return torch.cat(out, -1)

    for i in range(v["num_hidden_layers"]):
        lp = f"{pre}encoder.layers.{i}."
        r = x
        h = _rms(x, g[lp + "input_layernorm.weight"], eps)
        q = (h @ g[lp + "self_attn.q_proj.linear.weight"].T).view(n, nh, hd)
        k = (h @ g[lp + "self_attn.k_proj.linear.weight"].T).view(n, nh, hd)
        vv = (h @ g[lp + "self_attn.v_proj.linear.weight"].T).view(n, nh, hd)
        q = rope2d(_rms(q, g[lp + "self_attn.q_norm.weight"], eps))
        k = rope2d(_rms(k, g[lp + "self_attn.k_norm.weight"], eps))
        vv = _rms(vv, None, eps)
        att = torch.softmax(torch.einsum("qhd,khd->hqk", q, k), -1)  # scaling 1.0, no mask
        a = torch.einsum("hqk,khd->qhd", att, vv).reshape(n, nh * hd) @ g[lp + "self_attn.o_proj.linear.weight"].T
        x = r + _rms(a, g[lp + "post_attention_layernorm.weight"], eps)
        r = x
        h = _rms(x, g[lp + "pre_feedforward_layernorm.weight"], eps)
        m = (_gelu_tanh(h @ g[lp + "mlp.gate_proj.linear.weight"].T) * (h @ g[lp + "mlp.up_proj.linear.weight"].T)) @ g[
            lp + "mlp.down_proj.linear.weight"
        ].T
        x = r + _rms(m, g[lp + "post_feedforward_layernorm.weight"], eps)
    # 3x3 average pooling in patch-grid order: cell (cy, cx) -> soft token cy * (pw/3) + cx
    k = v["pooling_kernel_size"]
    pw = int(p[:, 0].max()) + 1
    ph = int(p[:, 1].max()) + 1
    grid = torch.zeros(ph, pw, x.shape[-1], dtype=dtype)
    grid[p[:, 1], p[:, 0]] = x
    pooled = grid.view(ph // k, k, pw // k, k, -1).mean((1, 3)).reshape(-1, x.shape[-1])
    pooled = pooled * math.sqrt(v["hidden_size"])
    pooled = (pooled - g[pre + "std_bias"]) * g[pre + "std_scale"]
    e = _rms(pooled, None, eps)
    return e @ g["model.embed_vision.embedding_projection.weight"].T


def spec_mm_logits(sd: dict, cfg: dict, ids: list[int], soft: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """Text tower with soft tokens at the image-token positions and the "vision" mask, written from
    README.md (the text part is spec_forward.spec_logits)."""
    t = cfg["text_config"]
    g = {k: v.to(dtype) for k, v in sd.items() if k.startswith("model.language_model.")}
    pre = "model.language_model."
    eps = t["rms_norm_eps"]
    nh = t["num_attention_heads"]
    plc = {int(k): v for k, v in (t.get("per_layer_config") or {}).items()}
    emb = g[pre + "embed_tokens.weight"]
    ids_t = torch.tensor(ids)
    is_img = ids_t == cfg["image_token_id"]
    x = emb[torch.where(is_img, t["pad_token_id"], ids_t)] * bf16_embed_scale(t["hidden_size"])
    assert int(is_img.sum()) == soft.shape[0]
    x[is_img] = soft.to(dtype)  # in order, not scaled
    # image groups: maximal runs of consecutive image-token positions
    group = torch.full((len(ids),), -1)
    gid = -1
    for i in range(len(ids)):
        if is_img[i]:
            if i == 0 or not is_img[i - 1]:
                gid += 1
            group[i] = gid
    L = len(ids)
    qpos = torch.arange(L)[:, None]
    kpos = torch.arange(L)[None, :]
    same = (group[:, None] == group[None, :]) & (group[:, None] >= 0)
    for i, typ in enumerate(t["layer_types"]):
        p = f"{pre}layers.{i}."
        full = typ == "full_attention"
        hd = plc.get(i, {}).get("head_dim", t["head_dim"])
        kvh = plc.get(i, {}).get("num_key_value_heads", t["num_key_value_heads"])
        rp = t["rope_parameters"][typ]
        n_rot = int(rp.get("partial_rotary_factor", 1.0) * hd // 2) if rp["rope_type"] == "proportional" else hd // 2
        inv = torch.zeros(hd // 2, dtype=torch.float64)
        inv[:n_rot] = rp["rope_theta"] ** (-(2.0 * torch.arange(n_rot, dtype=torch.float64)) / hd)
        r = x
        h = _rms(x, g[p + "input_layernorm.weight"], eps)
        q = (h @ g[p + "self_attn.q_proj.weight"].T).view(L, nh, hd)
        kx = (h @ g[p + "self_attn.k_proj.weight"].T).view(L, kvh, hd)
        vw = g.get(p + "self_attn.v_proj.weight")
        vx = kx if vw is None else (h @ vw.T).view(L, kvh, hd)
        q = _rope(_rms(q, g[p + "self_attn.q_norm.weight"], eps), inv)
        k = _rope(_rms(kx, g[p + "self_attn.k_norm.weight"], eps), inv)
        v = _rms(vx, None, eps)
        if full:
            allowed = kpos <= qpos
        else:
            allowed = ((kpos <= qpos) | same) & (kpos > qpos - t["sliding_window"])
        out = torch.empty(L, nh, hd, dtype=dtype)
        grp = nh // kvh
        for hh in range(nh):
            s = (q[:, hh] @ k[:, hh // grp].T).masked_fill(~allowed, float("-inf"))
            out[:, hh] = torch.softmax(s, -1) @ v[:, hh // grp]
        a = out.reshape(L, nh * hd) @ g[p + "self_attn.o_proj.weight"].T
        x = r + _rms(a, g[p + "post_attention_layernorm.weight"], eps)
        r = x
        h = _rms(x, g[p + "pre_feedforward_layernorm.weight"], eps)
        m = (_gelu_tanh(h @ g[p + "mlp.gate_proj.weight"].T) * (h @ g[p + "mlp.up_proj.weight"].T)) @ g[p + "mlp.down_proj.weight"].T
        x = r + _rms(m, g[p + "post_feedforward_layernorm.weight"], eps)
        x = x * g[p + "layer_scalar"]
    x = _rms(x, g[pre + "norm.weight"], eps)
    cap = t["final_logit_softcapping"]
    return cap * torch.tanh((x @ emb.T) / cap)


# --------------------------------------------------------------------------------------------
# multimodal cases


def image_inputs(procd: list[dict], budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values / image_position_ids as the processor returns them (padded to budget*9)."""
    n_max = budget * 9
    pv = torch.zeros(len(procd), n_max, 768)
    pos = torch.full((len(procd), n_max, 2), -1, dtype=torch.long)
    for i, r in enumerate(procd):
        n = r["pixel_values"].shape[0]
        pv[i, :n] = torch.from_numpy(r["pixel_values"])
        pos[i, :n] = torch.from_numpy(r["positions"]).long()
    return pv, pos


def mm_forward(model, ids: list[int], pv, pos, mm: bool = True, attention_mask=None) -> torch.Tensor:
    ids_t = torch.tensor([ids])
    kw = {}
    if mm:
        kw["mm_token_type_ids"] = (ids_t == model.config.image_token_id).long()
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask
    with torch.no_grad():
        out = model(input_ids=ids_t, pixel_values=pv, image_position_ids=pos, use_cache=False, **kw)
    return out.logits[0]


def run_mm_case(model, prompt: list[int], pv, pos) -> dict:
    ids = list(prompt)
    greedy = []
    for _ in range(GREEDY_TOKENS):
        t = int(torch.argmax(mm_forward(model, ids, pv, pos)[-1]))
        greedy.append(t)
        ids.append(t)
    logits = mm_forward(model, ids, pv, pos).float().contiguous()
    p = len(prompt)
    steps = logits[p - 1 : p - 1 + GREEDY_TOKENS]
    top2 = torch.topk(steps, 2, dim=-1).values
    assert torch.argmax(steps, -1).tolist() == greedy
    return {"greedy": greedy, "logits": logits, "min_margin": float((top2[:, 0] - top2[:, 1]).min())}


def generate_with_cache(model, prompt: list[int], pv, pos) -> list[int]:
    from transformers import GenerationConfig

    gc = GenerationConfig(
        do_sample=False, max_new_tokens=GREEDY_TOKENS, min_new_tokens=0, num_beams=1, use_cache=True, bos_token_id=2,
        pad_token_id=0, eos_token_id=list(STOP_IDS),
    )
    ids_t = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids_t, attention_mask=torch.ones_like(ids_t), pixel_values=pv, image_position_ids=pos,
            mm_token_type_ids=(ids_t == model.config.image_token_id).long(), generation_config=gc,
        )
    return out[0, len(prompt) :].tolist()


def explicit_masks(model, ids: list[int]) -> dict:
    """4-D additive float masks built from README.md's rule, passed to the model as a dict."""
    is_img = torch.tensor(ids) == model.config.image_token_id
    L = len(ids)
    group = torch.full((L,), -1)
    gid = -1
    for i in range(L):
        if is_img[i]:
            if i == 0 or not is_img[i - 1]:
                gid += 1
            group[i] = gid
    q = torch.arange(L)[:, None]
    k = torch.arange(L)[None, :]
    same = (group[:, None] == group[None, :]) & (group[:, None] >= 0)
    w = model.config.text_config.sliding_window
    full = k <= q
    sliding = ((k <= q) | same) & (k > q - w)
    neg = torch.finfo(torch.float32).min

    def add(m):
        return torch.where(m, 0.0, neg)[None, None]

    return {"full_attention": add(full), "sliding_attention": add(sliding)}


def render_prompt(tok, parts: list) -> str:
    content = [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]
    return tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def random_text(rng: np.random.Generator, n_words: int) -> str:
    words = sorted(set(tokenizer_build.CORPUS.replace("\n", " ").split()))
    return " ".join(words[int(i)] for i in rng.integers(0, len(words), n_words))


# --------------------------------------------------------------------------------------------


def generate_fixture(fixtures_dir: str, vers: dict) -> dict:
    from safetensors.torch import save_file
    from transformers import AutoProcessor
    from transformers.models.gemma4 import Gemma4ImageProcessorPil

    out_dir = os.path.join(fixtures_dir, NAME)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    print(f"== {NAME}: building, quantizing, exporting")
    log: dict = {}
    build_checkpoint(out_dir, SEED, log)
    generate.write_tokenizer(out_dir)
    generate.check_tokenizer(out_dir)
    proc_info = write_processor_config(out_dir)
    proc = AutoProcessor.from_pretrained(out_dir)
    ip_tv = proc.image_processor
    ip_pil = Gemma4ImageProcessorPil(max_soft_tokens=MAX_SOFT_TOKENS)
    tok = proc.tokenizer
    tensors: dict[str, torch.Tensor] = {}

    # ---- images
    print(f"== {NAME}: images and the reference processor")
    rng = np.random.default_rng(SEED + 1)
    os.makedirs(os.path.join(out_dir, "images"))
    os.makedirs(os.path.join(out_dir, "resized"))
    images = make_images()
    procd = {}
    img_meta = []
    for im in images:
        name = im["name"]
        with open(os.path.join(out_dir, "images", name), "wb") as fh:
            fh.write(im["bytes"])
        pil = pil_open(im["bytes"])
        dec = decoded_rgb(im["bytes"])
        h, w = dec.shape[:2]
        r = process_image(ip_tv, ip_pil, im["bytes"], MAX_SOFT_TOKENS)
        procd[name] = r
        stem = os.path.splitext(name)[0]
        # The resized uint8 image, losslessly (PNG); pixel_values = patchify(it) * float32(1/255).
        rpath = os.path.join(out_dir, "resized", f"{stem}.png")
        with open(rpath, "wb") as fh:
            fh.write(_png(r["resized"]))
        assert np.array_equal(decoded_rgb(open(rpath, "rb").read()), r["resized"])
        store_decoded = name in DECODED_STORED
        if store_decoded:
            tensors[f"{stem}.decoded"] = torch.from_numpy(np.ascontiguousarray(dec))
        tensors[f"{stem}.image_position_ids"] = torch.from_numpy(r["positions"]).long().contiguous()
        th, tw = r["resized"].shape[:2]
        meta = {
            "file": f"images/{name}",
            "about": im["about"],
            "format": pil.format,
            "pil_mode": pil.mode,
            "frames": getattr(pil, "n_frames", 1),
            "width": w,
            "height": h,
            "decoded_tensor": f"{stem}.decoded" if store_decoded else None,
            "decode_exact": pil.format != "JPEG",
            "max_soft_tokens": MAX_SOFT_TOKENS,
            "resized_file": f"resized/{stem}.png",
            "resized_height": th,
            "resized_width": tw,
            "resized": [th, tw] != [h, w],
            "patches_h": r["patches_h"],
            "patches_w": r["patches_w"],
            "num_patches": r["patches_h"] * r["patches_w"],
            "num_soft_tokens": r["num_soft_tokens"],
            "image_position_ids_tensor": f"{stem}.image_position_ids",
            "soft_tokens_tensor": f"{stem}.soft_tokens",
            "pil_backend_max_abs_diff_x255": r["pil_max_diff_255"],
            "pil_backend_mean_abs_diff_x255": round(r["pil_mean_diff_255"], 6),
            "pil_backend_fraction_differing": round(r["pil_frac_differ"], 6),
        }
        img_meta.append(meta)
        print(
            f"  {name}: {pil.format} {pil.mode} {w}x{h} -> {tw}x{th}, {r['num_soft_tokens']} soft tokens; PIL backend "
            f"max|d| {r['pil_max_diff_255']:.0f}/255, {100 * r['pil_frac_differ']:.2f}% differ"
        )

    # Decoder-only cases.
    os.makedirs(os.path.join(out_dir, "images", "decode"))
    decode_meta = []
    for im in make_decode_images():
        rel = f"images/decode/{im['name']}"
        with open(os.path.join(out_dir, rel), "wb") as fh:
            fh.write(im["bytes"])
        pil = pil_open(im["bytes"])
        dec = decoded_rgb(im["bytes"])
        tname = f"decode.{os.path.splitext(im['name'])[0]}"
        tensors[tname] = torch.from_numpy(np.ascontiguousarray(dec))
        decode_meta.append({"file": rel, "about": im["about"], "format": pil.format, "pil_mode": pil.mode, "width": dec.shape[1],
                            "height": dec.shape[0], "decoded_tensor": tname, "exact": im["exact"]})
        print(f"  decode/{im['name']}: {pil.format} {pil.mode} {dec.shape[1]}x{dec.shape[0]}")

    # One image at every budget (the smooth large gradient: resized PNGs stay small).
    budgets = []
    big = next(im for im in images if im["name"] == "large_gradient.png")
    for b in (140, 1120):
        r = process_image(ip_tv, None, big["bytes"], b)
        rel = f"resized/large_gradient.{b}.png"
        with open(os.path.join(out_dir, rel), "wb") as fh:
            fh.write(_png(r["resized"]))
        budgets.append(
            {"image": "images/large_gradient.png", "max_soft_tokens": b, "resized_file": rel, "resized_height": int(r["resized"].shape[0]),
             "resized_width": int(r["resized"].shape[1]), "num_soft_tokens": r["num_soft_tokens"]}
        )
        print(f"  large_gradient.png at {b}: -> {r['resized'].shape[1]}x{r['resized'].shape[0]}, {r['num_soft_tokens']} soft tokens")

    rcases = resize_cases(rng)
    for k, c in enumerate(rcases):
        tensors[f"resize.{k}.input"] = torch.from_numpy(np.ascontiguousarray(c["input"]))
        tensors[f"resize.{k}.output"] = torch.from_numpy(np.ascontiguousarray(c["output"]))
    table = size_table(rng)

    # ---- model
    print(f"== {NAME}: reference (float32, W4A16) from the exported checkpoint")
    stats: dict = {}
    model = load_reference_model(out_dir, stats)
    cfg = json.load(open(os.path.join(out_dir, "config.json")))
    model64 = copy.deepcopy(model).double()
    sd = load_dequantized_state_dict(out_dir)
    soft_checks = {}
    for im, meta in zip(images, img_meta):
        r = procd[im["name"]]
        stem = os.path.splitext(im["name"])[0]
        pv, pos = image_inputs([r], MAX_SOFT_TOKENS)
        with torch.no_grad():
            soft = model.model.get_image_features(pv, pos).pooler_output
            soft64 = model64.model.get_image_features(pv.double(), pos).pooler_output
        assert len(soft) == 1 and soft[0].shape == (r["num_soft_tokens"], TEXT["hidden_size"])
        soft = soft[0].float().contiguous()
        spec = spec_soft_tokens(sd, cfg, r["pixel_values"], r["positions"])
        spec32 = spec_soft_tokens(sd, cfg, r["pixel_values"], r["positions"], torch.float32).double()
        d64 = float((soft.double() - soft64[0]).abs().max())
        dspec = float((spec - soft.double()).abs().max())
        dspec32 = float((spec32 - soft.double()).abs().max())
        # transformers' "float64" model still computes the vision RoPE angles and the pooling /
        # standardization in float32, so the spec is compared with the float32 reference.
        assert dspec < 1e-4 and dspec32 < 1e-4 and d64 < 1e-4, (dspec, dspec32, d64)
        tensors[meta["soft_tokens_tensor"]] = soft
        meta["soft_tokens_max_abs"] = round(float(soft.abs().max()), 4)
        meta["check_soft_tokens_max_abs_diff_vs_spec_forward_f64"] = float(f"{dspec:.3g}")
        meta["check_soft_tokens_max_abs_diff_vs_spec_forward_f32"] = float(f"{dspec32:.3g}")
        meta["check_soft_tokens_max_abs_diff_vs_model_f64"] = float(f"{d64:.3g}")
        soft_checks[im["name"]] = (dspec, dspec32, d64)
        print(
            f"  {im['name']}: soft tokens {tuple(soft.shape)}, max|x| {soft.abs().max():.3f}; vs spec f64 {dspec:.2e}, "
            f"spec f32 {dspec32:.2e}, transformers f64 {d64:.2e}"
        )

    # ---- text-only cases (the golden text harness runs them on this checkpoint too)
    text_cases = []
    for ci, (cname, plen) in enumerate({"short": 5, "medium": int(2.5 * TEXT["sliding_window"])}.items()):
        for attempt in range(200):
            g = torch.Generator().manual_seed(SEED * 1000 + ci * 100 + attempt)
            prompt = [2] + torch.randint(tokenizer_build.FIRST_NORMAL_ID, TEXT_VOCAB, (plen - 1,), generator=g).tolist()
            c = generate.run_case(model, prompt)
            ok = c["min_margin"] >= MIN_MARGIN and not any(t in AVOID for t in c["greedy"]) and len(set(c["greedy"])) >= MIN_DISTINCT
            print(f"  text {cname} P={plen} attempt {attempt}: min margin {c['min_margin']:.4f} greedy {c['greedy']}{'' if ok else ' -> rejected'}")
            if ok:
                break
        else:
            raise RuntimeError(f"no text prompt for {cname}")
        assert generate.greedy_generate(model, prompt, GREEDY_TOKENS) == c["greedy"]
        seq = prompt + c["greedy"]
        spec64 = generate.spec_logits(sd, cfg, seq)
        c["spec_f64"] = float((spec64 - c["logits"].double()).abs().max())
        assert c["spec_f64"] < 2e-4, c["spec_f64"]
        c.update(name=cname, prompt=prompt)
        text_cases.append(c)
        tensors[f"{cname}.logits"] = c["logits"]

    # ---- multimodal cases
    mm_specs = [
        ("one_image", ["large_gradient.png"], lambda t: [None, t[0]]),
        ("two_images", ["stripes_anim.gif", "gradient_tall.png"], lambda t: [t[0], None, t[1], None, t[2]]),
    ]
    mm_cases = []
    for ci, (cname, names, layout) in enumerate(mm_specs):
        rr = [procd[n] for n in names]
        pv, pos = image_inputs(rr, MAX_SOFT_TOKENS)
        for attempt in range(200):
            trng = np.random.default_rng(SEED * 1000 + 500 + ci * 100 + attempt)
            texts = [random_text(trng, int(trng.integers(2, 6))) for _ in range(3)]
            rendered = render_prompt(tok, layout(texts))
            enc = proc(text=rendered, images=[pil_open(next(im["bytes"] for im in images if im["name"] == n)) for n in names],
                       add_special_tokens=False, return_tensors="pt")
            prompt = enc["input_ids"][0].tolist()
            assert torch.equal(enc["pixel_values"], pv) and torch.equal(enc["image_position_ids"], pos)
            assert torch.equal(enc["mm_token_type_ids"][0], (enc["input_ids"][0] == model.config.image_token_id).long())
            c = run_mm_case(model, prompt, pv, pos)
            ok = c["min_margin"] >= MIN_MARGIN and not any(t in AVOID for t in c["greedy"]) and len(set(c["greedy"])) >= MIN_DISTINCT
            print(f"  {cname} P={len(prompt)} attempt {attempt}: min margin {c['min_margin']:.4f} greedy {c['greedy']}{'' if ok else ' -> rejected'}")
            if ok:
                break
        else:
            raise RuntimeError(f"no prompt for {cname}")
        assert prompt.count(2) == 1 and prompt[0] == 2
        gen_ids = generate_with_cache(model, prompt, pv, pos)
        assert gen_ids == c["greedy"], (cname, gen_ids, c["greedy"])
        seq = prompt + c["greedy"]
        logits64 = mm_forward(model64, seq, pv.double(), pos)
        causal_only = mm_forward(model, seq, pv, pos, mm=False)
        explicit = mm_forward(model, seq, pv, pos, mm=False, attention_mask=explicit_masks(model, seq))
        soft = torch.cat([tensors[f"{os.path.splitext(n)[0]}.soft_tokens"] for n in names])
        spec64 = spec_mm_logits(sd, cfg, seq, torch.cat([spec_soft_tokens(sd, cfg, r["pixel_values"], r["positions"]) for r in rr]))
        spec32 = spec_mm_logits(sd, cfg, seq, soft, torch.float32)
        ref = c["logits"].double()
        c.update(
            name=cname,
            prompt=prompt,
            rendered=rendered,
            images=names,
            texts=texts,
            f64=float((logits64 - ref).abs().max()),
            causal_only=float((causal_only.double() - ref).abs().max()),
            explicit=float((explicit.double() - ref).abs().max()),
            spec_f64=float((spec64 - ref).abs().max()),
            spec_f32=float((spec32.double() - ref).abs().max()),
        )
        print(
            f"  {cname}: f32 vs f64 {c['f64']:.2e}; explicit README masks {c['explicit']:.1e}; spec f64 {c['spec_f64']:.1e}, "
            f"spec f32 {c['spec_f32']:.2e}; without mm_token_type_ids (all causal) {c['causal_only']:.3f}"
        )
        assert c["explicit"] < 1e-5 and c["spec_f64"] < 2e-4 and c["f64"] < 2e-4 and c["spec_f32"] < 2e-4, c
        assert c["causal_only"] > 1e-2, "the bidirectional image mask must matter in the fixture"
        assert soft.shape[0] == sum(1 for t in prompt if t == model.config.image_token_id)
        mm_cases.append(c)
        tensors[f"{cname}.logits"] = c["logits"]

    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, os.path.join(out_dir, "reference.safetensors"), metadata={"format": "pt"})

    # ---- reference.json
    ids = tokenizer_build.token_ids()
    ref = {
        "generator": {
            "script": SCRIPT,
            "command": "bash conformance/fixtures_gen/run.sh",
            "versions": vers,
            "seed": SEED,
            "reference_dtype": "float32",
            "activations": "unquantized (W4A16)",
            "weights": "NVFP4 linears (the text MLP) dequantized exactly; bf16 tensors (attention, embeddings, norms, "
            "the whole vision tower and embed_vision) upcast to float32",
            "attn_implementation": "eager (text and vision)",
            "embed_scale": stats["embed_scale"],
            "processor": proc_info,
            "image_loading": "PIL.Image.open(bytes), first frame, passed to the processor as a PIL image: transformers' "
            "convert_to_rgb composites an alpha channel or a transparency entry onto white, else convert('RGB'); "
            "no EXIF rotation",
            "pixel_values": "only the real patches (no padding rows); value = float32(u8) * float32(1/255) in float32, "
            "u8 the resized image stored losslessly in resized/<image>.png; patch (py, px) row-major, inside a patch "
            "(row, col, channel)",
            "image_position_ids": "(x, y) per real patch, x fastest: [[0,0],[1,0],...,[pw-1,0],[0,1],...]",
            "soft_tokens": "model.get_image_features(...).pooler_output: vision tower, 3x3 pooling, standardize, "
            "embed_vision (weightless RMSNorm + projection), [num_soft_tokens, text hidden], float32",
            "logits": "after final_logit_softcapping, one forward pass over prompt_ids + greedy_ids with "
            "mm_token_type_ids (1 at <|image|> positions), shape [P+G, vocab]",
            "greedy": f"argmax, {GREEDY_TOKENS} tokens, no eos stop; equal to transformers generate() with its KV cache",
        },
        "special_ids": {"boi": ids["<|image>"], "image": ids["<|image|>"], "eoi": ids["<image|>"], "pad": 0, "bos": 2},
        "cases": [
            {
                "name": c["name"],
                "prompt_ids": c["prompt"],
                "greedy_ids": c["greedy"],
                "min_greedy_margin": round(c["min_margin"], 6),
                "logits_tensor": f"{c['name']}.logits",
                "check_max_abs_diff_vs_spec_forward_f64": float(f"{c['spec_f64']:.3g}"),
            }
            for c in text_cases
        ],
        "multimodal_cases": [
            {
                "name": c["name"],
                "images": [f"images/{n}" for n in c["images"]],
                "rendered_prompt": c["rendered"],
                "prompt_ids": c["prompt"],
                "greedy_ids": c["greedy"],
                "min_greedy_margin": round(c["min_margin"], 6),
                "logits_tensor": f"{c['name']}.logits",
                "soft_tokens_tensors": [f"{os.path.splitext(n)[0]}.soft_tokens" for n in c["images"]],
                "check_max_abs_diff_vs_model_f64": float(f"{c['f64']:.3g}"),
                "check_max_abs_diff_vs_spec_forward_f64": float(f"{c['spec_f64']:.3g}"),
                "check_max_abs_diff_vs_spec_forward_f32": float(f"{c['spec_f32']:.3g}"),
                "check_max_abs_diff_explicit_readme_masks": float(f"{c['explicit']:.3g}"),
                "check_max_abs_diff_without_bidirectional_mask": float(f"{c['causal_only']:.3g}"),
            }
            for c in mm_cases
        ],
        "images": img_meta,
        "decode_cases": decode_meta,
        "budgets": budgets,
        "resize_cases": [
            {"input_tensor": f"resize.{k}.input", "output_tensor": f"resize.{k}.output", "input_hw": list(c["input"].shape[:2]), "target_hw": c["target"]}
            for k, c in enumerate(rcases)
        ],
        "size_table_columns": ["height", "width", "max_soft_tokens", "target_height", "target_width"],
        "size_table": table,
    }
    generate.dump_json(ref, os.path.join(out_dir, "reference.json"))
    summary = {"log": log, "stats": stats, "images": img_meta, "decode": decode_meta, "text_cases": text_cases, "mm_cases": mm_cases, "budgets": budgets,
               "soft_checks": soft_checks, "cfg": cfg, "proc": proc_info, "n_table": len(table), "n_resize": len(rcases)}
    write_readme(out_dir, summary, vers)
    write_manifest(out_dir, vers)
    return summary


def write_manifest(out_dir: str, vers: dict) -> None:
    files = []
    for root, _dirs, names in os.walk(out_dir):
        for fn in names:
            p = os.path.join(root, fn)
            rel = os.path.relpath(p, out_dir)
            if rel == "MANIFEST.json":
                continue
            files.append({"file": rel, "bytes": os.path.getsize(p), "sha256": generate.sha256(p)})
    files.sort(key=lambda f: f["file"])
    generate.dump_json(
        {"generator": SCRIPT, "command": "bash conformance/fixtures_gen/run.sh", "versions": vers, "name": NAME, "files": files,
         "total_bytes": sum(f["bytes"] for f in files)},
        os.path.join(out_dir, "MANIFEST.json"),
    )


def write_readme(out_dir: str, s: dict, vers: dict) -> None:
    cfg = s["cfg"]
    t, v = cfg["text_config"], cfg["vision_config"]
    ids = tokenizer_build.token_ids()
    tf = "transformers/models/gemma4/"
    L = []
    a = L.append
    a("# Golden fixture `tiny-vision`: Gemma 4 with a vision tower, NVFP4 (31B recipe)")
    a("")
    a(f"Generated by `{SCRIPT}` (run by `bash conformance/fixtures_gen/run.sh`); do not edit by hand.")
    a("CPU only, one thread; bit-for-bit reproducible with the pinned versions:")
    a("" + ", ".join(f"{k} {x}" for k, x in vers.items()) + ".")
    a("Line numbers below refer to transformers 5.23.0 (`transformers/...`), torchvision 0.29.2")
    a("(`torchvision/...`) and Pillow 13.0.0 as installed from PyPI.")
    a("")
    a("## The checkpoint")
    a("")
    a(f"- Text: {t['num_hidden_layers']} layers `{''.join('F' if x == 'full_attention' else 'S' for x in t['layer_types'])}`, hidden {t['hidden_size']}, "
      f"MLP {t['intermediate_size']}, {t['num_attention_heads']} query heads, KV heads {t['num_key_value_heads']} sliding / 1 full, head_dim "
      f"{t['head_dim']} / {TEXT['global_head_dim']} (in `per_layer_config`), attention_k_eq_v, sliding window {t['sliding_window']}, "
      f"softcap {t['final_logit_softcapping']}, vocab {t['vocab_size']}, `use_bidirectional_attention: \"vision\"`, tied embeddings.")
    a(f"- Vision: {v['num_hidden_layers']} layers, hidden {v['hidden_size']}, MLP {v['intermediate_size']}, {v['num_attention_heads']} heads of "
      f"{v['head_dim']} (KV heads {v['num_key_value_heads']}), patch {v['patch_size']}, pooling {v['pooling_kernel_size']}, position table "
      f"2 x {v['position_embedding_size']} x {v['hidden_size']}, RoPE theta {v['rope_parameters']['rope_theta']} (the config written by "
      f"transformers says `rope_type: \"{v['rope_parameters']['rope_type']}\"`; the published 31B config says `\"default\"`: read both), "
      f"`standardize: true` (`model.vision_tower.std_bias` / `std_scale`, bf16 [{v['hidden_size']}]), `use_clipped_linears: false` "
      f"(linear `X` of the tower is `X.linear.weight`).")
    a(f"- Special ids (the shared fixture tokenizer, as in the other fixtures): `<|image>` {ids['<|image>']} (boi_token_id), `<|image|>` "
      f"{ids['<|image|>']} (image_token_id), `<image|>` {ids['<image|>']} (eoi_token_id); `<|audio>` 8, `<|audio|>` 9, `<audio|>` 10, `<|video|>` 11. "
      "The real model uses 255999 / 258880 / 258882: read them from config.json and tokenizer.json.")
    a("- Quantization: ModelOpt `NVFP4_DEFAULT_CFG` + `*self_attn*` disabled + `FP8_KV_CFG`, text-only calibration, `export_hf_checkpoint`. "
      f"Only the {s['log']['nvfp4_weights']} text MLP linears are NVFP4. ModelOpt's default exclusions (`*vision_tower*`, `*embed_vision*`, "
      "modelopt_recipes/configs/ptq/units/default_disabled_quantizers.yaml) keep every vision tensor bf16; the exported tensors are "
      f"asserted equal to the random bf16 ones ({s['log']['vision_tensors']} tensors). `hf_quant_config.json` `exclude_modules` and "
      "config.json `quantization_config.ignore` list `model.vision_tower*` and `model.embed_vision*` (and `lm_head`, each layer's "
      "`self_attn*`). `FP8_KV_CFG` re-enables the K/V bmm quantizers of the vision attention too, but text-only calibration never feeds "
      "them, so no vision `k_scale`/`v_scale` is exported.")
    a("- `processor_config.json`: as `Gemma4Processor.save_pretrained` writes it; the image settings are in its `image_processor` object "
      f"(`patch_size` 16, `pooling_kernel_size` 3, `max_soft_tokens` {MAX_SOFT_TOKENS}, `resample` 3 = bicubic, `rescale_factor` 1/255, "
      "`do_normalize` false). transformers reads `processor_config.json`'s `image_processor` first and falls back to a flat "
      "`preprocessor_config.json` (transformers/image_processing_base.py:337-347); absent keys take the class defaults 16 / 3 / 280. "
      f"`AutoProcessor` gives `{s['proc']['image_processor']}` with the `{s['proc']['backend']}` backend (torchvision is installed).")
    a("- Random init: generate.py's text scales; vision linears N(0, 1/in), vision norms U(0.4, 1.8), vision q/k norms U(0.25, 0.75), "
      "position table N(0, 0.5^2), std_bias N(0, 2^2), std_scale U(0.3, 1.5), embed_vision N(0, 1/in).")
    a("")
    a("## Files")
    a("")
    a("- `images/`: the test images (below); `images/decode/`: small images for the decoder only.")
    a("- `resized/<image>.png`: the reference resized uint8 image at 70 soft tokens (lossless PNG, RGB8), "
      "`resized/large_gradient.<budget>.png` at 140 and 1120. The reference pixel values are this image patchified and multiplied by "
      "float32(1/255) in float32; the generator asserts that this reproduces the processor's `pixel_values` bit for bit. "
      "(PNG instead of a U8 tensor keeps the fixture under 4 MB.)")
    a("- `reference.safetensors`:")
    a("  - `<image>.decoded` U8 [h, w, 3]: the RGB the processor starts from (`convert_to_rgb` of the PIL image), for the "
      "non-trivial decoders (JPEG, WebP, GIF, palette, alpha); `decode.<name>` U8 [h, w, 3] for `images/decode/`.")
    a("  - `<image>.image_position_ids` I64 [num_patches, 2]: (x, y) per real patch.")
    a("  - `<image>.soft_tokens` F32 [num_soft_tokens, text hidden]: `model.get_image_features(...).pooler_output` (vision tower, "
      "pooling, standardize, embed_vision), float32 reference.")
    a("  - `resize.<k>.input` / `resize.<k>.output` U8 [h, w, 3]: direct cases of torchvision `resize(BICUBIC, antialias=True)` on uint8.")
    a("  - `<case>.logits` F32 [P+G, vocab]: logits (after the softcap) at every position of one forward pass over prompt + greedy tokens.")
    a("- `reference.json`: `cases` (text-only, same schema as the other fixtures, so the text golden tests run them on this checkpoint), "
      "`multimodal_cases`, `images`, `decode_cases`, `budgets`, `resize_cases`, `size_table` ((h, w, budget) -> (th, tw) from the reference "
      f"`get_aspect_ratio_preserving_size`, {s['n_table']} rows), `special_ids`, `generator`.")
    a("- `MANIFEST.json`: every file with its size and sha256.")
    a("")
    a("## Images (70 soft tokens)")
    a("")
    a("| image | format / PIL mode | size | resized | patches | soft tokens | PIL backend vs torchvision: max / % values differing |")
    a("|---|---|---|---|---|---|---|")
    for m in s["images"]:
        a(f"| `{m['file']}` | {m['format']} {m['pil_mode']}{' (' + str(m['frames']) + ' frames)' if m['frames'] > 1 else ''} | {m['width']}x{m['height']} | "
          f"{m['resized_width']}x{m['resized_height']}{'' if m['resized'] else ' (not resized)'} | {m['patches_w']}x{m['patches_h']} | {m['num_soft_tokens']} | "
          f"{m['pil_backend_max_abs_diff_x255']:.0f}/255 / {100 * m['pil_backend_fraction_differing']:.2f}% |")
    a("")
    for m in s["images"]:
        a(f"- `{m['file']}`: {m['about']}.")
    a("")
    a("`images/decode/`: " + "; ".join(f"`{d['file'].split('/')[-1]}` ({d['about']})" for d in s["decode"]) + ".")
    a("")
    a("The PIL backend (`Gemma4ImageProcessorPil`) is NOT bit-identical to the torchvision one that AutoProcessor picks: Pillow's "
      "resampler uses 22-bit fixed-point weights where ATen uses int16 weights with a precision chosen from the largest weight, so "
      "up to 2/255 differ on < 1% of the values (table). The reference is the torchvision backend.")
    a("")
    a("## Reference semantics the engine must reproduce")
    a("")
    a("### Image loading and preprocessing (`Gemma4ImageProcessor`, torchvision backend)")
    a("")
    a("1. Loading: the reference opens the bytes with `PIL.Image.open` (the first frame of an animated GIF) and passes the PIL image. "
      "`process_image` calls `convert_to_rgb` (transformers/image_processing_backends.py:131): an image with an alpha band or a "
      "`transparency` entry (palette index, tRNS colour key) is converted to RGBA and alpha-composited onto opaque white, then RGB "
      "(transformers/image_transforms.py:779-783; Pillow's integer formula, per channel with white background: "
      "`t = 128 * (v * a + 255 * (255 - a)) + 16384; out = (((t >> 8) + t) >> 8) >> 7`, checked for all 65536 (v, a)); "
      "anything else is `convert(\"RGB\")` (grey replicated, palette expanded; 16-bit: RGB(A) keeps the high byte, 16-bit grey (mode "
      "I;16) is clipped to 255). No EXIF rotation: the processor applies none to a PIL image (only `load_image` for URLs/paths, used "
      "by `apply_chat_template`, calls `exif_transpose`, and it also drops alpha with a plain `convert(\"RGB\")`, "
      "transformers/image_utils.py:514-515: a different path, not the one here).")
    a("2. Target size: `get_aspect_ratio_preserving_size` (transformers/models/gemma4/image_processing_gemma4.py:33-84) with "
      "`max_patches = max_soft_tokens * pooling_kernel_size**2` (:220): `factor = sqrt(max_patches * patch**2 / (h * w))`, "
      "`th = floor(factor * h / 48) * 48`, `tw` likewise (48 = pooling x patch); if both are 0 -> error; if one is 0 it becomes 48 and "
      "the other `min(floor(long / short) * 48, (max_patches // 9) * 48)`; error if `th * tw > max_patches * 256` (unreachable but by "
      "float rounding for supported budgets). Budgets: 70, 140, 280, 560, 1120 only (:29, :155-156, :216-217).")
    a("3. Resize: none when (th, tw) equals the input size (:183-184); else `tvF.resize(uint8 CHW tensor, [th, tw], BICUBIC, "
      "antialias=True)` (:186-191). On the CPU torchvision keeps uint8 for bicubic (torchvision/transforms/v2/functional/_geometry.py:"
      "280, :321-323) and calls `interpolate(..., mode=\"bicubic\", antialias=True)`: ATen's `_upsample_bicubic2d_aa` uint8 kernel "
      "(aten/src/ATen/native/cpu/UpSampleKernel.cpp, AVX2 path UpSampleKernelAVXAntialias.h; both give identical results, verified with "
      "ATEN_CPU_CAPABILITY=default and avx512). Separable: horizontal pass (if the width changes) then vertical (if the height changes), "
      "each rounded and clamped to uint8. Per axis: `scale = in / out` (float64), `support = 2 * max(scale, 1)`, window "
      "`ceil(support) * 2 + 1`, `center = scale * (i + 0.5)`, `xmin = max(int(center - support + 0.5), 0)`, "
      "`xsize = min(int(center + support + 0.5), in) - xmin`, weights `filter(((j + xmin) - center + 0.5) / max(scale, 1))` with "
      "Pillow's cubic a = -0.5, normalised by their float64 sum; int16 weights `round_half_away(w * 2^p)` where p is the largest "
      "p < 22 with `int(0.5 + max_w * 2^(p+1)) < 2^15` (max_w over the whole axis); output "
      "`clamp((2^(p-1) + sum(w * x)) >> p, 0, 255)`.")
    a("4. Rescale: `uint8_tensor * (1/255)` (transformers/image_processing_backends.py:315), a float32 product: "
      "`float32(u8) * float32(1/255)` (0x3B808081), which differs from `u8 / 255` rounded to float32 for 126 of the 256 values. "
      "No normalisation (`do_normalize` false); the model maps [0, 1] to [-1, 1] itself.")
    a("5. Patchify (`convert_image_to_patches`, image_processing_gemma4.py:88-100): patches in row-major grid order (patch row, then "
      "column); each patch flattened (row, column, channel): index `(r * 16 + c) * 3 + ch`. Positions (:251-258): "
      "`meshgrid(arange(pw), arange(ph), indexing=\"xy\")` stacked as (x, y): [[0,0], [1,0], ..., [pw-1,0], [0,1], ...]. "
      "`num_soft_tokens = num_patches // 9` (:248). The processor pads to `max_patches` rows with 0 and positions -1 (:261); the "
      "model strips them again, so the engine can skip padding entirely (the stored tensors hold only real patches).")
    a("")
    a("### Vision tower (`Gemma4VisionModel`, modeling_gemma4.py:2079-2121) and embedder")
    a("")
    a("- Patch embedding (:617-626, :595-615): `input_proj(2 * (pixel - 0.5)) + table[0][x] + table[1][y]` (padding rows zeroed).")
    a("- Encoder layers (:984-1012): input_layernorm -> attention -> post_attention_layernorm -> residual; pre_feedforward_layernorm -> "
      "gelu-tanh gated MLP -> post_feedforward_layernorm -> residual; no layer_scalar. Attention (:924-968): q_norm / k_norm (weighted), "
      "v_norm (no weight), scaling 1.0 (:912), bidirectional over the real patches of one image (padding keys masked, :2099).")
    a("- 2-D RoPE (:733-768, :846-899): `inv_freq[i] = theta^(-2i / (head_dim/2))` for i < head_dim/4 (float32); the first half of "
      "each head is rotated by the x position, the second half by y, each half rotate-half style (its first quarter against its second "
      "quarter). (`recomposition_frequencies` names them h/w but channel 0 of the position ids is x.)")
    a("- Pooling (:642-694): 3x3 average of the patch grid; soft token `cy * (pw / 3) + cx` (row-major over the pooled grid, "
      "`kernel_idxs[..., 0] + (max_x // k) * kernel_idxs[..., 1]`, :663); then `* sqrt(vision hidden)` in float32 (:692); cells without "
      "patches dropped (:2112); `(h - std_bias) * std_scale` in float32 (:2117).")
    a("- `embed_vision` (:2139-2147): RMSNorm without weight (eps = vision rms_norm_eps), then `embedding_projection` to the text hidden "
      "size: the soft tokens. Split per image in order (:2272-2278).")
    a("- transformers' float64 copy of the model still computes the vision RoPE angles and the pooling / standardisation in float32, "
      "so the independent check is against the float32 reference: max |soft token - spec float64| per image below.")
    a("")
    a("### Prompt, merge and text-tower masks")
    a("")
    a(f"- Prompt: the chat template renders an image part as `<|image|>`; the processor replaces each by `<|image>` + n x `<|image|>` + "
      "`<image|>` with n = the image's `num_soft_tokens` (transformers/models/gemma4/processing_gemma4.py:199-201). The processor "
      "tokenizes with `add_special_tokens=False` here (the rendered text already starts with `<bos>`).")
    a("- Embedding (modeling_gemma4.py:2379-2416): placeholder ids (image, video, audio) are looked up as `pad_token_id` (:2386), "
      "embedded and scaled by the embedding scale (:1439, bf16-rounded sqrt(hidden) as in the other fixtures); then the soft tokens of "
      "all images, concatenated in image order, replace the `<|image|>` positions in order (`masked_scatter`, :2414-2416). "
      "The soft tokens are NOT multiplied by the embedding scale. `<|image>` / `<image|>` are ordinary text tokens.")
    a("- Positions (:2464-2468, as in the text model): `arange(seq_len)`: one position per token, image tokens included; text RoPE unchanged.")
    a("- Masks, only when `mm_token_type_ids` is passed (the processor returns it: `return_mm_token_type_ids = True`, "
      "processing_gemma4.py:92; 1 exactly at `<|image|>` ids, processing_utils.py:1021) and `use_bidirectional_attention == \"vision\"` "
      "(:2479-2487); otherwise plain causal / sliding masks (:2488-2491):")
    a("  - image groups (`get_block_sequence_ids_for_mask`, :2213-2222): maximal runs of consecutive `<|image|>` tokens; two images "
      "are always separate groups (their `<image|>` `<|image>` tokens sit between them);")
    a("  - full-attention layers: causal only, no bidirectional part (`create_masks_for_vision_model`, :2150-2175);")
    a("  - sliding layers: `(k <= q OR same_group(q, k)) AND k > q - sliding_window` (:2198-2205; masking_utils.py:76, :95, :125, "
      "or-function applied before the and-function, :994-998): an image token sees every token of its own image ahead of it, but the "
      "window still cuts keys more than `sliding_window - 1` positions behind the query, inside the image too. Text tokens are causal.")
    a("  - decoding with a KV cache (`generate`): `mm_token_type_ids` is passed only on the first (prefill) step "
      "(:2757-2762); later steps are causal, which changes nothing since new tokens come after every image.")
    a("- The reference logits are one forward pass over prompt + greedy tokens with `mm_token_type_ids`; checks: the same forward with "
      "explicit 4-D masks built from the rule above gives identical logits (`check_max_abs_diff_explicit_readme_masks` 0), and an "
      "independent implementation of this section (`spec_mm_logits` in the generator) agrees within float32 noise. Without "
      "`mm_token_type_ids` (all causal) the logits move by > 20 (`check_max_abs_diff_without_bidirectional_mask`): the mask matters here.")
    a("- Deployment note: in bf16 the model casts `2 * (pixel - 0.5)` to bf16 before `input_proj` (:622-623) and the soft tokens to bf16 "
      "(:2118); the reference here is float32 throughout.")
    a("")
    a("## Cases")
    a("")
    a("| case | images | P | G | min greedy margin | max abs diff vs transformers f64 / spec f64 / spec f32 | without the bidirectional mask |")
    a("|---|---|---|---|---|---|---|")
    for c in s["mm_cases"]:
        a(f"| `{c['name']}` | {', '.join('`' + n + '`' for n in c['images'])} | {len(c['prompt'])} | {len(c['greedy'])} | {c['min_margin']:.4f} | "
          f"{c['f64']:.1e} / {c['spec_f64']:.1e} / {c['spec_f32']:.1e} | {c['causal_only']:.1f} |")
    for c in s["text_cases"]:
        a(f"| `{c['name']}` (text only) | | {len(c['prompt'])} | {len(c['greedy'])} | {c['min_margin']:.4f} | - / {c['spec_f64']:.1e} / - | |")
    a("")
    a("Soft tokens, max |float32 reference - spec float64| / |spec float32 - float32 reference|: " + "; ".join(
        f"`{n}` {d[0]:.1e} / {d[1]:.1e}" for n, d in s["soft_checks"].items()) + ".")
    a("")
    a(f"Greedy: {GREEDY_TOKENS} argmax tokens (no eos stop), equal to `generate()` with its KV cache; prompts re-drawn until the "
      f"top1 - top2 margin is >= {MIN_MARGIN} at every step, no stop / pad / media id is generated, and at least {MIN_DISTINCT} distinct "
      "tokens appear. Rendered prompts are in reference.json (`rendered_prompt`).")
    a("")
    a("## Engine tolerances (model/tests/preprocess.rs)")
    a("")
    a("- Preprocessing: bit-exact (decoded RGB of PNG, GIF, WebP; target sizes; resize; pixel values; positions).")
    a("- JPEG decoding: the `image` crate (zune-jpeg) is not libjpeg-turbo (Pillow's decoder): IDCT, chroma upsampling and YCbCr->RGB "
      "rounding differ by up to 4/255 (1-30% of the values, mean < 0.5/255; on the real photos of scikit-image's wheel 2-4/255, "
      "1-8% of the values, mean 0.01-0.08/255), up to 6/255 after the bicubic resize; the rest of the pipeline is exact on PIL's "
      "decoded RGB. The multimodal cases therefore use PNG and GIF images only.")
    a("- Not covered by the fixture: animated WebP, GIFs whose first frame does not cover the canvas, CMYK / YCCK JPEGs, EXIF "
      "orientation (ignored, as by the processor).")
    a("")
    with open(os.path.join(out_dir, "README.md"), "w") as fh:
        fh.write("\n".join(L))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(REPO, "fixtures"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    vers = generate.versions()
    import PIL
    import torchvision

    vers = dict(vers, torchvision=torchvision.__version__, pillow=PIL.__version__)
    print("versions:", vers, "cpu capability:", torch.backends.cpu.get_cpu_capability())
    generate_fixture(args.out, vers)


if __name__ == "__main__":
    main()
