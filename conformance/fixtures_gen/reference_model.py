"""The float32 W4A16 reference model of an exported fixture checkpoint.

Used by generate.py (golden outputs) and bench_transformers.py (speed baseline).

Reads `model.safetensors` as ModelOpt wrote it, dequantizes every NVFP4 linear exactly
(W = E2M1(code) * E4M3(weight_scale) * weight_scale_2, with ModelOpt's own NVFP4QTensor.dequantize,
checked against a direct implementation), upcasts every bf16 tensor to f32, and loads the result
into a float32 `Gemma4ForConditionalGeneration` built from the exported config.json with eager
attention. Activations are not quantized. The embedding scale is set to sqrt(hidden) rounded to
bf16, as the bf16 deployment computes it.
"""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors import safe_open

E2M1_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
BLOCK = 16
# Tensors ModelOpt writes next to weights that the W4A16 reference does not use.
AUX_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale", ".k_scale", ".v_scale")


def e4m3_to_f64_direct(raw: torch.Tensor) -> torch.Tensor:
    """E4M3 (fn) bytes -> float64, from the bits: bias 7, e=0 subnormal m*2^-9, no infinities."""
    b = raw.view(torch.uint8).to(torch.int64)
    s = (b >> 7) & 1
    e = (b >> 3) & 0xF
    m = b & 0x7
    mag = torch.where(
        e == 0,
        m.to(torch.float64) * 2.0**-9,
        (1.0 + m.to(torch.float64) / 8.0) * torch.pow(2.0, (e - 7).to(torch.float64)),
    )
    mag = torch.where((e == 15) & (m == 7), torch.full_like(mag, float("nan")), mag)
    return torch.where(s == 1, -mag, mag)


def dequant_nvfp4_direct(packed: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    """Direct NVFP4 dequantization: even column in the low nibble, bit 3 of a code is the sign.

    Computed in float64 (the product of a 3-bit, a 4-bit and a 24-bit significand is exact there)
    and rounded once to float32.
    """
    out_f, half_in = packed.shape
    p = packed.to(torch.int64)
    codes = torch.empty(out_f, half_in * 2, dtype=torch.int64)
    codes[:, 0::2] = p & 0xF
    codes[:, 1::2] = (p >> 4) & 0xF
    mag = torch.tensor(E2M1_VALUES, dtype=torch.float64)[codes & 0x7]
    val = torch.where((codes & 0x8) != 0, -mag, mag)
    s = e4m3_to_f64_direct(scale).repeat_interleave(BLOCK, dim=1)
    assert s.shape == val.shape, (s.shape, val.shape)
    return (val * s * scale_2.to(torch.float64)).to(torch.float32)


def dequant_nvfp4_modelopt(packed: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    shape = torch.Size([packed.shape[0], packed.shape[1] * 2])
    q = NVFP4QTensor(shape, torch.float32, packed)
    return q.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: BLOCK})


def load_dequantized_state_dict(
    fixture_dir: str, stats: dict | None = None, use_direct: bool = False
) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors as float32, NVFP4 linears dequantized.

    A linear X is NVFP4 when X.weight is U8 and X.weight_scale exists (decided from the tensors).
    ModelOpt's dequantization is used; it is asserted to equal the direct implementation up to one
    float32 rounding (ModelOpt multiplies scale * scale_2 first, then by the code value, which can
    round twice); `stats` receives the number of elements where the two differ and the largest
    relative difference. `use_direct` returns the direct (single-rounding) values instead.
    """
    path = os.path.join(fixture_dir, "model.safetensors")
    sd: dict[str, torch.Tensor] = {}
    n_diff = 0
    n_total = 0
    max_rel = 0.0
    nvfp4 = []
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        for k in keys:
            if k.endswith(AUX_SUFFIXES):
                continue
            t = f.get_tensor(k)
            base = k[: -len(".weight")] if k.endswith(".weight") else None
            if t.dtype == torch.uint8 and base is not None and f"{base}.weight_scale" in keys:
                ws = f.get_tensor(f"{base}.weight_scale")
                ws2 = f.get_tensor(f"{base}.weight_scale_2")
                assert ws.dtype == torch.float8_e4m3fn and ws2.dtype == torch.float32 and ws2.dim() == 0
                assert ws.shape == (t.shape[0], t.shape[1] * 2 // BLOCK), (k, ws.shape, t.shape)
                w_mo = dequant_nvfp4_modelopt(t, ws, ws2)
                w_direct = dequant_nvfp4_direct(t, ws, ws2)
                assert w_mo.dtype == torch.float32 and w_mo.shape == w_direct.shape
                diff = w_mo != w_direct
                if diff.any():
                    rel = ((w_mo - w_direct).abs() / w_direct.abs())[diff].max().item()
                    # at most one float32 rounding apart
                    assert rel <= 2.0**-23, (k, rel)
                    max_rel = max(max_rel, rel)
                n_diff += int(diff.sum())
                n_total += diff.numel()
                sd[k] = w_direct if use_direct else w_mo
                nvfp4.append(base)
            else:
                assert t.dtype in (torch.bfloat16, torch.float32), (k, t.dtype)
                sd[k] = t.to(torch.float32)
    if stats is not None:
        stats.update(
            nvfp4_linears=nvfp4,
            dequant_elements=n_total,
            dequant_elements_modelopt_ne_direct=n_diff,
            dequant_max_rel_diff=max_rel,
        )
    return sd


def bf16_embed_scale(hidden: int) -> float:
    return float(torch.tensor(math.sqrt(hidden), dtype=torch.float32).to(torch.bfloat16).to(torch.float32))


def load_reference_model(fixture_dir: str, stats: dict | None = None):
    """Float32 eager Gemma4ForConditionalGeneration with the dequantized exported weights."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    with open(os.path.join(fixture_dir, "config.json")) as fh:
        cfg = json.load(fh)
    cfg.pop("quantization_config", None)  # the weights are dequantized here
    config = Gemma4Config.from_dict(cfg)
    model = Gemma4ForConditionalGeneration._from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    assert model.config._attn_implementation == "eager"
    assert model.config.get_text_config()._attn_implementation == "eager"

    sd = load_dequantized_state_dict(fixture_dir, stats)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert list(missing) == ["lm_head.weight"], missing  # tied to the embedding
    lm = model.model.language_model
    assert model.lm_head.weight.data_ptr() == lm.embed_tokens.weight.data_ptr(), "lm_head not tied"
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32, n
    for n, b in model.named_buffers():
        assert b.dtype in (torch.float32, torch.int64), (n, b.dtype)

    # Embedding scale as the bf16 deployment has it: sqrt(hidden) rounded to bf16.
    hidden = model.config.get_text_config().hidden_size
    scale = bf16_embed_scale(hidden)
    emb = lm.embed_tokens
    with torch.no_grad():
        emb.embed_scale.fill_(scale)
    emb.scalar_embed_scale = scale
    ids = torch.arange(min(8, emb.weight.shape[0]))[None]
    with torch.no_grad():
        got = emb(ids)
    assert torch.equal(got, emb.weight[ids] * scale), "embed_scale override did not take effect"
    assert float(emb.embed_scale) == scale and scale != math.sqrt(hidden)
    if stats is not None:
        stats["embed_scale"] = scale
    return model
