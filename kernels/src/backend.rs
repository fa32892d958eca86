//! The operations the model asks of its backend, beyond Burn's: each has a plain-tensor-ops
//! default (the reference), and the backends with fast kernels override it. The model is
//! generic over `B: Gemma4Backend`, so one model serves the CPU reference, wgpu and CUDA.

use burn::backend::NdArray;
use burn::prelude::*;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement};

use crate::attention::fp8::{self, KvScales};
use crate::attention::{self, flash, kv_write as kv_cube, reference, AttentionParams, PagedBatch};
use crate::fused::{cpu as fused_cpu, cube as fused, reference as fused_ref};
use crate::nvfp4::{cpu as nvfp4_cpu, Nvfp4Weight};
use crate::nvfp4::{gemm as nvfp4_gemm, gemv as nvfp4_gemv};
use crate::topk::{self, TopRows};
use crate::{cpu_dense, fallback};

pub trait Gemma4Backend: Backend {
    /// y = x · Wᵀ for a packed NVFP4 weight; x `[n, in]` -> `[n, out]`.
    fn nvfp4_linear(x: Tensor<Self, 2>, w: &Nvfp4Weight<Self>) -> Tensor<Self, 2> {
        w.forward_reference(x)
    }

    /// q `[t, heads, d]`, k and v `[kv_heads, s, d]` -> `[t, heads · d]` (see [`crate::attention`]).
    fn attention(
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        params: &AttentionParams,
    ) -> Tensor<Self, 2> {
        reference::attention(q, k, v, params)
    }

    /// Paged attention of a step's ragged batch: q `[rows, heads, d]`, this layer's K and V pools
    /// `[kv_heads, slots, d]` -> `[rows, heads · d]` (see [`crate::attention::PagedBatch`]).
    fn paged_attention(
        q: Tensor<Self, 3>,
        k_pool: Tensor<Self, 3>,
        v_pool: Tensor<Self, 3>,
        batch: &PagedBatch,
    ) -> Tensor<Self, 2> {
        reference::paged_attention(q, k_pool, v_pool, batch)
    }

    /// Writes a step's keys or values `new` `[n, kv_heads, d]` into `pool` `[kv_heads, slots, d]`
    /// at `slots` (one per row), in place, and returns the pool.
    fn kv_write(pool: Tensor<Self, 3>, new: Tensor<Self, 3>, slots: &[u32]) -> Tensor<Self, 3> {
        reference::kv_write(pool, new, slots)
    }

    /// Paged attention over fp8 pools `[kv_heads, slots, d / 4]` of packed E4M3 words with
    /// per-tensor `scales` (see [`crate::attention::fp8`]); otherwise as [`Self::paged_attention`].
    fn paged_attention_fp8(
        q: Tensor<Self, 3>,
        k_pool: Tensor<Self, 3, Int>,
        v_pool: Tensor<Self, 3, Int>,
        scales: KvScales,
        batch: &PagedBatch,
    ) -> Tensor<Self, 2> {
        reference::paged_attention_fp8(q, k_pool, v_pool, scales, batch)
    }

    /// Quantizes a step's keys or values `new` `[n, kv_heads, d]` with `scale` into the fp8 pool
    /// `[kv_heads, slots, d / 4]` at `slots`, in place, and returns the pool.
    fn kv_write_fp8(
        pool: Tensor<Self, 3, Int>,
        new: Tensor<Self, 3>,
        slots: &[u32],
        scale: f32,
    ) -> Tensor<Self, 3, Int> {
        fp8::kv_write(pool, new, slots, scale)
    }

    /// x · w for an unquantized weight stored transposed, `[in, out]`; x `[n, in]` -> `[n, out]`.
    fn dense_linear(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        x.matmul(w)
    }

    /// The tied lm_head: h `[n, hidden]` · embedᵀ with embed `[vocab, hidden]` as loaded, read in
    /// place (no transposed copy of the embedding per step) -> `[n, vocab]`. The default is Burn's
    /// matmul over the transposed view, which the CubeCL matmuls read through its strides.
    fn lm_head(h: Tensor<Self, 2>, embed: Tensor<Self, 2>) -> Tensor<Self, 2> {
        h.matmul(embed.transpose())
    }

    /// RMSNorm over the last dimension of x `[rows, dim]` (see [`crate::fused`]).
    fn rms_norm(x: Tensor<Self, 2>, weight: Option<Tensor<Self, 1>>, eps: f64) -> Tensor<Self, 2> {
        fused_ref::rms_norm(x, weight, eps)
    }

