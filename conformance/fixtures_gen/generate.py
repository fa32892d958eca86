"""Generates the golden fixtures in <repo>/fixtures/ (run through run.sh).

For each fixture:
  1. build a tiny random Gemma 4 (`Gemma4ForConditionalGeneration`, vision and audio off) with
     transformers, every parameter and `layer_scalar` random, cast to bf16, save it, load it back
     with `from_pretrained` (as ModelOpt's hf_ptq flow does);
  2. `mtq.quantize` with NVFP4 (calibration: random token batches), `export_hf_checkpoint`;
  3. write the shared tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja);
  4. compute the reference in float32 from the EXPORTED checkpoint (reference_model.py: NVFP4
     dequantized exactly, W4A16, eager attention, bf16-rounded embedding scale): greedy
     continuations of random prompts, the logits of every position, checked against
     `generate()` with its KV cache;
  5. write reference.safetensors / reference.json, then README.md and MANIFEST.json.
Deterministic: fixed seeds, one CPU thread.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import tokenizer_build  # noqa: E402
from reference_model import (  # noqa: E402
    bf16_embed_scale,
    dequant_nvfp4_direct,
    load_dequantized_state_dict,
    load_reference_model,
)
from spec_forward import spec_logits  # noqa: E402

SCRIPT = "conformance/fixtures_gen/generate.py"
SEED = 20260401
GREEDY_TOKENS = 12
MIN_MARGIN = 0.1  # the brief asks for >= 0.05; keep some headroom
STOP_IDS = (1, 106, 50)  # eos ids of generation_config
S, F = "sliding_attention", "full_attention"

# Random-init scales. Chosen so that the logits spread beyond the softcap's linear range, greedy
# continuations are not one repeated token, AND the model is well conditioned: float32 rounding
# noise must stay far below the 1e-3 logit tolerance of the port (checked below against a float64
# forward). q_norm/k_norm weights stay below 1 because attention is unscaled (scaling 1.0): larger
# ones make the softmax so sharp that float32 noise grows to ~1e-3 in the logits. The final norm
# weight is large and the embedding small, so that the tied LM head gives logits up to ~30 while
# the token's own embedding does not dominate the residual stream (which makes greedy repeat it).
INIT = dict(embed_std=0.03, linear_gain=1.0, norm=(0.4, 1.8), qk_norm=(0.25, 0.75), final_norm=(9.0, 18.0))

FIXTURES = [
    {
        "name": "tiny-31b-recipe",
        "about": "31B-like: only the MLP is NVFP4 (attention, embeddings, norms bf16), FP8 KV-cache "
        "scales exported as by NVIDIA's recipe, attention_k_eq_v (no v_proj on full layers), "
        "full layers with their own head_dim and KV heads, proportional RoPE on full layers.",
        "quant": "mlp_only",
        "kv_fp8": True,
        "text": dict(
            hidden_size=112,
            intermediate_size=240,
            num_hidden_layers=8,
            layer_types=[S, S, F, S, S, S, S, F],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            global_head_dim=64,
            num_global_key_value_heads=1,
            attention_k_eq_v=True,
            sliding_window=16,
            final_logit_softcapping=30.0,
        ),
        "init": INIT,
    },
    {
        "name": "tiny-all-nvfp4",
        "about": "Every text linear NVFP4 (q/k/v/o and MLP), attention_k_eq_v false (full layers have "
        "v_proj and use num_key_value_heads), 6 query heads over 3 KV heads, full-layer head_dim 48 "
        "(proportional RoPE rotates 6 of 24 frequency pairs), softcap 20, no KV-cache scales.",
        "quant": "all",
        "kv_fp8": False,
        "text": dict(
            hidden_size=80,
            intermediate_size=176,
            num_hidden_layers=6,
            layer_types=[S, S, F, S, S, F],
            num_attention_heads=6,
            num_key_value_heads=3,
            head_dim=16,
            global_head_dim=48,
            attention_k_eq_v=False,
            sliding_window=24,
            final_logit_softcapping=20.0,
        ),
        "init": INIT,
    },
]

COMMON_TEXT = dict(
    vocab_size=tokenizer_build.VOCAB_SIZE,
    vocab_size_per_layer_input=tokenizer_build.VOCAB_SIZE,
    hidden_size_per_layer_input=0,
    num_kv_shared_layers=0,
    enable_moe_block=False,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh",
    use_bidirectional_attention="vision",
    tie_word_embeddings=True,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=[1, 106],
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    },
)


def versions() -> dict[str, str]:
    import modelopt
    import numpy
    import safetensors
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "nvidia-modelopt": modelopt.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
    }


def make_config(spec: dict):
    from transformers import Gemma4Config

    ids = tokenizer_build.token_ids()
    text = dict(COMMON_TEXT, **spec["text"])
    cfg = Gemma4Config(
        text_config=text,
        vision_config=None,
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
def randomize(model, init: dict, gen: torch.Generator) -> None:
    """Every parameter and every layer_scalar random (float32, before the bf16 cast)."""
    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            # Gaussian rows with a random per-token norm: the tied LM head then gives logits with a
            # wide spread (some beyond the softcap's linear range).
            w = torch.randn(p.shape, generator=gen) * init["embed_std"]
            w *= torch.empty(p.shape[0], 1).uniform_(0.5, 1.7, generator=gen)
            p.copy_(w)
        elif name.endswith("norm.weight"):
            if name.endswith("language_model.norm.weight"):
                lo, hi = init["final_norm"]
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                lo, hi = init["qk_norm"]
            else:
                lo, hi = init["norm"]
            p.copy_(torch.empty(p.shape).uniform_(lo, hi, generator=gen))
        elif p.dim() == 2:
            std = init["linear_gain"] / math.sqrt(p.shape[1])
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        else:
            raise AssertionError(f"unhandled parameter {name} {tuple(p.shape)}")
    n_scalars = 0
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):
            b.copy_(torch.empty(b.shape).uniform_(0.5, 1.5, generator=gen))
            n_scalars += 1
    assert n_scalars == model.config.text_config.num_hidden_layers


def quant_config(spec: dict) -> dict:
    import modelopt.torch.quantization as mtq

    qc = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)  # disables lm_head, embeddings, vision, ... itself
    if spec["quant"] == "mlp_only":
        # NVIDIA's Gemma 4 31B NVFP4 keeps attention in bf16.
        qc["quant_cfg"].append({"quantizer_name": "*self_attn*", "enable": False})
    else:
        assert spec["quant"] == "all"
    if spec["kv_fp8"]:
        qc["quant_cfg"].extend(copy.deepcopy(mtq.FP8_KV_CFG)["quant_cfg"])
    return qc


def build_checkpoint(spec: dict, out_dir: str, seed: int, log: dict) -> None:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import Gemma4ForConditionalGeneration, GenerationConfig

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    config = make_config(spec)
    model = Gemma4ForConditionalGeneration(config).eval()
    assert model.model.vision_tower is None and model.model.audio_tower is None
    assert model.model.embed_vision is None and model.model.embed_audio is None
    randomize(model, spec["init"], gen)
    model = model.to(torch.bfloat16)

    with tempfile.TemporaryDirectory() as raw_dir:
        model.save_pretrained(raw_dir)
        from safetensors.torch import load_file

        raw = load_file(os.path.join(raw_dir, "model.safetensors"))
        model = Gemma4ForConditionalGeneration.from_pretrained(raw_dir, dtype=torch.bfloat16).eval()

    model.generation_config = GenerationConfig(
        bos_token_id=2,
        pad_token_id=0,
        eos_token_id=list(STOP_IDS),
        do_sample=True,
        temperature=1.0,
        top_k=64,
        top_p=0.95,
    )

    vocab = config.text_config.vocab_size
    calib_gen = torch.Generator().manual_seed(seed + 1)
    calib = [
        torch.randint(tokenizer_build.FIRST_NORMAL_ID, vocab, (2, 48), generator=calib_gen) for _ in range(4)
    ]
    for b in calib:
        b[:, 0] = 2

    def forward_loop(m):
        with torch.no_grad():
            for b in calib:
                m(input_ids=b)

    model = mtq.quantize(model, quant_config(spec), forward_loop=forward_loop)
    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out_dir)

    # The exported bf16 tensors are exactly the random ones; NVFP4 ones approximate them.
    from safetensors import safe_open

    n_nvfp4 = 0
    with safe_open(os.path.join(out_dir, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for k, v in raw.items():
            if k == "lm_head.weight":
                continue
            assert k in keys, f"{k} missing from export"
            e = f.get_tensor(k)
            if e.dtype == torch.uint8:
                base = k[: -len(".weight")]
                w = dequant_nvfp4_direct(e, f.get_tensor(base + ".weight_scale"), f.get_tensor(base + ".weight_scale_2"))
                rel = float((w - v.float()).norm() / v.float().norm())
                assert rel < 0.15, (k, rel)  # NVFP4 round-to-nearest error of a Gaussian matrix is ~0.1
                n_nvfp4 += 1
                continue
            assert e.dtype == torch.bfloat16 and torch.equal(e, v), k
        assert "lm_head.weight" not in keys
    log["nvfp4_weights"] = n_nvfp4

    # config.json is as transformers writes it: the full-layer overrides live in per_layer_config.
    with open(os.path.join(out_dir, "config.json")) as fh:
        t = json.load(fh)["text_config"]
    full = [i for i, x in enumerate(t["layer_types"]) if x == "full_attention"]
    expect = {"head_dim": spec["text"]["global_head_dim"]}
    if spec["text"]["attention_k_eq_v"]:
        expect["num_key_value_heads"] = spec["text"]["num_global_key_value_heads"]
    assert t["per_layer_config"] == {str(i): expect for i in full}, t["per_layer_config"]
    assert "global_head_dim" not in t and "num_global_key_value_heads" not in t


def write_tokenizer(out_dir: str) -> None:
    tok = tokenizer_build.build_tokenizer()
    tok.save(os.path.join(out_dir, "tokenizer.json"), pretty=True)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as fh:
        json.dump(tokenizer_build.TOKENIZER_CONFIG, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    shutil.copyfile(os.path.join(HERE, "chat_template.jinja"), os.path.join(out_dir, "chat_template.jinja"))


def check_tokenizer(out_dir: str) -> dict:
    """transformers' fast tokenizer and a plain `tokenizers` load agree; the template renders."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ht = AutoTokenizer.from_pretrained(out_dir)
    raw = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    assert len(ht) == raw.get_vocab_size() == tokenizer_build.VOCAB_SIZE
    for i, t in tokenizer_build.SPECIAL_TOKENS.items():
        assert ht.convert_tokens_to_ids(t) == i and raw.token_to_id(t) == i
        assert ht.encode(t, add_special_tokens=False) == [i], t
    texts = [
        "Hello world",
        "  two  spaces ",
        "a\n\nb\tc",
        "héllo wörld ✓ 日本",
        '<|turn>user\nhi<turn|>\n<|"|>x<|"|>',
        "What is the weather in Paris?",
        "<bos><eos><pad><mask><unk><|think|><|channel>thought\n<channel|>",
    ]
    for s in texts:
        a = ht.encode(s)
        b = raw.encode(s).ids
        assert a == b, (s, a, b)
        assert a[0] == 2
        assert ht.decode(a[1:]) == raw.decode(b[1:], skip_special_tokens=False) == s, s
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Get the weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "description": "City"}, "days": {"type": "integer"}},
                    "required": ["city"],
                },
            },
        }
    ]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "n": 1}}}
    convs = {
        "simple": dict(conversation=[{"role": "user", "content": "Hello"}], add_generation_prompt=True),
        "thinking": dict(
            conversation=[
                {"role": "system", "content": "Be concise."},
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi there"},
                {"role": "user", "content": "Bye"},
            ],
            add_generation_prompt=True,
            enable_thinking=True,
        ),
        "tools": dict(
            conversation=[
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [call],
                    "tool_responses": [{"name": "get_weather", "response": "sunny"}],
                },
            ],
            tools=tools,
            add_generation_prompt=True,
        ),
        # Like Google's template, the fixture template ignores role: "tool" messages.
        "tool_message_ignored": dict(
            conversation=[
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "sunny"},
            ],
            add_generation_prompt=True,
        ),
        "image": dict(
            conversation=[
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}
            ],
            add_generation_prompt=True,
        ),
    }
    expected = {
        "simple": "<bos><|turn>user\nHello<turn|>\n<|turn>model\n<|channel>thought\n<channel|>",
        "thinking": "<bos><|turn>system\n<|think|>\nBe concise.<turn|>\n<|turn>user\nHello<turn|>\n"
        "<|turn>model\nHi there<turn|>\n<|turn>user\nBye<turn|>\n<|turn>model\n",
        "tools": "<bos><|turn>system\n<|tool>declaration:get_weather{description:<|\"|>Get the weather<|\"|>,"
        "parameters:{properties:{city:{description:<|\"|>City<|\"|>,type:<|\"|>STRING<|\"|>},"
        "days:{type:<|\"|>INTEGER<|\"|>}},required:[<|\"|>city<|\"|>],type:<|\"|>OBJECT<|\"|>}}<tool|>"
        "<turn|>\n<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n"
        "<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>,n:1}<tool_call|>"
        "<|tool_response>response:get_weather{value:<|\"|>sunny<|\"|>}<tool_response|>"
        "<|channel>thought\n<channel|>",
        "tool_message_ignored": "<bos><|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n"
        "<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>,n:1}<tool_call|><|channel>thought\n<channel|>",
        "image": "<bos><|turn>user\n<|image|>Describe this image.<turn|>\n<|turn>model\n<|channel>thought\n<channel|>",
    }
    rendered = {}
    for k, c in convs.items():
        s = ht.apply_chat_template(tokenize=False, **c)
        assert s == expected[k], (k, s)
        ids = ht.apply_chat_template(tokenize=True, return_dict=False, **c)
        assert list(ids) == raw.encode(s, add_special_tokens=False).ids, k
        rendered[k] = s
    return rendered


