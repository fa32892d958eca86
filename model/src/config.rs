//! Typed configuration: `config.json` (`text_config`, `vision_config`, `quantization_config`),
//! `hf_quant_config.json` and `generation_config.json`.
//!
//! Parsed by hand from JSON values so that every error names its field, and so that both
//! spellings of the full-layer overrides are read: the published 31B config has
//! `global_head_dim` / `num_global_key_value_heads`; configs written by transformers 5.23 have
//! `per_layer_config` (`{"5": {"head_dim": 512, "num_key_value_heads": 4}}`). As in
//! `configuration_gemma4.py`, `global_head_dim` defaults to 512 and applies to every full layer,
//! and `num_global_key_value_heads` applies only when `attention_k_eq_v` is true.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::LoadError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Sees the last `sliding_window` positions including itself.
    Sliding,
    /// Sees the whole causal context.
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeKind {
    /// inv_freq[i] = theta^(-2i/d) for every pair.
    Default,
    /// inv_freq[i] = theta^(-2i/d) for i < int(partial * d // 2), 0 after (`modeling_rope_utils.py`).
    Proportional { partial_rotary_factor: f64 },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    pub kind: RopeKind,
    pub theta: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LayerConfig {
    pub kind: LayerKind,
    pub head_dim: usize,
    pub num_key_value_heads: usize,
    /// Full layers with `attention_k_eq_v` have no `v_proj`: V comes from `k_proj`.
    pub has_v_proj: bool,
    pub rope: RopeConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub rms_norm_eps: f64,
    pub sliding_window: usize,
    pub final_logit_softcapping: Option<f64>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_k_eq_v: bool,
    pub layers: Vec<LayerConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub head_dim: usize,
    pub patch_size: usize,
    pub pooling_kernel_size: usize,
    pub position_embedding_size: usize,
    pub default_output_length: usize,
    pub num_key_value_heads: usize,
    pub rms_norm_eps: f64,
    /// Axial 2-D RoPE base (`rope_parameters.rope_theta`, 100 in the 31B).
    pub rope_theta: f64,
    /// Pooled features become (h - std_bias) · std_scale.
    pub standardize: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub text: TextConfig,
    pub vision: Option<VisionConfig>,
    /// Union of the top-level and text-level eos ids.
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub image_token_id: Option<u32>,
    /// `<|image>` and `<image|>`, around each image's placeholders.
    pub boi_token_id: Option<u32>,
    pub eoi_token_id: Option<u32>,
    pub video_token_id: Option<u32>,
    pub audio_token_id: Option<u32>,
    pub quantization: Option<QuantConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QuantConfig {
    pub quant_algo: String,
    pub group_size: usize,
    pub kv_cache_quant_algo: Option<String>,
    pub exclude_modules: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerationConfig {
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub suppress_tokens: Vec<u32>,
}

pub(crate) fn read_json(path: &Path) -> Result<Value, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.into(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| LoadError::Json {
        path: path.into(),
        msg: e.to_string(),
    })
}

/// A JSON object with the dotted path of where it sits, for error messages.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Obj<'a> {
    fn new(value: &'a Value, path: &str) -> Result<Self, LoadError> {
        match value.as_object() {
            Some(map) => Ok(Obj {
                map,
                path: path.to_string(),
            }),
            None => Err(LoadError::config(path, "expected a JSON object")),
        }
    }
    fn field(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }
    /// Present and not null.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }
    fn usize(&self, key: &str) -> Result<usize, LoadError> {
        self.opt_usize(key)?
            .ok_or_else(|| LoadError::config(self.field(key), "missing"))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>, LoadError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                LoadError::config(
                    self.field(key),
                    format!("expected a non-negative integer, found {v}"),
                )
            }),
        }
    }
    fn f64(&self, key: &str) -> Result<f64, LoadError> {
        self.opt_f64(key)?
            .ok_or_else(|| LoadError::config(self.field(key), "missing"))
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>, LoadError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                LoadError::config(self.field(key), format!("expected a number, found {v}"))
            }),
        }
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>, LoadError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                LoadError::config(
                    self.field(key),
                    format!("expected true or false, found {v}"),
                )
            }),
        }
    }
    fn opt_str(&self, key: &str) -> Result<Option<&'a str>, LoadError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| {
                LoadError::config(self.field(key), format!("expected a string, found {v}"))
            }),
        }
    }
    /// An id or a list of ids (`eos_token_id` has both forms).
    fn ids(&self, key: &str) -> Result<Vec<u32>, LoadError> {
        let bad = |v: &Value| {
            LoadError::config(
                self.field(key),
                format!("expected a token id or a list of ids, found {v}"),
            )
        };
        match self.get(key) {
            None => Ok(vec![]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|n| n as u32).ok_or_else(|| bad(v)))
                .collect(),
            Some(v) => v.as_u64().map(|n| vec![n as u32]).ok_or_else(|| bad(v)),
        }
    }
    fn opt_id(&self, key: &str) -> Result<Option<u32>, LoadError> {
        Ok(self.opt_usize(key)?.map(|n| n as u32))
    }
}