    /// `(residual + rms_norm(x) · weight) · scale` (see [`crate::fused`]).
    fn rms_norm_add(
        residual: Tensor<Self, 2>,
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 1>,
        eps: f64,
        scale: f32,
    ) -> Tensor<Self, 2> {
        fused_ref::rms_norm_add(residual, x, weight, eps, scale)
    }

    /// Per-head RMSNorm then rotate-half RoPE: x `[t, heads, d]`, cos/sin `[t, d]`.
    fn rms_norm_rope(
        x: Tensor<Self, 3>,
        weight: Option<Tensor<Self, 1>>,
        eps: f64,
        cos: Tensor<Self, 2>,
        sin: Tensor<Self, 2>,
    ) -> Tensor<Self, 3> {
        fused_ref::rms_norm_rope(x, weight, eps, cos, sin)
    }

    /// `gelu_tanh(gate) · up`, both `[rows, width]`.
    fn gelu_tanh_mul(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        fused_ref::gelu_tanh_mul(gate, up)
    }

    /// The top `k` of each row of logits `[n, vocab]` (descending, equal values lower id first)
    /// and each row's log-sum-exp, on the host (see [`crate::topk`]): what sampling needs, without
    /// copying the rows. `k` must be in `1..=min(vocab, topk::MAX_K)`.
    fn top_k_rows(logits: Tensor<Self, 2>, k: usize) -> TopRows {
        topk::reference(logits, k)
    }
}

/// The CPU backend: the NVFP4 matmul of [`crate::nvfp4::cpu`] and the dense matmuls of
/// [`crate::cpu_dense`] on the tensors' own buffers (no copy of a weight; x is copied only when it
/// is not contiguous), CPU attention and the fused steps. Each call goes through
/// [`fallback::run`]: an input a kernel does not take (a layout or shape the model never makes)
/// panics by default, or runs the reference, counted and logged, under the server's policy.
impl Gemma4Backend for NdArray<f32, i32> {
    /// Selection on the tensor's own buffer (no kernel to refuse: any `k` in `1..=vocab`).
    fn top_k_rows(logits: Tensor<Self, 2>, k: usize) -> TopRows {
        let [_, vocab] = logits.dims();
        with_host(&logits, |rows| topk::select_host(rows, vocab, k))
    }

    fn dense_linear(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        use burn::backend::ndarray::NdArrayTensor;
        use burn::tensor::TensorPrimitive;

        let ([m, inp], [w_in, out]) = (x.dims(), w.dims());
        let device = x.device();
        let kernel = || {
            if inp != w_in {
                return Err(format!("x has {inp} features, the weight {w_in}"));
            }
            let (
                TensorPrimitive::Float(NdArrayTensor::F32(xs)),
                TensorPrimitive::Float(NdArrayTensor::F32(ws)),
            ) = (x.clone().into_primitive(), w.clone().into_primitive())
            else {
                return Err("not f32".to_string());
            };
            let (xv, wv) = (xs.view(), ws.view());
            // The loader's weights are contiguous [in, out].
            let wd = wv.as_slice().ok_or("the weight is not contiguous")?;
            let xd = contiguous(xv.as_slice(), || xv.iter().copied().collect());
            let mut y = vec![0f32; m * out];
            cpu_dense::dense_matmul(&xd, m, wd, inp, out, &mut y);
            Ok(Tensor::from_data(TensorData::new(y, [m, out]), &device))
        };
        fallback::run(
            "cpu_dense",
            || format!("x [{m}, {inp}], weight [{w_in}, {out}]"),
            kernel,
            || x.clone().matmul(w.clone()),
        )
    }

    fn lm_head(h: Tensor<Self, 2>, embed: Tensor<Self, 2>) -> Tensor<Self, 2> {
        let ([m, hidden], [vocab, e_hidden]) = (h.dims(), embed.dims());
        let kernel = || {
            if hidden != e_hidden {
                return Err(format!("h has {hidden} features, the embedding {e_hidden}"));
            }
            let mut y = vec![0f32; m * vocab];
            // The loader's embedding is contiguous [vocab, hidden]: its rows are streamed in place.
            with_host(&h, |hs| {
                with_host(&embed, |es| {
                    cpu_dense::dense_matmul_nt(hs, m, es, vocab, hidden, &mut y)
                })
            });
            Ok(Tensor::from_data(
                TensorData::new(y, [m, vocab]),
                &h.device(),
            ))
        };
        let shape = || format!("h [{m}, {hidden}], embedding [{vocab}, {e_hidden}]");
        fallback::run("cpu_lm_head", shape, kernel, || {
            h.clone().matmul(embed.clone().transpose())
        })
    }

