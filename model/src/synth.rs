//! `gemma4 synth`: a checkpoint with the real Gemma 4 tensor names, shapes, dtypes and NVFP4
//! layout (ModelOpt's, as NVIDIA's 31B recipe: MLP NVFP4, attention/embeddings/norms bf16) and
//! random values. Speed does not depend on the values, and the real weights cannot be downloaded
//! here, so benchmarks run on these. Shards of at most `shard_bytes` with an index, like the real
//! checkpoint; one shard is held in memory at a time.

use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

use crate::error::SynthError;
use crate::generation::Rng;

/// Shape numbers of a preset.
#[derive(Debug, Clone)]
pub struct Preset {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub global_kv_heads: usize,
    pub head_dim: usize,
    pub global_head_dim: usize,
    pub vocab: usize,
    pub sliding_window: usize,
    pub max_positions: usize,
    pub vision: VisionPreset,
}

/// Shape numbers of the vision tower (bf16, excluded from NVFP4 as in NVIDIA's recipe).
#[derive(Debug, Clone)]
pub struct VisionPreset {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub position_embedding_size: usize,
}

/// The 31B's vision tower (google/gemma-4-31B-it `vision_config`).
const VISION_31B: VisionPreset = VisionPreset {
    hidden: 1152,
    intermediate: 4304,
    layers: 27,
    heads: 16,
    head_dim: 72,
    position_embedding_size: 10_240,
};
const VISION_SMALL: VisionPreset = VisionPreset {
    hidden: 64,
    intermediate: 144,
    layers: 2,
    heads: 4,
    head_dim: 16,
    position_embedding_size: 1024,
};

pub fn preset(name: &str) -> Result<Preset, SynthError> {
    Ok(match name {
        // google/gemma-4-31B-it: fixtures/31b-config/config.json.
        "31b" => Preset {
            hidden: 5376,
            intermediate: 21504,
            layers: 60,
            heads: 32,
            kv_heads: 16,
            global_kv_heads: 4,
            head_dim: 256,
            global_head_dim: 512,
            vocab: 262_144,
            sliding_window: 1024,
            max_positions: 262_144,
            vision: VISION_31B,
        },
        // Same layer shapes as the 31B, 6 layers and a small vocabulary: a quick GPU run.
        "31b-6l" => Preset {
            layers: 6,
            vocab: 32_768,
            ..preset("31b")?
        },
        // The 31B's widths and its whole 262,144-token vocabulary, two layers (one sliding, one
        // full): the engine at the real vocabulary on a machine that cannot hold 60 layers.
        "31b-2l" => Preset {
            layers: 2,
            ..preset("31b")?
        },
        "small" => Preset {
            hidden: 1024,
            intermediate: 4096,
            layers: 6,
            heads: 8,
            kv_heads: 4,
            global_kv_heads: 2,
            head_dim: 128,
            global_head_dim: 256,
            vocab: 32_768,
            sliding_window: 512,
            max_positions: 32_768,
            vision: VISION_SMALL,
        },
        "tiny" => Preset {
            hidden: 128,
            intermediate: 256,
            layers: 6,
            heads: 4,
            kv_heads: 2,
            global_kv_heads: 1,
            head_dim: 32,
            global_head_dim: 64,
            vocab: 512,
            sliding_window: 16,
            max_positions: 4096,
            vision: VISION_SMALL,
        },
        other => return Err(SynthError::UnknownPreset(other.to_string())),
    })
}

/// One tensor to write: name, dtype, shape; values are generated when its shard is written.
struct Spec {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    fill: Fill,
}

#[derive(Clone, Copy)]
enum Fill {
    /// bf16 normal-ish values with this std.
    Bf16(f32),
    /// bf16 constant.
    Bf16Const(f32),
    /// Random bytes (E2M1 code pairs).
    Bytes,
    /// E4M3 block scales around 1.0 (exponent 6..8).
    E4m3,
    F32Const(f32),
}

