//! The text tower (`Gemma4TextModel` + tied lm_head of `Gemma4ForConditionalGeneration`):
//! scaled embedding, decoder layers, final norm, logits = h · embed_tokensᵀ, final softcap.

use crate::Gemma4Backend;
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::TensorData;

use crate::attention::Attention;
use crate::cache::{kind_index, KvCache, KvDtype, KvPool, PerKind, SeqKv, DEFAULT_BLOCK_SIZE};
use crate::config::{LayerKind, TextConfig};
use crate::decoder::DecoderLayer;
use crate::error::{LoadError, RunError};
use crate::linear::Linear;
use crate::mlp::Mlp;
use crate::norm::RmsNorm;
use crate::nvfp4::{PackedNvfp4, GROUP_SIZE};
use crate::rope::{Rope, RopeTables};
use crate::weights::{check_shape, dtype_name, Checkpoint};
use gemma4_kernels::attention::fp8::KvScales;
use gemma4_kernels::attention::AttentionParams;
use safetensors::tensor::Dtype;

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every position of the step: [t, vocab].
    All,
    /// Only the last position: [1, vocab] (generation).
    Last,
}

#[derive(Module, Debug)]
pub struct TextModel<B: Gemma4Backend> {
    /// [vocab, hidden]; also the lm_head (tied).
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// sqrt(hidden) rounded to the embedding's checkpoint dtype (bf16: sqrt(5376) = 73.32 -> 73.5),
    /// as `Gemma4TextScaledWordEmbedding` multiplies by `embed_scale.to(weight.dtype)`.
    pub embed_scale: f32,
    pub final_logit_softcapping: Option<f32>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Image/video/audio placeholder ids: embedded as `pad_token_id` (`Gemma4Model.forward`
    /// replaces them before the lookup; soft tokens overwrite them when media is attached).
    pub placeholder_ids: Vec<u32>,
    pub pad_token_id: u32,
    /// `<|image|>`: the placeholders whose rows take the vision tower's soft tokens.
    pub image_token_id: Option<u32>,
}

/// One sequence's part of a step: its next tokens, the soft tokens of the image placeholders
/// among them (`[n, hidden]`, in order; None leaves them pad embeddings), and its block tables.
pub struct SeqStep<'a, B: Gemma4Backend> {
    pub tokens: &'a [u32],
    pub soft: Option<Tensor<B, 2>>,
    pub kv: &'a mut SeqKv,
}