    fn attention(
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        params: &AttentionParams,
    ) -> Tensor<Self, 2> {
        let ([t, heads, d], [kv_heads, s, dk]) = (q.dims(), k.dims());
        let kernel = || {
            if dk != d || v.dims() != k.dims() || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
                return Err("K/V head_dim, shapes or GQA grouping off".to_string());
            }
            let mut out = vec![0f32; t * heads * d];
            with_host(&q, |qs| {
                with_host(&k, |ks| {
                    with_host(&v, |vs| {
                        attention::cpu::attention(
                            qs, ks, vs, t, heads, kv_heads, s, d, params, &mut out,
                        )
                    })
                })
            });
            Ok(Tensor::from_data(
                TensorData::new(out, [t, heads * d]),
                &q.device(),
            ))
        };
        let shape = || format!("q {:?}, k {:?}, v {:?}", q.dims(), k.dims(), v.dims());
        fallback::run("cpu_attention", shape, kernel, || {
            reference::attention(q.clone(), k.clone(), v.clone(), params)
        })
    }

    fn paged_attention(
        q: Tensor<Self, 3>,
        k_pool: Tensor<Self, 3>,
        v_pool: Tensor<Self, 3>,
        batch: &PagedBatch,
    ) -> Tensor<Self, 2> {
        let ([rows, heads, d], [kv_heads, slots, dk]) = (q.dims(), k_pool.dims());
        let kernel = || {
            if dk != d || v_pool.dims() != k_pool.dims() || kv_heads == 0 {
                return Err("K/V head_dim or pool shapes off".to_string());
            }
            check_paged(heads, kv_heads, rows, slots, batch)?;
            let mut out = vec![0f32; rows * heads * d];
            with_host(&q, |qs| {
                with_host(&k_pool, |ks| {
                    with_host(&v_pool, |vs| {
                        attention::cpu::paged_attention(
                            qs, ks, vs, heads, kv_heads, slots, d, batch, &mut out,
                        )
                    })
                })
            });
            Ok(Tensor::from_data(
                TensorData::new(out, [rows, heads * d]),
                &q.device(),
            ))
        };
        let shape = || format!("q {:?}, pools {:?}", q.dims(), k_pool.dims());
        fallback::run("cpu_paged_attention", shape, kernel, || {
            reference::paged_attention(q.clone(), k_pool.clone(), v_pool.clone(), batch)
        })
    }

    /// Rows copied straight into the pool's buffer (no copy of the pool: its buffer is not
    /// shared while the cache owns it; ndarray copies it first if it is).
    fn kv_write(pool: Tensor<Self, 3>, new: Tensor<Self, 3>, slots: &[u32]) -> Tensor<Self, 3> {
        use burn::backend::ndarray::NdArrayTensor;
        use burn::tensor::TensorPrimitive;
        let ([n, kv_heads, d], [pkv, pslots, pd]) = (new.dims(), pool.dims());
        let fits = n == slots.len()
            && (kv_heads, d) == (pkv, pd)
            && slots.iter().all(|&s| (s as usize) < pslots);
        if !fits {
            panic!(
                "kv_write: rows {:?} into pool {:?} at {} slots",
                new.dims(),
                pool.dims(),
                slots.len()
            );
        }
        let TensorPrimitive::Float(NdArrayTensor::F32(mut storage)) = pool.into_primitive() else {
            panic!("kv_write: the CPU pool is f32");
        };
        let buffer = storage
            .ensure_owned()
            .as_slice_mut()
            .expect("the pool is a contiguous [kv_heads, slots, d] buffer");
        with_host(&new, |rows| {
            for (i, &slot) in slots.iter().enumerate() {
                for h in 0..kv_heads {
                    let at = (h * pslots + slot as usize) * d;
                    buffer[at..at + d].copy_from_slice(&rows[(i * kv_heads + h) * d..][..d]);
                }
            }
        });
        Tensor::from_primitive(TensorPrimitive::Float(NdArrayTensor::F32(storage)))
    }

    fn paged_attention_fp8(
        q: Tensor<Self, 3>,
        k_pool: Tensor<Self, 3, Int>,
        v_pool: Tensor<Self, 3, Int>,
        scales: KvScales,
        batch: &PagedBatch,
    ) -> Tensor<Self, 2> {
        let ([rows, heads, d], [kv_heads, slots, w]) = (q.dims(), k_pool.dims());
        let kernel = || {
            if let Some(why) = fp8::check_head_dim(d) {
                return Err(why);
            }
            if w * fp8::PER_WORD != d || v_pool.dims() != k_pool.dims() || kv_heads == 0 {
                return Err("K/V words per row or pool shapes off".to_string());
            }
            check_paged(heads, kv_heads, rows, slots, batch)?;
            let mut out = vec![0f32; rows * heads * d];
            with_host(&q, |qs| {
                with_host_int(&k_pool, |ks| {
                    with_host_int(&v_pool, |vs| {
                        attention::cpu::paged_attention_fp8(
                            qs, ks, vs, scales, heads, kv_heads, slots, d, batch, &mut out,
                        )
                    })
                })
            });
            Ok(Tensor::from_data(
                TensorData::new(out, [rows, heads * d]),
                &q.device(),
            ))
        };
        let shape = || format!("q {:?}, fp8 pools {:?}", q.dims(), k_pool.dims());
        fallback::run("cpu_paged_attention_fp8", shape, kernel, || {
            reference::paged_attention_fp8(q.clone(), k_pool.clone(), v_pool.clone(), scales, batch)
        })
    }

    /// Rows quantized straight into the pool's words (in place, as [`Self::kv_write`]).
    fn kv_write_fp8(
        pool: Tensor<Self, 3, Int>,
        new: Tensor<Self, 3>,
        slots: &[u32],
        scale: f32,
    ) -> Tensor<Self, 3, Int> {
        use burn::backend::ndarray::NdArrayTensor;
        let ([n, kv_heads, d], [pkv, pslots, pw]) = (new.dims(), pool.dims());
        let shape = || {
            format!(
                "rows [{n}, {kv_heads}, {d}] into fp8 pool [{pkv}, {pslots}, {pw}] at {} slots",
                slots.len()
            )
        };
        let pool = std::cell::RefCell::new(Some(pool));
        let take = || {
            pool.borrow_mut()
                .take()
                .expect("kv_write_fp8: the pool is taken once")
        };
        let kernel = || {
            if let Some(why) = fp8::check_head_dim(d) {
                return Err(why);
            }
            let fits = n == slots.len()
                && (kv_heads, d) == (pkv, pw * fp8::PER_WORD)
                && slots.iter().all(|&s| (s as usize) < pslots);
            if !fits {
                return Err("rows, heads, head_dim or slots do not fit the pool".to_string());
            }
            let mut storage = match take().into_primitive() {
                NdArrayTensor::I32(storage) => storage,
                other => {
                    *pool.borrow_mut() = Some(Tensor::from_primitive(other));
                    return Err("the pool is not i32 words".to_string());
                }
            };
            let buffer = storage
                .ensure_owned()
                .as_slice_mut()
                .expect("the pool is a contiguous [kv_heads, slots, d / 4] buffer");
            let inv = 1.0 / scale;
            with_host(&new, |rows| {
                for (i, &slot) in slots.iter().enumerate() {
                    for h in 0..kv_heads {
                        let at = (h * pslots + slot as usize) * pw;
                        let row = &rows[(i * kv_heads + h) * d..][..d];
                        fp8::quantize_row(row, inv, &mut buffer[at..at + pw]);
                    }
                }
            });
            Ok(Tensor::from_primitive(NdArrayTensor::I32(storage)))
        };
        fallback::run("cpu_kv_write_fp8", shape, kernel, || {
            fp8::kv_write(take(), new.clone(), slots, scale)
        })
    }

    // The fused steps as single passes over the rows (see `fused::cpu`).
    fn rms_norm(x: Tensor<Self, 2>, weight: Option<Tensor<Self, 1>>, eps: f64) -> Tensor<Self, 2> {
        let [rows, dim] = x.dims();
        if rows * dim == 0 {
            return x;
        }
        let kernel = || {
            if weight.as_ref().is_some_and(|w| w.dims() != [dim]) {
                return Err("weight length is not the row length".to_string());
            }
            let mut out = vec![0f32; rows * dim];
            with_host(&x, |xs| {
                with_host_opt(weight.as_ref(), |ws| {
                    fused_cpu::rms_norm(xs, dim, ws, eps, None, &mut out)
                })
            });
            Ok(Tensor::from_data(
                TensorData::new(out, [rows, dim]),
                &x.device(),
            ))
        };
        let shape = || {
            format!(
                "x [{rows}, {dim}], weight {:?}",
                weight.as_ref().map(|w| w.dims())
            )
        };
        fallback::run("cpu_rms_norm", shape, kernel, || {
            fused_ref::rms_norm(x.clone(), weight.clone(), eps)
        })
    }

    fn rms_norm_add(
        residual: Tensor<Self, 2>,
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 1>,
        eps: f64,
        scale: f32,
    ) -> Tensor<Self, 2> {
        let [rows, dim] = x.dims();
        if rows * dim == 0 {
            return residual;
        }
        let kernel = || {
            if residual.dims() != x.dims() || weight.dims() != [dim] {
                return Err("residual, x and weight shapes differ".to_string());
            }
            let mut out = vec![0f32; rows * dim];
            with_host(&x, |xs| {
                with_host(&weight, |ws| {
                    with_host(&residual, |hs| {
                        fused_cpu::rms_norm(xs, dim, Some(ws), eps, Some((hs, scale)), &mut out)
                    })
                })
            });
            Ok(Tensor::from_data(
                TensorData::new(out, [rows, dim]),
                &x.device(),
            ))
        };
        let shape = || {
            format!(
                "residual {:?}, x [{rows}, {dim}], weight {:?}",
                residual.dims(),
                weight.dims()
            )
        };
        fallback::run("cpu_rms_norm_add", shape, kernel, || {
            fused_ref::rms_norm_add(residual.clone(), x.clone(), weight.clone(), eps, scale)
        })
    }

    fn rms_norm_rope(
        x: Tensor<Self, 3>,
        weight: Option<Tensor<Self, 1>>,
        eps: f64,
        cos: Tensor<Self, 2>,
        sin: Tensor<Self, 2>,
    ) -> Tensor<Self, 3> {
        let [t, heads, d] = x.dims();
        if t * heads * d == 0 {
            return x;
        }
        let kernel = || {
            if d % 2 != 0
                || cos.dims() != [t, d]
                || sin.dims() != [t, d]
                || weight.as_ref().is_some_and(|w| w.dims() != [d])
            {
                return Err("odd head_dim, or cos/sin/weight not [t, d]/[d]".to_string());
            }
            let mut out = vec![0f32; t * heads * d];
            with_host(&x, |xs| {
                with_host(&cos, |cs| {
                    with_host(&sin, |ss| {
                        with_host_opt(weight.as_ref(), |ws| {
                            fused_cpu::rms_norm_rope(xs, heads, d, ws, eps, cs, ss, &mut out)
                        })
                    })
                })
            });
            Ok(Tensor::from_data(
                TensorData::new(out, [t, heads, d]),
                &x.device(),
            ))
        };
        let shape = || {
            format!(
                "x [{t}, {heads}, {d}], cos {:?}, sin {:?}",
                cos.dims(),
                sin.dims()
            )
        };
        fallback::run("cpu_rms_norm_rope", shape, kernel, || {
            fused_ref::rms_norm_rope(x.clone(), weight.clone(), eps, cos.clone(), sin.clone())
        })
    }

    fn gelu_tanh_mul(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        let dims = gate.dims();
        let kernel = || {
            if up.dims() != dims {
                return Err("gate and up differ in shape".to_string());
            }
            let mut out = vec![0f32; dims[0] * dims[1]];
            with_host(&gate, |gs| {
                with_host(&up, |us| fused_cpu::gelu_tanh_mul(gs, us, &mut out))
            });
            Ok(Tensor::from_data(
                TensorData::new(out, dims),
                &gate.device(),
            ))
        };
        let shape = || format!("gate {dims:?}, up {:?}", up.dims());
        fallback::run("cpu_gelu_tanh_mul", shape, kernel, || {
            fused_ref::gelu_tanh_mul(gate.clone(), up.clone())
        })
    }

    fn nvfp4_linear(x: Tensor<Self, 2>, w: &Nvfp4Weight<Self>) -> Tensor<Self, 2> {
        use burn::backend::ndarray::NdArrayTensor;
        use burn::tensor::TensorPrimitive;

        let [m, inp] = x.dims();
        let device = x.device();
        let kernel = || {
            if inp != w.in_features {
                return Err(format!(
                    "x has {inp} features, the weight {}",
                    w.in_features
                ));
            }
            // Cloning a tensor clones an Arc; the views below borrow the shared buffers.
            let (
                TensorPrimitive::Float(NdArrayTensor::F32(xs)),
                NdArrayTensor::I32(cs),
                NdArrayTensor::I32(ss),
            ) = (
                x.clone().into_primitive(),
                w.codes.clone().into_primitive(),
                w.scales.clone().into_primitive(),
            )
            else {
                return Err("not f32 activations with i32 words".to_string());
            };
            let (xv, cv, sv) = (xs.view(), cs.view(), ss.view());
            // Weights the loader built are contiguous.
            let (Some(codes), Some(scales)) = (cv.as_slice(), sv.as_slice()) else {
                return Err("the packed weight is not contiguous".to_string());
            };
            let xd = contiguous(xv.as_slice(), || xv.iter().copied().collect());
            let mut y = vec![0f32; m * w.out_features];
            nvfp4_cpu::nvfp4_matmul(
                &xd,
                m,
                codes,
                scales,
                w.global_scale,
                w.out_features,
                w.in_features,
                &mut y,
            );
            Ok(Tensor::from_data(
                TensorData::new(y, [m, w.out_features]),
                &device,
            ))
        };
        let shape = || {
            format!(
                "x [{m}, {inp}], weight [{}, {}]",
                w.out_features, w.in_features
            )
        };
        fallback::run("cpu_nvfp4", shape, kernel, || {
            w.forward_reference(x.clone())
        })
    }
}