impl ModelConfig {
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let config = read_json(&dir.join("config.json"))?;
        let hf_quant = dir.join("hf_quant_config.json");
        let hf_quant = if hf_quant.exists() {
            Some(read_json(&hf_quant)?)
        } else {
            None
        };
        Self::from_values(&config, hf_quant.as_ref())
    }

    pub fn from_values(config: &Value, hf_quant: Option<&Value>) -> Result<Self, LoadError> {
        let root = Obj::new(config, "")?;
        if let Some(t) = root.opt_str("model_type")? {
            if t != "gemma4" && t != "gemma4_text" {
                return Err(LoadError::unsupported(
                    "model_type",
                    format!("`{t}`: only gemma4 is supported"),
                ));
            }
        }
        if root.get("audio_config").is_some() {
            return Err(LoadError::unsupported(
                "audio_config",
                "audio is not supported",
            ));
        }
        // A bare text config (gemma4_text) or the multimodal wrapper with `text_config`.
        let text_value = root.get("text_config").unwrap_or(config);
        let text_path = if root.get("text_config").is_some() {
            "text_config"
        } else {
            ""
        };
        let text = parse_text(&Obj::new(text_value, text_path)?)?;
        let vision = match root.get("vision_config") {
            Some(v) => Some(parse_vision(&Obj::new(v, "vision_config")?)?),
            None => None,
        };
        let text_obj = Obj::new(text_value, text_path)?;
        let mut eos = root.ids("eos_token_id")?;
        for id in text_obj.ids("eos_token_id")? {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        let bos_token_id = root
            .opt_id("bos_token_id")?
            .or(text_obj.opt_id("bos_token_id")?);
        // transformers reads text_config.pad_token_id for the placeholder replacement.
        let pad_token_id = text_obj
            .opt_id("pad_token_id")?
            .or(root.opt_id("pad_token_id")?);
        let quantization = parse_quant(&root, hf_quant)?;
        Ok(ModelConfig {
            text,
            vision,
            eos_token_ids: eos,
            bos_token_id,
            pad_token_id,
            image_token_id: root.opt_id("image_token_id")?,
            boi_token_id: root.opt_id("boi_token_id")?,
            eoi_token_id: root.opt_id("eoi_token_id")?,
            video_token_id: root.opt_id("video_token_id")?,
            audio_token_id: root.opt_id("audio_token_id")?,
            quantization,
        })
    }
}