def greedy_argmax(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            t = int(torch.argmax(logits))
            out.append(t)
            ids.append(t)
    return out


def greedy_generate(model, prompt: list[int], n: int) -> list[int]:
    from transformers import GenerationConfig

    gc = GenerationConfig(
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=0,
        num_beams=1,
        use_cache=True,
        bos_token_id=2,
        pad_token_id=0,
        eos_token_id=list(STOP_IDS),
    )
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), generation_config=gc
        )
    return out[0, len(prompt) :].tolist()


def run_case(model, prompt: list[int]) -> dict:
    greedy = greedy_argmax(model, prompt, GREEDY_TOKENS)
    seq = prompt + greedy
    raw_logits = {}

    def hook(_m, _i, o):
        raw_logits["x"] = o.detach()

    h = model.lm_head.register_forward_hook(hook)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0].float()
    h.remove()
    raw = raw_logits["x"][0]
    p = len(prompt)
    steps = logits[p - 1 : p - 1 + GREEDY_TOKENS]
    top2 = torch.topk(steps, 2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    assert torch.argmax(steps, dim=-1).tolist() == greedy, "full-sequence argmax != greedy loop"
    return {
        "greedy": greedy,
        "logits": logits.contiguous(),
        "min_margin": min(margins),
        "max_abs_logit": float(logits.abs().max()),
        "max_abs_raw_logit": float(raw.abs().max()),
    }


def make_cases(model, spec: dict, seed: int) -> list[dict]:
    w = spec["text"]["sliding_window"]
    vocab = model.config.get_text_config().vocab_size
    lengths = {"short": 5, "medium": int(round(2.5 * w)), "long": 5 * w}
    # Greedy tokens must not be a stop id or pad, nor a multimodal placeholder: transformers feeds the
    # pad embedding for <|image|>/<|audio|>/<|video|> ids in the text (Gemma4Model.forward), which a
    # text-only engine need not copy.
    c = model.config
    avoid = set(STOP_IDS) | {0, c.image_token_id, c.audio_token_id, c.video_token_id}
    cases = []
    for ci, (cname, plen) in enumerate(lengths.items()):
        for attempt in range(200):
            g = torch.Generator().manual_seed(seed * 1000 + ci * 100 + attempt)
            prompt = [2] + torch.randint(tokenizer_build.FIRST_NORMAL_ID, vocab, (plen - 1,), generator=g).tolist()
            r = run_case(model, prompt)
            ok = r["min_margin"] >= MIN_MARGIN and not any(t in avoid for t in r["greedy"])
            print(
                f"  {spec['name']}/{cname} P={plen} attempt {attempt}: min margin {r['min_margin']:.4f}, "
                f"max|logit| {r['max_abs_logit']:.3f} (before softcap {r['max_abs_raw_logit']:.3f}), "
                f"greedy {r['greedy']}{'' if ok else '  -> rejected'}"
            )
            if ok:
                break
        else:
            raise RuntimeError(f"no prompt with margin >= {MIN_MARGIN} for {spec['name']}/{cname}")
        gen_ids = greedy_generate(model, prompt, GREEDY_TOKENS)
        assert gen_ids == r["greedy"], (cname, gen_ids, r["greedy"])
        r.update(name=cname, prompt=prompt, prompt_seed_attempt=attempt)
        cases.append(r)
    return cases


def summarize_config(cfg: dict) -> dict:
    t = cfg["text_config"]
    full = [i for i, x in enumerate(t["layer_types"]) if x == "full_attention"]
    plc = {int(k): v for k, v in t.get("per_layer_config", {}).items()}
    f0 = plc.get(full[0], {})
    return {
        "layers": t["num_hidden_layers"],
        "layer_types": "".join("F" if x == "full_attention" else "S" for x in t["layer_types"]),
        "hidden": t["hidden_size"],
        "intermediate": t["intermediate_size"],
        "q_heads": t["num_attention_heads"],
        "kv_heads_sliding": t["num_key_value_heads"],
        "kv_heads_full": f0.get("num_key_value_heads", t["num_key_value_heads"]),
        "head_dim_sliding": t["head_dim"],
        "head_dim_full": f0.get("head_dim", t["head_dim"]),
        "attention_k_eq_v": t["attention_k_eq_v"],
        "sliding_window": t["sliding_window"],
        "vocab": t["vocab_size"],
        "final_logit_softcapping": t["final_logit_softcapping"],
    }


def generate_fixture(spec: dict, seed: int, fixtures_dir: str, vers: dict) -> dict:
    from safetensors.torch import save_file

    out_dir = os.path.join(fixtures_dir, spec["name"])
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    print(f"== {spec['name']}: building, quantizing, exporting")
    log: dict = {}
    build_checkpoint(spec, out_dir, seed, log)
    write_tokenizer(out_dir)
    check_tokenizer(out_dir)

    print(f"== {spec['name']}: reference (float32, W4A16) from the exported checkpoint")
    stats: dict = {}
    model = load_reference_model(out_dir, stats)
    with open(os.path.join(out_dir, "config.json")) as fh:
        cfg = json.load(fh)
    hidden = cfg["text_config"]["hidden_size"]
    assert stats["embed_scale"] == bf16_embed_scale(hidden)
    print(
        f"  NVFP4 linears: {len(stats['nvfp4_linears'])}; modelopt vs direct dequant: "
        f"{stats['dequant_elements_modelopt_ne_direct']} of {stats['dequant_elements']} elements differ, "
        f"max rel diff {stats['dequant_max_rel_diff']:.3g}; embed_scale {stats['embed_scale']} "
        f"(sqrt({hidden}) = {math.sqrt(hidden):.6f})"
    )
    cases = make_cases(model, spec, seed)
    # Cross-checks: an independent float64 forward written from the spec, and the reference with the
    # direct (single-rounding) NVFP4 dequantization instead of ModelOpt's.
    sd_mo = load_dequantized_state_dict(out_dir)
    sd_direct = load_dequantized_state_dict(out_dir, use_direct=True)
    for c in cases:
        seq = c["prompt"] + c["greedy"]
        ref = c["logits"].double()
        spec64 = spec_logits(sd_mo, cfg, seq)
        c["spec_f64_max_diff"] = float((spec64 - ref).abs().max())
        c["spec_f32_max_diff"] = float((spec_logits(sd_mo, cfg, seq, torch.float32).double() - ref).abs().max())
        c["direct_dequant_max_diff"] = float((spec_logits(sd_direct, cfg, seq) - spec64).abs().max())
        print(
            f"  case {c['name']}: max|reference - spec forward| f64 {c['spec_f64_max_diff']:.2e}, "
            f"f32 {c['spec_f32_max_diff']:.2e}; effect of direct vs modelopt dequant on logits "
            f"{c['direct_dequant_max_diff']:.2e}"
        )
        assert c["spec_f64_max_diff"] < 2e-4 and c["spec_f32_max_diff"] < 2e-4, c
    max_raw = max(c["max_abs_raw_logit"] for c in cases)
    assert max_raw > 15.0, f"logits too small for the softcap to matter: {max_raw}"
    for c in cases:
        print(
            f"  case {c['name']}: P={len(c['prompt'])} G={len(c['greedy'])} max|logit| {c['max_abs_logit']:.3f} "
            f"(raw {c['max_abs_raw_logit']:.3f}) min margin {c['min_margin']:.4f}"
        )

    save_file(
        {f"{c['name']}.logits": c["logits"] for c in cases},
        os.path.join(out_dir, "reference.safetensors"),
        metadata={"format": "pt"},
    )
    ref = {
        "generator": {
            "script": SCRIPT,
            "command": "bash conformance/fixtures_gen/run.sh",
            "versions": vers,
            "seed": seed,
            "reference_dtype": "float32",
            "activations": "unquantized (W4A16)",
            "weights": "NVFP4 linears dequantized exactly (E2M1 * E4M3 block scale * weight_scale_2, "
            "modelopt NVFP4QTensor.dequantize); bf16 tensors upcast to float32",
            "attn_implementation": "eager",
            "embed_scale": stats["embed_scale"],
            "embed_scale_note": f"sqrt(hidden_size={hidden}) rounded to bf16, as the bf16 deployment computes it",
            "logits": "after final_logit_softcapping (the model's output logits), one forward pass over "
            "prompt_ids + greedy_ids, shape [P+G, vocab]",
            "greedy": f"argmax, {GREEDY_TOKENS} tokens, no eos stop; equal to transformers generate() "
            "(do_sample=False, KV cache)",
            "checks": "check_max_abs_diff_vs_spec_forward_*: max |logit difference| between this reference and "
            "an independent forward pass written from the spec (conformance/fixtures_gen/spec_forward.py) in "
            "float64 and in float32: the float32 rounding noise a correct port should expect",
            "nvfp4_dequant": f"modelopt and direct dequantization differ by one float32 rounding in "
            f"{stats['dequant_elements_modelopt_ne_direct']} of {stats['dequant_elements']} weights "
            f"(modelopt rounds weight_scale*weight_scale_2 first); effect on logits <= "
            f"{max(c['direct_dequant_max_diff'] for c in cases):.1e}",
        },
        "cases": [
            {
                "name": c["name"],
                "prompt_ids": c["prompt"],
                "greedy_ids": c["greedy"],
                "min_greedy_margin": round(c["min_margin"], 6),
                "max_abs_logit": round(c["max_abs_logit"], 6),
                "max_abs_logit_before_softcap": round(c["max_abs_raw_logit"], 6),
                "logits_tensor": f"{c['name']}.logits",
                "check_max_abs_diff_vs_spec_forward_f64": float(f"{c['spec_f64_max_diff']:.3g}"),
                "check_max_abs_diff_vs_spec_forward_f32": float(f"{c['spec_f32_max_diff']:.3g}"),
            }
            for c in cases
        ],
    }
    dump_json(ref, os.path.join(out_dir, "reference.json"))
    return {
        "name": spec["name"],
        "about": spec["about"],
        "config": summarize_config(cfg),
        "nvfp4_linears": len(stats["nvfp4_linears"]),
        "kv_cache_quant_algo": json.load(open(os.path.join(out_dir, "hf_quant_config.json")))["quantization"][
            "kv_cache_quant_algo"
        ],
        "cases": [
            {
                "name": c["name"],
                "P": len(c["prompt"]),
                "greedy": c["greedy"],
                "min_margin": round(c["min_margin"], 4),
                "max_abs_logit": round(c["max_abs_logit"], 2),
                "max_abs_raw_logit": round(c["max_abs_raw_logit"], 2),
                "spec_f64": c["spec_f64_max_diff"],
                "spec_f32": c["spec_f32_max_diff"],
            }
            for c in cases
        ],
        "embed_scale": stats["embed_scale"],
        "dequant_ne": (stats["dequant_elements_modelopt_ne_direct"], stats["dequant_elements"]),
    }


def dump_json(obj, path: str) -> None:
    """indent=2 JSON with lists of numbers kept on one line."""
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    text = re.sub(r"\[\s*([-0-9.eE,\s]+?)\s*\]", lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    with open(path, "w") as fh:
        fh.write(text + "\n")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(fixtures_dir: str, summaries: list[dict], vers: dict) -> None:
    fixtures = []
    for s in summaries:
        d = os.path.join(fixtures_dir, s["name"])
        files = []
        for fn in sorted(os.listdir(d)):
            p = os.path.join(d, fn)
            files.append({"file": fn, "bytes": os.path.getsize(p), "sha256": sha256(p)})
        fixtures.append({"name": s["name"], "config": s["config"], "files": files,
                         "total_bytes": sum(f["bytes"] for f in files)})
    manifest = {"generator": SCRIPT, "command": "bash conformance/fixtures_gen/run.sh", "versions": vers,
                "fixtures": fixtures}
    dump_json(manifest, os.path.join(fixtures_dir, "MANIFEST.json"))


def write_readme(fixtures_dir: str, summaries: list[dict], vers: dict) -> None:
    ids = tokenizer_build.token_ids()
    i = INIT
    lines = [
        "# Golden fixtures: tiny Gemma 4 NVFP4 checkpoints",
        "",
        "Generated by `conformance/fixtures_gen/generate.py`; do not edit by hand. Regenerate with",
        "",
        "```",
        "bash conformance/fixtures_gen/run.sh",
        "```",
        "",
        "It creates `conformance/fixtures_gen/.venv` (unless `FIXTURES_VENV` points at an existing venv),",
        "pip-installs `conformance/fixtures_gen/requirements.txt` (exact pins) and rewrites `fixtures/`. CPU",
        "only, one thread, about a minute after the install; the output is bit-for-bit reproducible.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".",
        "",
        "## Fixtures",
        "",
        "| fixture | layers | layer types | hidden | MLP | q heads | KV heads sliding / full | head dim sliding / full "
        "| k_eq_v | window | vocab | softcap | NVFP4 linears | KV-cache quant |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        c = s["config"]
        lines.append(
            f"| `{s['name']}` | {c['layers']} | {c['layer_types']} | {c['hidden']} | {c['intermediate']} | "
            f"{c['q_heads']} | {c['kv_heads_sliding']} / {c['kv_heads_full']} | {c['head_dim_sliding']} / "
            f"{c['head_dim_full']} | {str(c['attention_k_eq_v']).lower()} | {c['sliding_window']} | {c['vocab']} | "
            f"{c['final_logit_softcapping']} | {s['nvfp4_linears']} | {s['kv_cache_quant_algo'] or 'none'} |"
        )
    lines += [""]
    for s in summaries:
        lines += [f"- `{s['name']}`: {s['about']}"]
    lines += [
        "",
        "S = sliding_attention, F = full_attention. Common to all: RoPE default theta 1e4 on sliding layers,",
        "proportional theta 1e6 partial 0.25 on full layers; rms eps 1e-6; gelu-tanh; tied embeddings (no",
        "`lm_head.weight`); `hidden_size_per_layer_input` 0; no MoE; no KV sharing;",
        "`use_bidirectional_attention: \"vision\"`; vision and audio off (`vision_config` / `audio_config` null,",
        "no vision or audio tensors); eos ids `[1, 106]` in config.json and `[1, 106, 50]` in",
        "generation_config.json (temperature 1.0, top_k 64, top_p 0.95, do_sample true). config.json is as",
        "transformers 5.23 writes it: the full-layer head_dim / KV heads are in `text_config.per_layer_config`",
        "(no `global_head_dim` / `num_global_key_value_heads` keys).",
        "",
        "## Files of each fixture",
        "",
        "- `config.json`, `hf_quant_config.json`, `generation_config.json`, `model.safetensors`: written by",
        "  ModelOpt's `export_hf_checkpoint` (plus ModelOpt's `quantization_config` in config.json). NVFP4",
        "  linear `X`: `X.weight` U8 [out, in/2], `X.weight_scale` F8_E4M3 [out, in/16], `X.weight_scale_2`",
        "  F32 [], `X.input_scale` F32 []; everything else bf16, including `layers.{i}.layer_scalar` [1].",
        "  ModelOpt gives linears that share their input one `weight_scale_2` and one `input_scale`",
        "  (gate_proj = up_proj; q_proj = k_proj = v_proj). With the FP8 KV-cache recipe it also writes",
        "  `self_attn.k_proj.k_scale` and `self_attn.v_proj.v_scale` (F32 []) on every layer, also on the full",
        "  layers of a k_eq_v model, which have no `v_proj.weight`. The reference ignores input_scale and the",
        "  KV scales (W4A16, unquantized KV cache).",
        "- `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`: the shared tokenizer (below).",
        "- `reference.safetensors`: `<case>.logits` F32 [P+G, vocab]: the output logits (after the softcap)",
        "  at every position of one forward pass over `prompt_ids + greedy_ids`.",
        "- `reference.json`: generator info and the cases: `prompt_ids` (bos 2 + random ids >= 107, i.e.",
        "  newline, bytes, characters and merges; lengths 5, 2.5x and 5x the sliding window), `greedy_ids`",
        "  (12 argmax tokens, no eos stop), `min_greedy_margin` (smallest top1 - top2 logit gap over the",
        "  greedy steps), and the checks below.",
        "",
        "## Cases",
        "",
        "| fixture | case | P | G | min greedy margin | max abs logit (before softcap) | max abs diff vs spec forward f64 / f32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        for c in s["cases"]:
            lines.append(
                f"| `{s['name']}` | {c['name']} | {c['P']} | {len(c['greedy'])} | {c['min_margin']} | "
                f"{c['max_abs_logit']} ({c['max_abs_raw_logit']}) | {c['spec_f64']:.1e} / {c['spec_f32']:.1e} |"
            )
    lines += [
        "",
        "## How they were made",
        "",
        "1. transformers builds `Gemma4ForConditionalGeneration` from the config and every parameter is set",
        f"   at random: linears N(0, 1/in); embedding rows N(0, {i['embed_std']}^2) times a per-row factor",
        f"   U(0.5, 1.7); layer norms U{i['norm']}; q_norm / k_norm U{i['qk_norm']}; the final norm",
        f"   U{i['final_norm']}; every `layer_scalar` U(0.5, 1.5). The model is cast to bf16, saved and loaded",
        "   back with `from_pretrained`. (The scales keep the model well conditioned: attention is unscaled,",
        "   so q/k norm weights around 1 make softmax so sharp that float32 noise reaches ~1e-3 in the",
        "   logits; the large final norm with small embeddings spreads the logits past the softcap's linear",
        "   range without letting each token's own embedding dominate the greedy choice.)",
        "2. ModelOpt `mtq.quantize` with `NVFP4_DEFAULT_CFG` (for `tiny-31b-recipe` with `*self_attn*`",
        "   disabled, as NVIDIA's 31B, and `FP8_KV_CFG` added), calibrated on 4 batches of 2x48 random",
        "   tokens, then `export_hf_checkpoint`. The exported bf16 tensors are asserted equal to the random",
        "   ones.",
        "3. The reference is computed from the exported files only (`reference_model.py`): NVFP4 weights",
        "   dequantized with ModelOpt's `NVFP4QTensor.dequantize`, asserted equal up to one float32 rounding",
        "   to a direct E2M1 x E4M3 x weight_scale_2 implementation (ModelOpt multiplies weight_scale by",
        "   weight_scale_2 first and so rounds twice for ~5-10% of the weights; effect on logits < 1e-5);",
        "   bf16 tensors upcast; a float32 eager-attention model; activations not quantized (W4A16); the",
        "   embedding scale set to sqrt(hidden) rounded to bf16, as the bf16 deployment has it",
        "   (" + ", ".join(f"`{s['name']}`: {s['embed_scale']}" for s in summaries) + ").",
        "4. Checks: greedy continuations equal transformers `generate()` with its KV cache; the full-sequence",
        "   logits agree with an independent forward pass written from the spec (`spec_forward.py`) in",
        "   float64 and float32 to < 2e-4 (table above: the float32 noise level a correct port should",
        "   expect); tokenizer: transformers and `tokenizers` encode identically, and the chat template",
        "   renders the expected strings. A prompt is re-drawn (deterministically) when its greedy margin is",
        f"   below {MIN_MARGIN} or its greedy tokens contain pad, a stop id (1, 106, 50) or a multimodal",
        "   placeholder (`<|image|>`, `<|audio|>`, `<|video|>`: transformers feeds the pad embedding for",
        "   those ids in text, which a text-only engine need not copy).",
        "",
        "## Tokenizer (shared by all fixtures)",
        "",
        f"BPE with byte fallback, {tokenizer_build.VOCAB_SIZE} tokens: the normalizer replaces spaces with `▁`",
        "(no prefix space, no pre-tokenizer split), byte tokens `<0x00>`..`<0xFF>`, single characters and",
        "merges learned from a small corpus. The same pipeline as transformers' `GemmaTokenizer`; it encodes",
        "identically with `tokenizers` (also checked with the Rust crate 0.22) and with transformers.",
        "Encoding with special tokens prepends `<bos>`. Special (added) tokens:",
        "",
        "| token | id | token | id |",
        "|---|---|---|---|",
    ]
    items = sorted(ids.items(), key=lambda kv: kv[1])
    half = (len(items) + 1) // 2
    for (a, ia), (b, ib) in zip(items[:half], items[half:] + [("", "")]):
        fa = f"`{a}`"
        fb = f"`{b}`" if b else ""
        lines.append(f"| {fa} | {ia} | {fb} | {ib} |")
    lines += [
        "",
        "Ids 16-47, 51-97, 99, 102-104 are plain `<unusedN>` vocabulary entries; `\\n` is 107; the byte",
        "tokens are 108-363. config.json uses image_token_id 6, boi 5, eoi 7, audio_token_id 9, boa 8, eoa 10,",
        "video_token_id 11. The chat template (`conformance/fixtures_gen/chat_template.jinja`, after spec",
        "section 5) renders `<bos><|turn>ROLE\\n...<turn|>\\n` with `model` for the assistant, `<|think|>\\n` at",
        "the top of the system turn when `enable_thinking`, the empty `<|channel>thought\\n<channel|>` at the",
        "end of the generation prompt when thinking is off, tool declarations",
        "`<|tool>declaration:NAME{description:...,parameters:{...}}<tool|>` in the system turn, calls",
        "`<|tool_call>call:NAME{key:<|\"|>text<|\"|>,n:1}<tool_call|>` and results",
        "`<|tool_response>response:NAME{...}<tool_response|>` inside the model turn (strings between `<|\"|>`,",
        "other values bare, keys sorted), and `<|image|>` / `<|audio|>` / `<|video|>` for media parts.",
        "",
        "`tiny-vision` (the 31B text recipe plus a 2-layer vision tower, test images, and the reference's pixel",
        "values, soft tokens and multimodal logits and greedy outputs) is written by",
        "`conformance/fixtures_gen/generate_vision.py`, which `run.sh` also runs; its own `tiny-vision/README.md`",
        "and `tiny-vision/MANIFEST.json` describe it.",
        "",
    ]
    with open(os.path.join(fixtures_dir, "README.md"), "w") as fh:
        fh.write("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(REPO, "fixtures"))
    ap.add_argument("--only", nargs="*", help="fixture names (default: all)")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    vers = versions()
    print("versions:", vers)
    os.makedirs(args.out, exist_ok=True)
    summaries = []
    for i, spec in enumerate(FIXTURES):
        if args.only and spec["name"] not in args.only:
            continue
        summaries.append(generate_fixture(spec, SEED + 17 * i, args.out, vers))
    if not args.only:
        write_manifest(args.out, summaries, vers)
        write_readme(args.out, summaries, vers)
    for s in summaries:
        print(json.dumps(s))


if __name__ == "__main__":
    main()
