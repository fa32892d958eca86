"""An independent float64 forward pass written from a prose description of the Gemma 4
text architecture (the project's model spec), not from transformers' code.

generate.py runs it on every case and asserts it agrees with the transformers float32 reference,
so the fixtures also check that the spec and transformers agree on the text forward pass.
"""

from __future__ import annotations

import math

import torch

from reference_model import bf16_embed_scale


def _rms(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = x * (x.pow(2).mean(-1, keepdim=True) + eps) ** -0.5
    return y * w if w is not None else y  # w, not 1 + w


def _rope(x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    # x [L, heads, d]; rotate-half with positions 0..L-1
    pos = torch.arange(x.shape[0], dtype=torch.float64)
    inv_freq = inv_freq.to(torch.float64)
    ang = pos[:, None] * inv_freq[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :]
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos.to(x.dtype) + rot * sin.to(x.dtype)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def spec_logits(
    sd: dict[str, torch.Tensor], cfg: dict, ids: list[int], dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Logits [len(ids), vocab] computed in `dtype` (float64: ground truth; float32: an independent
    float32 implementation, to estimate how far a correct float32 port lands from the reference)."""
    t = cfg["text_config"]
    g = {k: v.to(dtype) for k, v in sd.items()}
    pre = "model.language_model."
    eps = t["rms_norm_eps"]
    hidden = t["hidden_size"]
    nh = t["num_attention_heads"]
    plc = {int(k): v for k, v in (t.get("per_layer_config") or {}).items()}
    emb = g[pre + "embed_tokens.weight"]
    x = emb[torch.tensor(ids)] * bf16_embed_scale(hidden)
    L = len(ids)
    qpos = torch.arange(L)[:, None]
    kpos = torch.arange(L)[None, :]
    for i, typ in enumerate(t["layer_types"]):
        p = f"{pre}layers.{i}."
        full = typ == "full_attention"
        hd = plc.get(i, {}).get("head_dim", t["head_dim"])
        kvh = plc.get(i, {}).get("num_key_value_heads", t["num_key_value_heads"])
        rp = t["rope_parameters"][typ]
        theta = rp["rope_theta"]
        n_rot = int(rp.get("partial_rotary_factor", 1.0) * hd // 2) if rp["rope_type"] == "proportional" else hd // 2
        assert rp["rope_type"] in ("default", "proportional")
        inv = torch.zeros(hd // 2, dtype=torch.float64)
        inv[:n_rot] = theta ** (-(2.0 * torch.arange(n_rot, dtype=torch.float64)) / hd)

        r = x
        h = _rms(x, g[p + "input_layernorm.weight"], eps)
        q = (h @ g[p + "self_attn.q_proj.weight"].T).view(L, nh, hd)
        kx = (h @ g[p + "self_attn.k_proj.weight"].T).view(L, kvh, hd)
        vw = g.get(p + "self_attn.v_proj.weight")
        if vw is None:
            assert full and t["attention_k_eq_v"], i
            vx = kx  # V from k_proj, without k_norm and RoPE
        else:
            vx = (h @ vw.T).view(L, kvh, hd)
        q = _rope(_rms(q, g[p + "self_attn.q_norm.weight"], eps), inv)
        k = _rope(_rms(kx, g[p + "self_attn.k_norm.weight"], eps), inv)
        v = _rms(vx, None, eps)
        allowed = kpos <= qpos
        if not full:
            allowed &= kpos > qpos - t["sliding_window"]  # window keys including itself
        out = torch.empty(L, nh, hd, dtype=dtype)
        grp = nh // kvh
        for hh in range(nh):
            s = q[:, hh] @ k[:, hh // grp].T  # scaling 1.0
            s = s.masked_fill(~allowed, float("-inf"))
            out[:, hh] = torch.softmax(s, -1) @ v[:, hh // grp]
        a = out.reshape(L, nh * hd) @ g[p + "self_attn.o_proj.weight"].T
        x = r + _rms(a, g[p + "post_attention_layernorm.weight"], eps)
        r = x
        h = _rms(x, g[p + "pre_feedforward_layernorm.weight"], eps)
        m = (_gelu_tanh(h @ g[p + "mlp.gate_proj.weight"].T) * (h @ g[p + "mlp.up_proj.weight"].T)) @ g[
            p + "mlp.down_proj.weight"
        ].T
        x = r + _rms(m, g[p + "post_feedforward_layernorm.weight"], eps)
        x = x * g[p + "layer_scalar"]
    x = _rms(x, g[pre + "norm.weight"], eps)
    logits = x @ emb.T
    cap = t["final_logit_softcapping"]
    return cap * torch.tanh(logits / cap)