impl Spec {
    fn bytes(&self) -> usize {
        let n: usize = self.shape.iter().product::<usize>().max(1);
        n * match self.dtype {
            Dtype::BF16 => 2,
            Dtype::F32 => 4,
            _ => 1,
        }
    }
}

fn layer_types(p: &Preset) -> Vec<&'static str> {
    (0..p.layers)
        .map(|i| {
            if (i + 1) % 6 == 0 || i + 1 == p.layers {
                "full_attention"
            } else {
                "sliding_attention"
            }
        })
        .collect()
}

fn specs(p: &Preset) -> Vec<Spec> {
    let mut v = vec![];
    let bf16 = |name: String, shape: Vec<usize>, fill: Fill| Spec {
        name,
        dtype: Dtype::BF16,
        shape,
        fill,
    };
    let pre = "model.language_model";
    v.push(bf16(
        format!("{pre}.embed_tokens.weight"),
        vec![p.vocab, p.hidden],
        Fill::Bf16(0.03),
    ));
    v.push(bf16(
        format!("{pre}.norm.weight"),
        vec![p.hidden],
        Fill::Bf16Const(1.0),
    ));
    let std = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    for (i, kind) in layer_types(p).iter().enumerate() {
        let l = format!("{pre}.layers.{i}");
        let full = *kind == "full_attention";
        let (hd, kv) = if full {
            (p.global_head_dim, p.global_kv_heads)
        } else {
            (p.head_dim, p.kv_heads)
        };
        let a = format!("{l}.self_attn");
        v.push(bf16(
            format!("{a}.q_proj.weight"),
            vec![p.heads * hd, p.hidden],
            Fill::Bf16(std(p.hidden)),
        ));
        v.push(bf16(
            format!("{a}.k_proj.weight"),
            vec![kv * hd, p.hidden],
            Fill::Bf16(std(p.hidden)),
        ));
        if !full {
            v.push(bf16(
                format!("{a}.v_proj.weight"),
                vec![kv * hd, p.hidden],
                Fill::Bf16(std(p.hidden)),
            ));
        }
        v.push(bf16(
            format!("{a}.o_proj.weight"),
            vec![p.hidden, p.heads * hd],
            Fill::Bf16(std(p.heads * hd)),
        ));
        v.push(bf16(
            format!("{a}.q_norm.weight"),
            vec![hd],
            Fill::Bf16Const(1.0),
        ));
        v.push(bf16(
            format!("{a}.k_norm.weight"),
            vec![hd],
            Fill::Bf16Const(1.0),
        ));
        for (proj, out, inp) in [
            ("gate_proj", p.intermediate, p.hidden),
            ("up_proj", p.intermediate, p.hidden),
            ("down_proj", p.hidden, p.intermediate),
        ] {
            let m = format!("{l}.mlp.{proj}");
            v.push(Spec {
                name: format!("{m}.weight"),
                dtype: Dtype::U8,
                shape: vec![out, inp / 2],
                fill: Fill::Bytes,
            });
            v.push(Spec {
                name: format!("{m}.weight_scale"),
                dtype: Dtype::F8_E4M3,
                shape: vec![out, inp / 16],
                fill: Fill::E4m3,
            });
            // Global scale so that |w| ~ 6 · 1 · g ≈ 1/sqrt(fan_in).
            v.push(Spec {
                name: format!("{m}.weight_scale_2"),
                dtype: Dtype::F32,
                shape: vec![],
                fill: Fill::F32Const(std(inp) / 3.0),
            });
            v.push(Spec {
                name: format!("{m}.input_scale"),
                dtype: Dtype::F32,
                shape: vec![],
                fill: Fill::F32Const(1.0),
            });
        }
        for n in [
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ] {
            v.push(bf16(
                format!("{l}.{n}.weight"),
                vec![p.hidden],
                Fill::Bf16Const(1.0),
            ));
        }
        v.push(bf16(
            format!("{l}.layer_scalar"),
            vec![1],
            Fill::Bf16Const(1.0),
        ));
    }
    let vp = &p.vision;
    let t = "model.vision_tower";
    v.push(bf16(
        format!("{t}.patch_embedder.input_proj.weight"),
        vec![vp.hidden, 3 * 16 * 16],
        Fill::Bf16(std(768)),
    ));
    v.push(bf16(
        format!("{t}.patch_embedder.position_embedding_table"),
        vec![2, vp.position_embedding_size, vp.hidden],
        Fill::Bf16(0.02),
    ));
    for i in 0..vp.layers {
        let l = format!("{t}.encoder.layers.{i}");
        let inner = vp.heads * vp.head_dim;
        for (proj, out, inp) in [
            ("self_attn.q_proj", inner, vp.hidden),
            ("self_attn.k_proj", inner, vp.hidden),
            ("self_attn.v_proj", inner, vp.hidden),
            ("self_attn.o_proj", vp.hidden, inner),
            ("mlp.gate_proj", vp.intermediate, vp.hidden),
            ("mlp.up_proj", vp.intermediate, vp.hidden),
            ("mlp.down_proj", vp.hidden, vp.intermediate),
        ] {
            v.push(bf16(
                format!("{l}.{proj}.linear.weight"),
                vec![out, inp],
                Fill::Bf16(std(inp)),
            ));
        }
        v.push(bf16(
            format!("{l}.self_attn.q_norm.weight"),
            vec![vp.head_dim],
            Fill::Bf16Const(1.0),
        ));
        v.push(bf16(
            format!("{l}.self_attn.k_norm.weight"),
            vec![vp.head_dim],
            Fill::Bf16Const(1.0),
        ));
        for n in [
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ] {
            v.push(bf16(
                format!("{l}.{n}.weight"),
                vec![vp.hidden],
                Fill::Bf16Const(1.0),
            ));
        }
    }
    v.push(bf16(
        format!("{t}.std_bias"),
        vec![vp.hidden],
        Fill::Bf16Const(0.0),
    ));
    v.push(bf16(
        format!("{t}.std_scale"),
        vec![vp.hidden],
        Fill::Bf16Const(1.0),
    ));
    v.push(bf16(
        "model.embed_vision.embedding_projection.weight".into(),
        vec![p.hidden, vp.hidden],
        Fill::Bf16(std(vp.hidden)),
    ));
    v
}