/// What the CPU paged kernels (float and fp8) ask of a batch beyond the pools' shapes: whole GQA
/// groups, q's rows those of the batch, and block tables inside the pool's `slots`.
fn check_paged(
    heads: usize,
    kv_heads: usize,
    rows: usize,
    slots: usize,
    batch: &PagedBatch,
) -> Result<(), String> {
    if !heads.is_multiple_of(kv_heads) || rows != batch.rows() {
        return Err(format!(
            "GQA grouping or rows ({} in the batch) off",
            batch.rows()
        ));
    }
    batch.check(slots).map_or(Ok(()), Err)
}

/// [`with_host`] for an optional tensor (a norm's weight).
fn with_host_opt<const D: usize, R>(
    t: Option<&Tensor<NdArray<f32, i32>, D>>,
    f: impl FnOnce(Option<&[f32]>) -> R,
) -> R {
    match t {
        Some(t) => with_host(t, |s| f(Some(s))),
        None => f(None),
    }
}

/// Runs `f` on an ndarray tensor's f32 elements in row-major order: its own buffer when it is
/// contiguous, else a copy.
fn with_host<const D: usize, R>(
    t: &Tensor<NdArray<f32, i32>, D>,
    f: impl FnOnce(&[f32]) -> R,
) -> R {
    use burn::backend::ndarray::NdArrayTensor;
    use burn::tensor::TensorPrimitive;
    match t.clone().into_primitive() {
        TensorPrimitive::Float(NdArrayTensor::F32(a)) => {
            let v = a.view();
            f(&contiguous(v.as_slice(), || v.iter().copied().collect()))
        }
        _ => f(&t
            .clone()
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .unwrap_or_default()),
    }
}