impl ModelConfig {
    /// Media placeholder ids present in the config (image, video, audio).
    pub fn placeholder_ids(&self) -> Vec<u32> {
        [
            self.image_token_id,
            self.video_token_id,
            self.audio_token_id,
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

fn parse_text(o: &Obj) -> Result<TextConfig, LoadError> {
    // Features of other Gemma 4 sizes that this engine does not implement: refuse, never ignore.
    if o.opt_usize("hidden_size_per_layer_input")?.unwrap_or(0) > 0 {
        return Err(LoadError::unsupported(
            o.field("hidden_size_per_layer_input"),
            "per-layer embeddings (PLE) are not supported",
        ));
    }
    if o.opt_bool("enable_moe_block")?.unwrap_or(false) {
        return Err(LoadError::unsupported(
            o.field("enable_moe_block"),
            "mixture-of-experts blocks are not supported",
        ));
    }
    if o.opt_usize("num_kv_shared_layers")?.unwrap_or(0) > 0 {
        return Err(LoadError::unsupported(
            o.field("num_kv_shared_layers"),
            "KV sharing between layers is not supported",
        ));
    }
    if o.opt_bool("attention_bias")?.unwrap_or(false) {
        return Err(LoadError::unsupported(
            o.field("attention_bias"),
            "attention biases are not supported",
        ));
    }
    if let Some(mode) = o.opt_str("use_bidirectional_attention")? {
        if mode != "vision" {
            return Err(LoadError::unsupported(
                o.field("use_bidirectional_attention"),
                format!("`{mode}`: only \"vision\" (or null) is supported"),
            ));
        }
    }
    if let Some(act) = o.opt_str("hidden_activation")? {
        if act != "gelu_pytorch_tanh" {
            return Err(LoadError::unsupported(
                o.field("hidden_activation"),
                format!("`{act}`: only gelu_pytorch_tanh is supported"),
            ));
        }
    }

    let num_hidden_layers = o.usize("num_hidden_layers")?;
    let num_attention_heads = o.usize("num_attention_heads")?;
    let hidden_size = o.usize("hidden_size")?;
    let head_dim = o.opt_usize("head_dim")?.unwrap_or(256);
    let num_key_value_heads = o.usize("num_key_value_heads")?;
    let attention_k_eq_v = o.opt_bool("attention_k_eq_v")?.unwrap_or(false);

    // layer_types: default pattern 5 sliding : 1 full; the last layer is always full.
    let mut kinds: Vec<LayerKind> = match o.get("layer_types") {
        None => (0..num_hidden_layers)
            .map(|i| {
                if (i + 1) % 6 != 0 {
                    LayerKind::Sliding
                } else {
                    LayerKind::Full
                }
            })
            .collect(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v.as_str() {
                Some("sliding_attention") => Ok(LayerKind::Sliding),
                Some("full_attention") => Ok(LayerKind::Full),
                _ => Err(LoadError::unsupported(
                    format!("{}[{i}]", o.field("layer_types")),
                    format!("unknown layer type {v}"),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(v) => {
            return Err(LoadError::config(
                o.field("layer_types"),
                format!("expected a list, found {v}"),
            ))
        }
    };
    if kinds.len() != num_hidden_layers {
        return Err(LoadError::config(
            o.field("layer_types"),
            format!("has {} entries for {num_hidden_layers} layers", kinds.len()),
        ));
    }
    if let Some(last) = kinds.last_mut() {
        *last = LayerKind::Full; // configuration_gemma4.py forces it too.
    }

    let rope_sliding = parse_rope(
        o,
        "sliding_attention",
        RopeConfig {
            kind: RopeKind::Default,
            theta: 10_000.0,
        },
    )?;
    let rope_full = parse_rope(
        o,
        "full_attention",
        RopeConfig {
            kind: RopeKind::Proportional {
                partial_rotary_factor: 0.25,
            },
            theta: 1_000_000.0,
        },
    )?;

    // Per-layer overrides, in either spelling.
    let per_layer = match o.get("per_layer_config") {
        Some(v) => Some(Obj::new(v, &o.field("per_layer_config"))?),
        None => None,
    };
    let global_head_dim = o.opt_usize("global_head_dim")?.unwrap_or(512);
    let global_kv = if attention_k_eq_v {
        o.opt_usize("num_global_key_value_heads")?
    } else {
        None
    };
    let mut layers = Vec::with_capacity(num_hidden_layers);
    for (i, &kind) in kinds.iter().enumerate() {
        let (mut hd, mut kv) = (head_dim, num_key_value_heads);
        match &per_layer {
            Some(p) => {
                if let Some(v) = p.get(&i.to_string()) {
                    let lo = Obj::new(v, &p.field(&i.to_string()))?;
                    for key in lo.map.keys() {
                        if key != "head_dim" && key != "num_key_value_heads" {
                            return Err(LoadError::unsupported(
                                lo.field(key),
                                "unknown per-layer override",
                            ));
                        }
                    }
                    hd = lo.opt_usize("head_dim")?.unwrap_or(hd);
                    kv = lo.opt_usize("num_key_value_heads")?.unwrap_or(kv);
                }
            }
            None if kind == LayerKind::Full => {
                hd = global_head_dim;
                kv = global_kv.unwrap_or(kv);
            }
            None => {}
        }
        if hd == 0 || hd % 2 != 0 {
            return Err(LoadError::config(
                format!("layer {i} head_dim"),
                format!("{hd} must be even and positive"),
            ));
        }
        if kv == 0 || num_attention_heads % kv != 0 {
            return Err(LoadError::config(
                format!("layer {i} num_key_value_heads"),
                format!("{kv} must divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let rope = if kind == LayerKind::Full {
            rope_full
        } else {
            rope_sliding
        };
        let has_v_proj = !(attention_k_eq_v && kind == LayerKind::Full);
        layers.push(LayerConfig {
            kind,
            head_dim: hd,
            num_key_value_heads: kv,
            has_v_proj,
            rope,
        });
    }

    let sliding_window = o.opt_usize("sliding_window")?.unwrap_or(512);
    if sliding_window == 0 {
        return Err(LoadError::config(
            o.field("sliding_window"),
            "must be positive",
        ));
    }
    Ok(TextConfig {
        vocab_size: o.usize("vocab_size")?,
        hidden_size,
        intermediate_size: o.usize("intermediate_size")?,
        num_hidden_layers,
        num_attention_heads,
        rms_norm_eps: o.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
        sliding_window,
        final_logit_softcapping: o.opt_f64("final_logit_softcapping")?,
        max_position_embeddings: o.opt_usize("max_position_embeddings")?.unwrap_or(131_072),
        tie_word_embeddings: o.opt_bool("tie_word_embeddings")?.unwrap_or(true),
        attention_k_eq_v,
        layers,
    })
}

fn parse_rope(o: &Obj, layer_type: &str, default: RopeConfig) -> Result<RopeConfig, LoadError> {
    let Some(all) = o.get("rope_parameters") else {
        return Ok(default);
    };
    let all = Obj::new(all, &o.field("rope_parameters"))?;
    let Some(p) = all.get(layer_type) else {
        return Ok(default);
    };
    let p = Obj::new(p, &all.field(layer_type))?;
    let theta = p.f64("rope_theta")?;
    if let Some(factor) = p.opt_f64("factor")? {
        if factor != 1.0 {
            return Err(LoadError::unsupported(
                p.field("factor"),
                format!("RoPE scaling factor {factor} is not supported"),
            ));
        }
    }
    let kind = match p.opt_str("rope_type")?.unwrap_or("default") {
        "default" => {
            if let Some(f) = p.opt_f64("partial_rotary_factor")? {
                if f != 1.0 {
                    return Err(LoadError::unsupported(
                        p.field("partial_rotary_factor"),
                        "partial rotary with default RoPE",
                    ));
                }
            }
            RopeKind::Default
        }
        "proportional" => RopeKind::Proportional {
            partial_rotary_factor: p.opt_f64("partial_rotary_factor")?.unwrap_or(1.0),
        },
        other => {
            return Err(LoadError::unsupported(
                p.field("rope_type"),
                format!("`{other}` is not supported"),
            ))
        }
    };
    Ok(RopeConfig { kind, theta })
}

fn parse_vision(o: &Obj) -> Result<VisionConfig, LoadError> {
    let v = VisionConfig {
        hidden_size: o.usize("hidden_size")?,
        intermediate_size: o.usize("intermediate_size")?,
        num_hidden_layers: o.usize("num_hidden_layers")?,
        num_attention_heads: o.usize("num_attention_heads")?,
        head_dim: o.usize("head_dim")?,
        patch_size: o.opt_usize("patch_size")?.unwrap_or(16),
        pooling_kernel_size: o.opt_usize("pooling_kernel_size")?.unwrap_or(3),
        position_embedding_size: o.opt_usize("position_embedding_size")?.unwrap_or(10 * 1024),
        default_output_length: o.opt_usize("default_output_length")?.unwrap_or(280),
        num_key_value_heads: o
            .opt_usize("num_key_value_heads")?
            .unwrap_or(o.usize("num_attention_heads")?),
        rms_norm_eps: o.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
        rope_theta: match o.get("rope_parameters") {
            Some(r) => Obj::new(r, &o.field("rope_parameters"))?
                .opt_f64("rope_theta")?
                .unwrap_or(100.0),
            None => 100.0,
        },
        standardize: o.opt_bool("standardize")?.unwrap_or(false),
    };
    // Refuse what the vision tower does not implement, naming the field.
    if o.opt_bool("use_clipped_linears")? == Some(true) {
        return Err(LoadError::unsupported(
            o.field("use_clipped_linears"),
            "clipped vision linears are not supported (the 31B has none)",
        ));
    }
    if let Some(act) = o.opt_str("hidden_activation")? {
        if act != "gelu_pytorch_tanh" {
            return Err(LoadError::unsupported(
                o.field("hidden_activation"),
                format!("`{act}`: only gelu_pytorch_tanh"),
            ));
        }
    }
    if !v.head_dim.is_multiple_of(4) || !v.num_attention_heads.is_multiple_of(v.num_key_value_heads)
    {
        return Err(LoadError::config(o.field("head_dim"), format!("{} heads of {} over {} KV heads: the 2-D RoPE needs head_dim % 4 == 0 and whole GQA groups", v.num_attention_heads, v.head_dim, v.num_key_value_heads)));
    }
    Ok(v)
}

fn parse_quant(root: &Obj, hf_quant: Option<&Value>) -> Result<Option<QuantConfig>, LoadError> {
    // hf_quant_config.json is what ModelOpt writes first; quantization_config in config.json mirrors it.
    let (algo, group, kv, exclude) = if let Some(v) = hf_quant {
        let top = Obj::new(v, "hf_quant_config")?;
        let Some(q) = top.get("quantization") else {
            return Err(LoadError::config("hf_quant_config.quantization", "missing"));
        };
        let q = Obj::new(q, "hf_quant_config.quantization")?;
        let exclude = string_list(&q, "exclude_modules")?;
        (
            q.opt_str("quant_algo")?.map(str::to_string),
            q.opt_usize("group_size")?,
            q.opt_str("kv_cache_quant_algo")?.map(str::to_string),
            exclude,
        )
    } else if let Some(v) = root.get("quantization_config") {
        let q = Obj::new(v, "quantization_config")?;
        if let Some(m) = q.opt_str("quant_method")? {
            if m != "modelopt" {
                return Err(LoadError::unsupported(
                    "quantization_config.quant_method",
                    format!("`{m}`: only modelopt NVFP4 checkpoints are supported"),
                ));
            }
        }
        (
            q.opt_str("quant_algo")?.map(str::to_string),
            Some(16),
            None,
            string_list(&q, "ignore")?,
        )
    } else {
        return Ok(None);
    };
    let Some(algo) = algo else { return Ok(None) };
    if algo != "NVFP4" {
        return Err(LoadError::unsupported(
            "quant_algo",
            format!("`{algo}`: only NVFP4 is supported"),
        ));
    }
    let group_size = group.unwrap_or(16);
    if group_size != crate::nvfp4::GROUP_SIZE {
        return Err(LoadError::unsupported(
            "group_size",
            format!("{group_size}: NVFP4 uses groups of 16"),
        ));
    }
    Ok(Some(QuantConfig {
        quant_algo: algo,
        group_size,
        kv_cache_quant_algo: kv,
        exclude_modules: exclude,
    }))
}

fn string_list(o: &Obj, key: &str) -> Result<Vec<String>, LoadError> {
    match o.get(key) {
        None => Ok(vec![]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    LoadError::config(o.field(key), format!("expected strings, found {v}"))
                })
            })
            .collect(),
        Some(v) => Err(LoadError::config(
            o.field(key),
            format!("expected a list, found {v}"),
        )),
    }
}

impl GenerationConfig {
    /// Reads `generation_config.json` if present (absent: all defaults).
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        Self::from_value(&read_json(&path)?)
    }

    pub fn from_value(v: &Value) -> Result<Self, LoadError> {
        let o = Obj::new(v, "generation_config")?;
        let suppress = match o.get("suppress_tokens") {
            None => vec![],
            Some(_) => o.ids("suppress_tokens")?,
        };
        Ok(GenerationConfig {
            eos_token_ids: o.ids("eos_token_id")?,
            bos_token_id: o.opt_id("bos_token_id")?,
            pad_token_id: o.opt_id("pad_token_id")?,
            do_sample: o.opt_bool("do_sample")?,
            temperature: o.opt_f64("temperature")?,
            top_k: o.opt_usize("top_k")?,
            top_p: o.opt_f64("top_p")?,
            min_p: o.opt_f64("min_p")?,
            suppress_tokens: suppress,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn spec_31b() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/31b-config")
    }

    /// The reconstructed 31B files: 60 layers, head dims 256/512, 16/4 KV heads, no v_proj on full layers.
    #[test]
    fn parses_31b_config() {
        let dir = spec_31b();
        let cfg = ModelConfig::from_dir(&dir).expect("31B config parses");
        let t = &cfg.text;
        assert_eq!(
            (t.hidden_size, t.intermediate_size, t.num_hidden_layers),
            (5376, 21504, 60)
        );
        assert_eq!(
            (t.num_attention_heads, t.vocab_size, t.sliding_window),
            (32, 262_144, 1024)
        );
        assert_eq!(t.final_logit_softcapping, Some(30.0));
        let full: Vec<usize> = (0..60)
            .filter(|&i| t.layers[i].kind == LayerKind::Full)
            .collect();
        assert_eq!(full, vec![5, 11, 17, 23, 29, 35, 41, 47, 53, 59]);
        for (i, l) in t.layers.iter().enumerate() {
            match l.kind {
                LayerKind::Full => {
                    assert_eq!(
                        (l.head_dim, l.num_key_value_heads, l.has_v_proj),
                        (512, 4, false),
                        "layer {i}"
                    );
                    assert_eq!(
                        l.rope,
                        RopeConfig {
                            kind: RopeKind::Proportional {
                                partial_rotary_factor: 0.25
                            },
                            theta: 1e6
                        }
                    );
                }
                LayerKind::Sliding => {
                    assert_eq!(
                        (l.head_dim, l.num_key_value_heads, l.has_v_proj),
                        (256, 16, true),
                        "layer {i}"
                    );
                    assert_eq!(
                        l.rope,
                        RopeConfig {
                            kind: RopeKind::Default,
                            theta: 1e4
                        }
                    );
                }
            }
        }
        let v = cfg.vision.as_ref().expect("vision config");
        assert_eq!(
            (
                v.hidden_size,
                v.num_hidden_layers,
                v.head_dim,
                v.default_output_length
            ),
            (1152, 27, 72, 280)
        );
        assert_eq!(cfg.eos_token_ids, vec![1, 106]);
        assert_eq!(cfg.image_token_id, Some(258_880));
        let q = cfg.quantization.as_ref().expect("NVFP4");
        assert_eq!((q.quant_algo.as_str(), q.group_size), ("NVFP4", 16));
        assert_eq!(q.kv_cache_quant_algo.as_deref(), Some("FP8"));
        let gen = GenerationConfig::from_dir(&dir).unwrap();
        assert_eq!(gen.eos_token_ids, vec![1, 106, 50]);
        assert_eq!(
            (gen.top_k, gen.top_p, gen.temperature),
            (Some(64), Some(0.95), Some(1.0))
        );
        assert_eq!(gen.suppress_tokens, vec![258_883, 258_882]);
    }

    /// The 31B shapes the loader expects per layer, computed from the config.
    #[test]
    fn shapes_31b() {
        let cfg = ModelConfig::from_dir(&spec_31b()).unwrap();
        let t = &cfg.text;
        let sliding = &t.layers[0];
        let full = &t.layers[5];
        assert_eq!(t.num_attention_heads * sliding.head_dim, 8192); // q_proj out, sliding
        assert_eq!(sliding.num_key_value_heads * sliding.head_dim, 4096); // k_proj/v_proj out
        assert_eq!(t.num_attention_heads * full.head_dim, 16384); // q_proj out, full
        assert_eq!(full.num_key_value_heads * full.head_dim, 2048); // k_proj out, full
                                                                    // Attention weights per layer: 132.1 M sliding, 187.2 M full.
        let h = t.hidden_size;
        let s = 2 * 8192 * h + 2 * 4096 * h;
        let f = 2 * 16384 * h + 2048 * h;
        assert_eq!((s as f64 / 1e6).round(), 132.0);
        assert_eq!((f as f64 / 1e6 * 10.0).round() / 10.0, 187.2);
    }

    #[test]
    fn per_layer_config_spelling() {
        let v: Value = serde_json::json!({
            "model_type": "gemma4",
            "text_config": {
                "vocab_size": 320, "hidden_size": 80, "intermediate_size": 176, "num_hidden_layers": 3,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "attention_k_eq_v": true,
                "layer_types": ["sliding_attention", "full_attention", "full_attention"],
                "per_layer_config": {"1": {"head_dim": 64, "num_key_value_heads": 1}, "2": {"head_dim": 64, "num_key_value_heads": 1}},
                "hidden_size_per_layer_input": 0, "sliding_window": 16
            }
        });
        let cfg = ModelConfig::from_values(&v, None).unwrap();
        let l = &cfg.text.layers;
        assert_eq!(
            (l[0].head_dim, l[0].num_key_value_heads, l[0].has_v_proj),
            (32, 2, true)
        );
        assert_eq!(
            (l[1].head_dim, l[1].num_key_value_heads, l[1].has_v_proj),
            (64, 1, false)
        );
        assert!(cfg.quantization.is_none());
    }

    #[test]
    fn refuses_unsupported_features() {
        let base = serde_json::json!({
            "vocab_size": 320, "hidden_size": 80, "intermediate_size": 176, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "hidden_size_per_layer_input": 0
        });
        assert!(ModelConfig::from_values(
            &serde_json::json!({"model_type": "gemma4", "text_config": base.clone()}),
            None
        )
        .is_ok());
        for (key, value, needle) in [
            (
                "hidden_size_per_layer_input",
                serde_json::json!(256),
                "hidden_size_per_layer_input",
            ),
            (
                "enable_moe_block",
                serde_json::json!(true),
                "enable_moe_block",
            ),
            (
                "num_kv_shared_layers",
                serde_json::json!(2),
                "num_kv_shared_layers",
            ),
            (
                "use_bidirectional_attention",
                serde_json::json!("all"),
                "use_bidirectional_attention",
            ),
        ] {
            let mut t = base.clone();
            t[key] = value;
            let err = ModelConfig::from_values(
                &serde_json::json!({"model_type": "gemma4", "text_config": t}),
                None,
            )
            .unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
        }
        let err = ModelConfig::from_values(
            &serde_json::json!({"model_type": "gemma4", "text_config": base.clone(), "audio_config": {"hidden_size": 1}}),
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("audio_config"), "{err}");
        let mut t = base.clone();
        t["hidden_size"] = serde_json::json!("eighty");
        let err =
            ModelConfig::from_values(&serde_json::json!({"text_config": t}), None).unwrap_err();
        assert!(err.to_string().contains("text_config.hidden_size"), "{err}");
        let mut t = base;
        t.as_object_mut().unwrap().remove("vocab_size");
        let err =
            ModelConfig::from_values(&serde_json::json!({"text_config": t}), None).unwrap_err();
        assert!(err.to_string().contains("text_config.vocab_size"), "{err}");
    }
}