impl<B: Gemma4Backend> TextModel<B> {
    /// Runs `tokens` (the next tokens of the sequence held by `cache`) and returns logits.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<B>,
        which: Logits,
    ) -> Result<Tensor<B, 2>, RunError> {
        self.forward_multimodal(tokens, None, cache, which)
    }

    /// As `forward`, with `soft` `[n, hidden]` the soft tokens of the n image placeholders among
    /// `tokens` (see [`TextModel::forward_step`]).
    pub fn forward_multimodal(
        &self,
        tokens: &[u32],
        soft: Option<Tensor<B, 2>>,
        cache: &mut KvCache<B>,
        which: Logits,
    ) -> Result<Tensor<B, 2>, RunError> {
        let KvCache { pool, seq } = cache;
        let mut step = [SeqStep {
            tokens,
            soft,
            kv: seq,
        }];
        self.forward_step(pool, &mut step, which)
    }

    /// One forward over a ragged batch: each sequence of `steps` runs its tokens (a prefill
    /// chunk or one decode token) from its `seq_len`, all rows through every linear together and
    /// through one attention call per layer. Logits: `Last`, one row per sequence in order;
    /// `All`, every row.
    ///
    /// Soft tokens (`Gemma4Model.forward`): the placeholders embed as pad, then `masked_scatter`
    /// puts the vision features in their rows, unscaled. Each run of placeholders is one image:
    /// its tokens see each other in both directions on sliding layers, so a run must not be split
    /// across steps. Without soft tokens the placeholders stay pad embeddings and attention stays
    /// causal, as transformers does when no pixel_values are given.
    pub fn forward_step(
        &self,
        pool: &mut KvPool<B>,
        steps: &mut [SeqStep<'_, B>],
        which: Logits,
    ) -> Result<Tensor<B, 2>, RunError> {
        if steps.is_empty() || steps.iter().any(|s| s.tokens.is_empty()) {
            return Err(RunError::EmptyInput);
        }
        for s in steps.iter() {
            if let Some((i, &id)) = s
                .tokens
                .iter()
                .enumerate()
                .find(|(_, &id)| id as usize >= self.vocab_size)
            {
                return Err(RunError::TokenOutOfRange {
                    id,
                    position: s.kv.seq_len + i,
                    vocab: self.vocab_size,
                });
            }
        }
        let lens: Vec<usize> = steps.iter().map(|s| s.tokens.len()).collect();
        let rows: usize = lens.iter().sum();
        let tokens: Vec<u32> = steps
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect();
        let mut h = self.embed(&tokens);

        // Soft tokens: one gather over [embeddings; every sequence's soft tokens]: the k-th
        // placeholder row takes soft row k, every other row its embedding.
        let is_image = |id: u32| Some(id) == self.image_token_id;
        let mut images: Vec<Vec<std::ops::Range<usize>>> = vec![Vec::new(); steps.len()];
        let mut softs = Vec::new();
        let mut index: Vec<i32> = (0..rows as i32).collect();
        let (mut row0, mut soft_rows) = (0, rows);
        for (b, s) in steps.iter_mut().enumerate() {
            let t = s.tokens.len();
            if let Some(soft) = s.soft.take() {
                let placeholders = s.tokens.iter().filter(|&&id| is_image(id)).count();
                let [n, width] = soft.dims();
                if n != placeholders || width != self.hidden_size {
                    return Err(RunError::SoftTokens {
                        expected: placeholders,
                        got: n,
                    });
                }
                let mut k = 0;
                for (i, &id) in s.tokens.iter().enumerate() {
                    if is_image(id) {
                        index[row0 + i] = (soft_rows + k) as i32;
                        k += 1;
                    }
                }
                soft_rows += n;
                softs.push(soft);
                if let Some(id) = self.image_token_id {
                    let pos0 = s.kv.seq_len;
                    images[b] = image_runs(s.tokens, id)
                        .into_iter()
                        .map(|r| pos0 + r.start..pos0 + r.end)
                        .collect();
                }
            }
            row0 += t;
        }
        if !softs.is_empty() {
            let device = h.device();
            let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [rows]), &device);
            h = Tensor::cat([vec![h], softs].concat(), 0).select(0, index);
        }

        let positions: Vec<usize> = steps
            .iter()
            .flat_map(|s| s.kv.seq_len..s.kv.seq_len + s.tokens.len())
            .collect();
        let ropes = self.step_ropes(&positions);
        let window = self.sliding_window();
        let mut kvs: Vec<&mut SeqKv> = steps.iter_mut().map(|s| &mut *s.kv).collect();
        // Image spans are bidirectional on sliding layers only (full layers stay causal).
        let layout = pool.layout(&mut kvs, &lens, |kind, b| {
            if kind == kind_index(LayerKind::Sliding) {
                AttentionParams {
                    bidirectional: images[b].clone(),
                    ..AttentionParams::causal(0, 0, window)
                }
            } else {
                AttentionParams::causal(0, 0, None)
            }
        })?;
        for (layer, kv) in self.layers.iter().zip(pool.layers.iter_mut()) {
            let kind = layer.self_attn.kind();
            let i = kind_index(kind);
            h = layer.forward(h, ropes.get(kind), kv, &layout.slots[i], &layout.batches[i]);
        }
        pool.advance(&mut kvs, &lens);
        if which == Logits::Last {
            let last: Vec<i32> = lens
                .iter()
                .scan(0, |end, &t| {
                    *end += t;
                    Some(*end as i32 - 1)
                })
                .collect();
            let n = last.len();
            let last = Tensor::<B, 1, Int>::from_data(TensorData::new(last, [n]), &h.device());
            h = h.select(0, last);
        }
        Ok(self.logits(h))
    }

    /// The sliding layers' window (None without sliding layers).
    pub fn sliding_window(&self) -> Option<usize> {
        self.layers.iter().find_map(|l| l.self_attn.sliding_window)
    }

    /// A KV pool for this model's layers: `num_blocks` blocks of `block_size` tokens per layer
    /// kind (sliding, full), or None for a pool that grows as needed, storing `dtype` (fp8 with
    /// each layer's checkpoint scales).
    pub fn new_pool(
        &self,
        block_size: usize,
        num_blocks: Option<PerKind<usize>>,
        dtype: KvDtype,
    ) -> KvPool<B> {
        let layers: Vec<_> = self
            .layers
            .iter()
            .map(|l| {
                let a = &l.self_attn;
                (a.kind(), a.num_kv_heads, a.head_dim, a.kv_scales)
            })
            .collect();
        let device = self.embed_tokens.device();
        KvPool::new(
            &layers,
            self.sliding_window(),
            block_size,
            num_blocks,
            dtype,
            &device,
        )
    }

    /// One sequence's cache with a growable pool of its own.
    pub fn new_cache(&self) -> KvCache<B> {
        let pool = self.new_pool(DEFAULT_BLOCK_SIZE, None, KvDtype::Model);
        let seq = pool.new_seq();
        KvCache { pool, seq }
    }

    /// This step's RoPE tables, one pair per layer kind present.
    fn step_ropes(&self, positions: &[usize]) -> StepRopes<B> {
        let device = self.embed_tokens.device();
        let mut kinds: Vec<(LayerKind, RopeTables<B>)> = Vec::with_capacity(2);
        for layer in &self.layers {
            let kind = layer.self_attn.kind();
            if !kinds.iter().any(|(k, _)| *k == kind) {
                kinds.push((kind, layer.self_attn.rope.step_tables(positions, &device)));
            }
        }
        StepRopes(kinds)
    }

    /// Scaled embedding of `tokens` -> [n, hidden].
    fn embed(&self, tokens: &[u32]) -> Tensor<B, 2> {
        let device = self.embed_tokens.device();
        let ids: Vec<i32> = tokens
            .iter()
            .map(|&i| if self.placeholder_ids.contains(&i) { self.pad_token_id } else { i } as i32)
            .collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [tokens.len()]), &device);
        self.embed_tokens.val().select(0, ids) * self.embed_scale
    }

    /// Final norm, tied lm_head (the embedding read in place, never transposed into a copy),
    /// softcap.
    fn logits(&self, h: Tensor<B, 2>) -> Tensor<B, 2> {
        let h = self.norm.forward(h);
        let logits = B::lm_head(h, self.embed_tokens.val());
        match self.final_logit_softcapping {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        }
    }

    /// Loads the text tower from a checkpoint, marking every tensor it uses.
    pub fn load(
        ckpt: &mut Checkpoint,
        cfg: &TextConfig,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        // Gemma4ForConditionalGeneration writes `model.language_model.*`; a text-only
        // Gemma4ForCausalLM writes `model.*`.
        let prefix = if ckpt.contains("model.language_model.embed_tokens.weight") {
            "model.language_model"
        } else {
            "model"
        };
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed_name = format!("{prefix}.embed_tokens.weight");
        let embed_dtype = ckpt.dtype(&embed_name);
        let embed = ckpt.float_data(&embed_name, &[v, h])?;
        let embed_scale = round_to_dtype((h as f32).sqrt(), embed_dtype);
        if !cfg.tie_word_embeddings {
            return Err(LoadError::unsupported(
                "tie_word_embeddings",
                "untied lm_head is not supported (Gemma 4 ties it)",
            ));
        }
        if ckpt.contains("lm_head.weight") {
            return Err(LoadError::unsupported(
                "lm_head.weight",
                "the config ties embeddings but the checkpoint has an lm_head tensor",
            ));
        }

        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for (i, lc) in cfg.layers.iter().enumerate() {
            let p = format!("{prefix}.layers.{i}");
            let (nh, nkv, d) = (cfg.num_attention_heads, lc.num_key_value_heads, lc.head_dim);
            let a = format!("{p}.self_attn");
            // FP8 KV-cache scales (kv_cache_quant_algo FP8), used by an fp8 pool only: a bf16
            // cache is the accurate default.
            let kv_scales = KvScales {
                k: load_kv_scale(ckpt, &a, "k")?,
                v: load_kv_scale(ckpt, &a, "v")?,
            };
            let self_attn = Attention {
                q_proj: load_linear(ckpt, &format!("{a}.q_proj"), nh * d, h, device)?,
                k_proj: load_linear(ckpt, &format!("{a}.k_proj"), nkv * d, h, device)?,
                v_proj: if lc.has_v_proj {
                    Some(load_linear(
                        ckpt,
                        &format!("{a}.v_proj"),
                        nkv * d,
                        h,
                        device,
                    )?)
                } else {
                    None
                },
                o_proj: load_linear(ckpt, &format!("{a}.o_proj"), h, nh * d, device)?,
                q_norm: load_norm(ckpt, &format!("{a}.q_norm"), d, cfg.rms_norm_eps, device)?,
                k_norm: load_norm(ckpt, &format!("{a}.k_norm"), d, cfg.rms_norm_eps, device)?,
                v_norm: RmsNorm::new(None, cfg.rms_norm_eps),
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: d,
                sliding_window: (lc.kind == LayerKind::Sliding).then_some(cfg.sliding_window),
                rope: Rope::new(&lc.rope, d),
                kv_scales,
            };
            if !lc.has_v_proj && ckpt.contains(&format!("{a}.v_proj.weight")) {
                return Err(LoadError::config(
                    format!("{a}.v_proj.weight"),
                    "present, but attention_k_eq_v says full layers take V from k_proj",
                ));
            }
            let m = format!("{p}.mlp");
            let i_size = cfg.intermediate_size;
            let mlp = Mlp {
                gate_proj: load_linear(ckpt, &format!("{m}.gate_proj"), i_size, h, device)?,
                up_proj: load_linear(ckpt, &format!("{m}.up_proj"), i_size, h, device)?,
                down_proj: load_linear(ckpt, &format!("{m}.down_proj"), h, i_size, device)?,
            };
            let eps = cfg.rms_norm_eps;
            layers.push(DecoderLayer {
                self_attn,
                mlp,
                input_layernorm: load_norm(ckpt, &format!("{p}.input_layernorm"), h, eps, device)?,
                post_attention_layernorm: load_norm(
                    ckpt,
                    &format!("{p}.post_attention_layernorm"),
                    h,
                    eps,
                    device,
                )?,
                pre_feedforward_layernorm: load_norm(
                    ckpt,
                    &format!("{p}.pre_feedforward_layernorm"),
                    h,
                    eps,
                    device,
                )?,
                post_feedforward_layernorm: load_norm(
                    ckpt,
                    &format!("{p}.post_feedforward_layernorm"),
                    h,
                    eps,
                    device,
                )?,
                layer_scalar: ckpt.scalar(&format!("{p}.layer_scalar"))?,
            });
        }
        let norm = load_norm(ckpt, &format!("{prefix}.norm"), h, cfg.rms_norm_eps, device)?;
        Ok(TextModel {
            embed_tokens: Param::from_tensor(Tensor::from_data(embed, device)),
            layers,
            norm,
            embed_scale,
            final_logit_softcapping: cfg.final_logit_softcapping.map(|c| c as f32),
            vocab_size: v,
            hidden_size: h,
            placeholder_ids: vec![],
            pad_token_id: 0,
            image_token_id: None,
        })
    }

    /// Number of NVFP4 and dense linears (for the load report).
    pub fn linear_counts(&self) -> (usize, usize) {
        let mut all = vec![];
        for l in &self.layers {
            let a = &l.self_attn;
            all.extend([
                &a.q_proj,
                &a.k_proj,
                &a.o_proj,
                &l.mlp.gate_proj,
                &l.mlp.up_proj,
                &l.mlp.down_proj,
            ]);
            if let Some(v) = &a.v_proj {
                all.push(v);
            }
        }
        let q = all.iter().filter(|l| l.is_nvfp4()).count();
        (q, all.len() - q)
    }
}