/// Runs `f` on an ndarray int tensor's i32 elements in row-major order (its own buffer when
/// contiguous, else a copy).
fn with_host_int<const D: usize, R>(
    t: &Tensor<NdArray<f32, i32>, D, Int>,
    f: impl FnOnce(&[i32]) -> R,
) -> R {
    use burn::backend::ndarray::NdArrayTensor;
    match t.clone().into_primitive() {
        NdArrayTensor::I32(a) => {
            let v = a.view();
            match v.as_slice() {
                Some(s) => f(s),
                None => f(&v.iter().copied().collect::<Vec<i32>>()),
            }
        }
        _ => f(&t
            .clone()
            .into_data()
            .convert::<i32>()
            .to_vec::<i32>()
            .unwrap_or_default()),
    }
}

/// An ndarray view's elements in row-major order: its slice when it is contiguous, else a copy.
fn contiguous<'a>(
    slice: Option<&'a [f32]>,
    copy: impl FnOnce() -> Vec<f32>,
) -> std::borrow::Cow<'a, [f32]> {
    match slice {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(copy()),
    }
}

/// wgpu and CUDA, any float element (f32, f16, bf16; the kernels accumulate in f32): the CubeCL
/// kernels, each call through [`fallback::run`], so a refusal panics (the default
/// [`fallback::Policy::Strict`]) or, under [`fallback::Policy::Warn`], runs the reference and is
/// counted and logged.
impl<R: CubeRuntime, F: FloatElement, BT: BoolElement> Gemma4Backend
    for CubeBackend<R, F, i32, BT>
{
    /// The kernel of [`topk::top_k_rows`]: one launch, and `n · (2k + 1)` words read back.
    fn top_k_rows(logits: Tensor<Self, 2>, k: usize) -> TopRows {
        let dims = logits.dims();
        fallback::run(
            "top_k",
            || format!("logits {dims:?}, k {k}"),
            || topk::top_k_rows(logits.clone(), k),
            || topk::reference(logits.clone(), k),
        )
    }

    fn nvfp4_linear(x: Tensor<Self, 2>, w: &Nvfp4Weight<Self>) -> Tensor<Self, 2> {
        // Decode rows: the GEMV (codes decoded in registers); prefill: the tiled GEMM (weight
        // tiles decoded into shared memory). Both read the loader's packed words as they are.
        let x_dims = x.dims();
        let shape = || {
            format!(
                "x {x_dims:?}, weight [{}, {}]",
                w.out_features, w.in_features
            )
        };
        let (codes, scales) = (w.codes.clone(), w.scales.clone());
        if x_dims[0] <= nvfp4_gemv::MAX_M {
            fallback::run(
                "nvfp4_gemv",
                shape,
                || {
                    nvfp4_gemv::nvfp4_matmul(
                        x.clone(),
                        codes,
                        scales,
                        w.global_scale,
                        w.out_features,
                        w.in_features,
                    )
                },
                || w.forward_reference(x.clone()),
            )
        } else {
            fallback::run(
                "nvfp4_gemm",
                shape,
                || {
                    nvfp4_gemm::nvfp4_gemm(
                        x.clone(),
                        codes,
                        scales,
                        w.global_scale,
                        w.out_features,
                        w.in_features,
                    )
                },
                || w.forward_reference(x.clone()),
            )
        }
    }

    fn attention(
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        params: &AttentionParams,
    ) -> Tensor<Self, 2> {
        // Every refusal (shape or limit outside the kernel's) happens before a launch.
        let shape = || {
            format!(
                "q {:?}, k {:?}, v {:?}, {params:?}",
                q.dims(),
                k.dims(),
                v.dims()
            )
        };
        fallback::run(
            "flash_attention",
            shape,
            || flash::fused_attention(q.clone(), k.clone(), v.clone(), params),
            || reference::attention(q.clone(), k.clone(), v.clone(), params),
        )
    }

    /// The paged kernel: one launch for the whole ragged batch, keys read through the block
    /// tables (see [`flash::paged_attention`]).
    fn paged_attention(
        q: Tensor<Self, 3>,
        k_pool: Tensor<Self, 3>,
        v_pool: Tensor<Self, 3>,
        batch: &PagedBatch,
    ) -> Tensor<Self, 2> {
        let shape = || {
            format!(
                "q {:?}, pools {:?}, block_size {}, sequences (rows, keys) {:?}",
                q.dims(),
                k_pool.dims(),
                batch.block_size,
                batch
                    .seqs
                    .iter()
                    .map(|s| (s.rows.clone(), s.keys))
                    .collect::<Vec<_>>()
            )
        };
        fallback::run(
            "paged_attention",
            shape,
            || flash::paged_attention(q.clone(), k_pool.clone(), v_pool.clone(), batch),
            || reference::paged_attention(q.clone(), k_pool.clone(), v_pool.clone(), batch),
        )
    }

    /// The scatter kernel, in place when the pool's buffer is not shared (see
    /// [`kv_cube::kv_write`]). The pool moves into whichever path runs, so an exclusively owned
    /// pool stays exclusively owned.
    fn kv_write(pool: Tensor<Self, 3>, new: Tensor<Self, 3>, slots: &[u32]) -> Tensor<Self, 3> {
        let (pool_dims, new_dims) = (pool.dims(), new.dims());
        let shape = || {
            format!(
                "rows {new_dims:?} into pool {pool_dims:?} at {} slots",
                slots.len()
            )
        };
        let pool = std::cell::RefCell::new(Some(pool));
        let take = || {
            pool.borrow_mut()
                .take()
                .expect("kv_write: the pool is taken once")
        };
        fallback::run(
            "kv_write",
            shape,
            || {
                let checked = kv_cube::kv_write_check(
                    pool.borrow().as_ref().expect("kv_write: the pool is here"),
                    &new,
                    slots,
                );
                checked.and_then(|()| kv_cube::kv_write(take(), new.clone(), slots))
            },
            || reference::kv_write(take(), new.clone(), slots),
        )
    }

    /// The paged flash kernel decoding the fp8 pools as it stages K/V (see
    /// [`flash::paged_attention_fp8`]).
    fn paged_attention_fp8(
        q: Tensor<Self, 3>,
        k_pool: Tensor<Self, 3, Int>,
        v_pool: Tensor<Self, 3, Int>,
        scales: KvScales,
        batch: &PagedBatch,
    ) -> Tensor<Self, 2> {
        let shape = || format!("q {:?}, fp8 pools {:?}", q.dims(), k_pool.dims());
        fallback::run(
            "paged_attention_fp8",
            shape,
            || flash::paged_attention_fp8(q.clone(), k_pool.clone(), v_pool.clone(), scales, batch),
            || {
                reference::paged_attention_fp8(
                    q.clone(),
                    k_pool.clone(),
                    v_pool.clone(),
                    scales,
                    batch,
                )
            },
        )
    }

    fn kv_write_fp8(
        pool: Tensor<Self, 3, Int>,
        new: Tensor<Self, 3>,
        slots: &[u32],
        scale: f32,
    ) -> Tensor<Self, 3, Int> {
        let (new_dims, pool_dims) = (new.dims(), pool.dims());
        let shape = || format!("rows {new_dims:?} into fp8 pool {pool_dims:?}");
        let pool = std::cell::RefCell::new(Some(pool));
        let take = || {
            pool.borrow_mut()
                .take()
                .expect("kv_write_fp8: the pool is taken once")
        };
        fallback::run(
            "kv_write_fp8",
            shape,
            || {
                // Checked before the pool is taken: a refusal leaves it to the reference.
                let checked = kv_cube::kv_write_fp8_check(
                    pool.borrow()
                        .as_ref()
                        .expect("kv_write_fp8: the pool is here"),
                    &new,
                    slots,
                );
                checked.and_then(|()| kv_cube::kv_write_fp8(take(), new.clone(), slots, scale))
            },
            || fp8::kv_write(take(), new.clone(), slots, scale),
        )
    }

    // The fused steps: one kernel each instead of a chain of element-wise launches.
    fn rms_norm(x: Tensor<Self, 2>, weight: Option<Tensor<Self, 1>>, eps: f64) -> Tensor<Self, 2> {
        let shape = || {
            format!(
                "x {:?}, weight {:?}",
                x.dims(),
                weight.as_ref().map(|w| w.dims())
            )
        };
        fallback::run(
            "rms_norm",
            shape,
            || fused::rms_norm(x.clone(), weight.clone(), eps, None),
            || fused_ref::rms_norm(x.clone(), weight.clone(), eps),
        )
    }

    fn rms_norm_add(
        residual: Tensor<Self, 2>,
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 1>,
        eps: f64,
        scale: f32,
    ) -> Tensor<Self, 2> {
        let shape = || {
            format!(
                "residual {:?}, x {:?}, weight {:?}",
                residual.dims(),
                x.dims(),
                weight.dims()
            )
        };
        fallback::run(
            "rms_norm_add",
            shape,
            || {
                fused::rms_norm_add(
                    residual.clone(),
                    x.clone(),
                    weight.clone(),
                    eps,
                    scale,
                    None,
                )
            },
            || fused_ref::rms_norm_add(residual.clone(), x.clone(), weight.clone(), eps, scale),
        )
    }

    fn rms_norm_rope(
        x: Tensor<Self, 3>,
        weight: Option<Tensor<Self, 1>>,
        eps: f64,
        cos: Tensor<Self, 2>,
        sin: Tensor<Self, 2>,
    ) -> Tensor<Self, 3> {
        let shape = || {
            format!(
                "x {:?}, weight {:?}, cos {:?}, sin {:?}",
                x.dims(),
                weight.as_ref().map(|w| w.dims()),
                cos.dims(),
                sin.dims()
            )
        };
        fallback::run(
            "rms_norm_rope",
            shape,
            || {
                fused::rms_norm_rope(
                    x.clone(),
                    weight.clone(),
                    eps,
                    cos.clone(),
                    sin.clone(),
                    None,
                )
            },
            || fused_ref::rms_norm_rope(x.clone(), weight.clone(), eps, cos.clone(), sin.clone()),
        )
    }

    fn gelu_tanh_mul(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        let shape = || format!("gate {:?}, up {:?}", gate.dims(), up.dims());
        fallback::run(
            "gelu_tanh_mul",
            shape,
            || fused::gelu_tanh_mul(gate.clone(), up.clone(), None),
            || fused_ref::gelu_tanh_mul(gate.clone(), up.clone()),
        )
    }
}