fn generate(spec: &Spec, rng: &mut Rng) -> Vec<u8> {
    let n = spec.bytes();
    let mut out = Vec::with_capacity(n);
    match spec.fill {
        Fill::Bf16(std) => {
            // Sum of 4 uniforms: cheap, roughly normal, std scaled to `std`.
            let k = std * (3.0f32).sqrt() / 2.0 * 2.0;
            while out.len() < n {
                let r = rng.next_u64();
                let s: f32 = (0..4)
                    .map(|j| ((r >> (16 * j)) & 0xffff) as f32 / 65535.0 - 0.5)
                    .sum();
                out.extend_from_slice(&half::bf16::from_f32(s * k).to_le_bytes());
            }
        }
        Fill::Bf16Const(c) => {
            let b = half::bf16::from_f32(c).to_le_bytes();
            while out.len() < n {
                out.extend_from_slice(&b);
            }
        }
        Fill::Bytes => {
            while out.len() < n {
                out.extend_from_slice(&rng.next_u64().to_le_bytes());
            }
            out.truncate(n);
        }
        Fill::E4m3 => {
            while out.len() < n {
                let r = rng.next_u64();
                for j in 0..8 {
                    // Exponent 6..=7 (values 0.5 .. 1.875), mantissa random, positive.
                    let b = (((6 + ((r >> (8 * j)) & 1)) << 3) | ((r >> (8 * j + 1)) & 7)) as u8;
                    out.push(b);
                }
            }
            out.truncate(n);
        }
        Fill::F32Const(c) => out.extend_from_slice(&c.to_le_bytes()),
    }
    out
}