/// One step's RoPE tables by layer kind (every layer of a kind shares its `Rope`).
struct StepRopes<B: Gemma4Backend>(Vec<(LayerKind, RopeTables<B>)>);

impl<B: Gemma4Backend> StepRopes<B> {
    fn get(&self, kind: LayerKind) -> &RopeTables<B> {
        &self
            .0
            .iter()
            .find(|(k, _)| *k == kind)
            .expect("step_ropes covers every layer kind")
            .1
    }
}

/// The runs of consecutive `image_token_id` in `tokens` (one image each), as index ranges.
pub fn image_runs(tokens: &[u32], image_token_id: u32) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i] == image_token_id {
            let start = i;
            while i < tokens.len() && tokens[i] == image_token_id {
                i += 1;
            }
            runs.push(start..i);
        } else {
            i += 1;
        }
    }
    runs
}

fn round_to_dtype(x: f32, dtype: Option<Dtype>) -> f32 {
    match dtype {
        Some(Dtype::BF16) => half::bf16::from_f32(x).to_f32(),
        Some(Dtype::F16) => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

pub fn load_norm<B: Gemma4Backend>(
    ckpt: &mut Checkpoint,
    prefix: &str,
    dim: usize,
    eps: f64,
    device: &B::Device,
) -> Result<RmsNorm<B>, LoadError> {
    let w = ckpt.float_data(&format!("{prefix}.weight"), &[dim])?;
    Ok(RmsNorm::new(Some(Tensor::from_data(w, device)), eps))
}

/// A `[rows, cols]` float tensor's data transposed to `[cols, rows]`, in its own dtype.
fn transpose_data(data: TensorData, rows: usize, cols: usize) -> TensorData {
    let dtype = data.dtype;
    let bytes = data.as_bytes();
    let out: Vec<u8> = match dtype.size() {
        2 => {
            let a: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            transpose(&a, rows, cols)
                .into_iter()
                .flat_map(u16::to_le_bytes)
                .collect()
        }
        _ => {
            let a: Vec<u32> = bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            transpose(&a, rows, cols)
                .into_iter()
                .flat_map(u32::to_le_bytes)
                .collect()
        }
    };
    TensorData::from_bytes_vec(out, [cols, rows], dtype)
}

/// `a` `[rows, cols]` row-major, transposed to `[cols, rows]`, in 32 × 32 tiles (cache-friendly
/// for the 31B's large matrices).
fn transpose<T: Copy + Default>(a: &[T], rows: usize, cols: usize) -> Vec<T> {
    const TILE: usize = 32;
    let mut t = vec![T::default(); a.len()];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    t[c * rows + r] = a[r * cols + c];
                }
            }
        }
    }
    t
}