pub fn config_json(p: &Preset) -> serde_json::Value {
    json!({
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "audio_config": null,
        // The 31B's ids where the vocabulary has them, the top of a smaller vocabulary otherwise.
        "boi_token_id": if p.vocab > 258_882 { 255_999 } else { p.vocab - 4 },
        "image_token_id": if p.vocab > 258_882 { 258_880 } else { p.vocab - 3 },
        "eoi_token_id": if p.vocab > 258_882 { 258_882 } else { p.vocab - 2 },
        "vision_config": {
            "model_type": "gemma4_vision", "hidden_size": p.vision.hidden, "intermediate_size": p.vision.intermediate,
            "num_hidden_layers": p.vision.layers, "num_attention_heads": p.vision.heads, "num_key_value_heads": p.vision.heads,
            "head_dim": p.vision.head_dim, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "patch_size": 16,
            "pooling_kernel_size": 3, "position_embedding_size": p.vision.position_embedding_size, "default_output_length": 280,
            "rope_parameters": {"rope_theta": 100.0, "rope_type": "default"}, "standardize": true, "use_clipped_linears": false
        },
        "eos_token_id": [1, 106],
        "dtype": "bfloat16",
        "tie_word_embeddings": true,
        "text_config": {
            "model_type": "gemma4_text",
            "hidden_size": p.hidden, "intermediate_size": p.intermediate, "num_hidden_layers": p.layers,
            "num_attention_heads": p.heads, "num_key_value_heads": p.kv_heads, "num_global_key_value_heads": p.global_kv_heads,
            "head_dim": p.head_dim, "global_head_dim": p.global_head_dim, "attention_k_eq_v": true, "attention_bias": false,
            "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "sliding_window": p.sliding_window,
            "layer_types": layer_types(p),
            "rope_parameters": {
                "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0, "rope_type": "proportional"},
                "sliding_attention": {"rope_theta": 10_000.0, "rope_type": "default"}
            },
            "final_logit_softcapping": 30.0, "max_position_embeddings": p.max_positions, "vocab_size": p.vocab,
            "hidden_size_per_layer_input": 0, "num_kv_shared_layers": 0, "enable_moe_block": false,
            "use_bidirectional_attention": "vision", "tie_word_embeddings": true,
            "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2
        },
        "quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4",
            "ignore": ["lm_head", "model.embed_vision*", "model.language_model.layers.*.self_attn*", "model.vision_tower*"]}
    })
}

/// Bytes by category: (NVFP4 MLP, bf16 attention, bf16 embedding, other).
pub fn byte_budget(p: &Preset) -> (usize, usize, usize, usize) {
    let (mut mlp, mut attn, mut embed, mut other) = (0, 0, 0, 0);
    for s in specs(p) {
        if s.name.contains("vision") {
            other += s.bytes();
        } else if s.name.contains(".mlp.") {
            mlp += s.bytes();
        } else if s.name.contains("_proj.weight") {
            attn += s.bytes();
        } else if s.name.contains("embed_tokens") {
            embed += s.bytes();
        } else {
            other += s.bytes();
        }
    }
    (mlp, attn, embed, other)
}

/// Writes the preset's checkpoint into `out`, calling `written(file, shard, shards)` after each
/// weight shard.
pub fn synth(
    preset_name: &str,
    out: &Path,
    shard_bytes: usize,
    seed: u64,
    mut written: impl FnMut(&str, usize, usize),
) -> Result<(), SynthError> {
    let p = preset(preset_name)?;
    std::fs::create_dir_all(out).map_err(|e| SynthError::write(out, e))?;
    let write_json = |name: &str, v: serde_json::Value| {
        let path = out.join(name);
        let text = serde_json::to_string_pretty(&v).map_err(|e| SynthError::write(&path, e))?;
        std::fs::write(&path, text).map_err(|e| SynthError::write(&path, e))
    };
    write_json("config.json", config_json(&p))?;
    write_json(
        "hf_quant_config.json",
        json!({"producer": {"name": "gemma4 synth", "version": env!("CARGO_PKG_VERSION")},
        "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": null, "group_size": 16,
        "exclude_modules": ["lm_head", "model.embed_vision*", "model.language_model.layers.*.self_attn*", "model.vision_tower*"]}}),
    )?;
    write_json(
        "processor_config.json",
        json!({"image_processor": {"image_processor_type": "Gemma4ImageProcessor",
        "patch_size": 16, "pooling_kernel_size": 3, "max_soft_tokens": 280}}),
    )?;
    write_json(
        "generation_config.json",
        json!({"bos_token_id": 2, "eos_token_id": [1, 106, 50], "pad_token_id": 0,
        "do_sample": true, "temperature": 1.0, "top_k": 64, "top_p": 0.95}),
    )?;

    // Group tensors into shards.
    let specs = specs(&p);
    let mut shards: Vec<Vec<&Spec>> = vec![vec![]];
    let mut size = 0;
    for s in &specs {
        if size + s.bytes() > shard_bytes && !shards.last().is_some_and(Vec::is_empty) {
            shards.push(vec![]);
            size = 0;
        }
        size += s.bytes();
        shards.last_mut().expect("one shard at least").push(s);
    }
    let n = shards.len();
    let mut rng = Rng::new(seed);
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let path = out.join(&file);
        let data: Vec<Vec<u8>> = shard.iter().map(|s| generate(s, &mut rng)).collect();
        let views: Vec<(String, TensorView)> = shard
            .iter()
            .zip(&data)
            .map(|(s, d)| {
                let view = TensorView::new(s.dtype, s.shape.clone(), d)
                    .map_err(|e| SynthError::write(&path, format!("tensor `{}`: {e}", s.name)))?;
                Ok((s.name.clone(), view))
            })
            .collect::<Result<_, SynthError>>()?;
        safetensors::serialize_to_file(views, None, &path)
            .map_err(|e| SynthError::write(&path, e))?;
        for s in shard {
            weight_map.insert(s.name.clone(), json!(file));
        }
        written(&file, i + 1, n);
    }
    if n > 1 {
        write_json(
            "model.safetensors.index.json",
            json!({"metadata": {}, "weight_map": weight_map}),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 31B preset's bytes, as computed by hand from its shapes: MLP 60·3·5376·21504 weights
    /// at 4.5 bits (NVFP4 with an E4M3 scale per 16) = 11.71 GB, attention 16.96 GB and the tied
    /// embedding 262144·5376 in bf16 = 2.82 GB.
    #[test]
    fn preset_31b_bytes_match_hand_arithmetic() {
        let (mlp, attn, embed, _) = byte_budget(&preset("31b").unwrap());
        let gb = |b: usize| (b as f64 / 1e9 * 100.0).round() / 100.0;
        assert_eq!(gb(mlp), 11.71);
        assert_eq!(gb(attn), 16.96);
        assert_eq!(gb(embed), 2.82);
    }

    #[test]
    fn tiny_preset_loads_and_runs() {
        let dir = std::env::temp_dir().join(format!("gemma4-synth-{}", std::process::id()));
        // Small shards, to exercise the index.
        synth("tiny", &dir, 200_000, 1, |_, _, _| {}).unwrap();
        assert!(dir.join("model.safetensors.index.json").exists());
        let model = crate::Model::<crate::CpuBackend>::load(&dir, &Default::default()).unwrap();
        assert_eq!(model.report.nvfp4_linears, 18);
        assert!(model.vision.is_some(), "the synthetic vision tower loads");
        let mut cache = model.text.new_cache();
        let logits = model
            .text
            .forward(&[2, 10, 20, 30], &mut cache, crate::Logits::All)
            .unwrap();
        let v = crate::to_host_f32(logits);
        assert_eq!(v.len(), 4 * 512);
        assert!(v.iter().all(|x| x.is_finite()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