/// One of a layer's FP8 KV-cache scales (`which` "k" or "v"): ModelOpt writes
/// `self_attn.k_proj.k_scale` / `self_attn.v_proj.v_scale` (also on k_eq_v layers without a
/// v_proj), other exporters `self_attn.k_scale`; vLLM reads either. None present: 1.0, as vLLM.
fn load_kv_scale(ckpt: &mut Checkpoint, attn: &str, which: &str) -> Result<f32, LoadError> {
    let names = [
        format!("{attn}.{which}_proj.{which}_scale"),
        format!("{attn}.{which}_scale"),
    ];
    let present: Vec<&String> = names.iter().filter(|n| ckpt.contains(n)).collect();
    let name = match present.as_slice() {
        [] => return Ok(1.0),
        [one] => *one,
        _ => {
            return Err(LoadError::BadValue {
                name: names[0].clone(),
                msg: format!(
                    "the checkpoint also has `{}`: two scales for one cache",
                    names[1]
                ),
            })
        }
    };
    let scale = ckpt.scalar(name)?;
    if !(scale.is_finite() && scale > 0.0) {
        return Err(LoadError::BadValue {
            name: name.clone(),
            msg: format!("a KV-cache scale must be finite and positive, not {scale}"),
        });
    }
    Ok(scale)
}

/// A linear `prefix` with weight [out, in]: NVFP4 when `weight` is U8 and `weight_scale` exists.
pub fn load_linear<B: Gemma4Backend>(
    ckpt: &mut Checkpoint,
    prefix: &str,
    out: usize,
    inp: usize,
    device: &B::Device,
) -> Result<Linear<B>, LoadError> {
    let wname = format!("{prefix}.weight");
    let sname = format!("{prefix}.weight_scale");
    let is_nvfp4 = ckpt.dtype(&wname) == Some(Dtype::U8) && ckpt.contains(&sname);
    if !is_nvfp4 {
        if ckpt.dtype(&wname) == Some(Dtype::U8) {
            return Err(LoadError::MissingTensor { name: sname });
        }
        let w = ckpt.float_data(&wname, &[out, inp])?;
        // Stored transposed and contiguous ([in, out]) so the forward is x · w with rows of w
        // along the outputs (what the CPU dense kernel streams; a transposed view is strided).
        let w = Tensor::<B, 2>::from_data(transpose_data(w, out, inp), device);
        return Ok(Linear::Dense(Param::from_tensor(w)));
    }
    if !inp.is_multiple_of(GROUP_SIZE) {
        return Err(LoadError::Shape {
            name: wname,
            expected: vec![out, inp / 2],
            found: vec![out, inp],
        });
    }
    let global = ckpt.scalar(&format!("{prefix}.weight_scale_2"))?;
    ckpt.skip(&format!("{prefix}.input_scale")); // W4A4 only; Hopper runs W4A16.
    let scale = {
        let s = ckpt.raw(&sname)?;
        if s.dtype != Dtype::F8_E4M3 {
            return Err(LoadError::Dtype {
                name: sname,
                expected: "F8_E4M3".into(),
                found: dtype_name(s.dtype),
            });
        }
        check_shape(&s, &[out, inp / GROUP_SIZE])?;
        // 0x7f / 0xff are E4M3's NaN: a checkpoint holding one is corrupt.
        if let Some(i) = s.bytes.iter().position(|b| b & 0x7f == 0x7f) {
            return Err(LoadError::BadValue {
                name: sname,
                msg: format!("NaN block scale at flat index {i}"),
            });
        }
        s.bytes.to_vec()
    };
    if !global.is_finite() {
        return Err(LoadError::BadValue {
            name: format!("{prefix}.weight_scale_2"),
            msg: format!("non-finite global scale {global}"),
        });
    }
    let w = ckpt.raw(&wname)?;
    check_shape(&w, &[out, inp / 2])?;
    let packed = PackedNvfp4::from_checkpoint(w.bytes, &scale, global, out, inp);
    ckpt.nvfp4_bytes += (packed.codes.len() + packed.scales.len()) * 4;
    Ok(Linear::Nvfp4(packed.to_device(device)))
}
