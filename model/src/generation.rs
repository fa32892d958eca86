//! Generation: prefill, then one token at a time through the KV cache; greedy or seeded sampling
//! (temperature, top-k, top-p, min-p); stops on eos ids.

use crate::Gemma4Backend;

use crate::error::RunError;
use crate::text_model::{Logits, TextModel};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables top-p.
    pub top_p: f32,
    /// 0.0 disables min-p.
    pub min_p: f32,
    pub seed: u64,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<(), RunError> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(RunError::Sampling {
                field: "temperature",
                msg: format!("{} must be >= 0", self.temperature),
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(RunError::Sampling {
                field: "top_p",
                msg: format!("{} must be in (0, 1]", self.top_p),
            });
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(RunError::Sampling {
                field: "min_p",
                msg: format!("{} must be in [0, 1]", self.min_p),
            });
        }
        Ok(())
    }
}

/// SplitMix64: a seeded, portable generator (the same seed gives the same tokens everywhere).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub use crate::sampling::sample;

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after emitting one of these (it is included in the output).
    pub stop_ids: Vec<u32>,
    pub suppress_ids: Vec<u32>,
    /// Context limit (prompt + generated).
    pub max_len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone)]
pub struct GenerateOutput {
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    pub prompt_seconds: f64,
    pub decode_seconds: f64,
}

/// Runs one request to the end. `on_token` sees each new token as it is produced.
pub fn generate<B: Gemma4Backend>(
    model: &TextModel<B>,
    req: &GenerateRequest,
    mut on_token: impl FnMut(u32),
) -> Result<GenerateOutput, RunError> {
    req.sampling.validate()?;
    if req.prompt.is_empty() {
        return Err(RunError::EmptyInput);
    }
    if req.prompt.len() > req.max_len {
        return Err(RunError::ContextOverflow {
            len: req.prompt.len(),
            max: req.max_len,
        });
    }
    let budget = req.max_new_tokens.min(req.max_len - req.prompt.len());
    let mut cache = model.new_cache();
    let mut rng = Rng::new(req.sampling.seed);
    let mut tokens = Vec::with_capacity(budget);
    let start = std::time::Instant::now();
    let mut logits = model.forward(&req.prompt, &mut cache, Logits::Last)?;
    let mut row = crate::to_host_f32(logits);
    let prompt_seconds = start.elapsed().as_secs_f64();
    let start = std::time::Instant::now();
    let mut finish = FinishReason::Length;
    while tokens.len() < budget {
        let next = sample(&row, &req.sampling, &req.suppress_ids, &mut rng);
        tokens.push(next);
        on_token(next);
        if req.stop_ids.contains(&next) {
            finish = FinishReason::Stop;
            break;
        }
        if tokens.len() == budget {
            break;
        }
        logits = model.forward(&[next], &mut cache, Logits::Last)?;
        row = crate::to_host_f32(logits);
    }
    Ok(GenerateOutput {
        tokens,
        finish,
        prompt_seconds,
        decode_seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_skips_suppressed_and_takes_first_max() {
        let mut rng = Rng::new(0);
        let logits = [1.0, 5.0, 5.0, 2.0];
        assert_eq!(sample(&logits, &SamplingParams::greedy(), &[], &mut rng), 1);
        assert_eq!(
            sample(&logits, &SamplingParams::greedy(), &[1], &mut rng),
            2
        );
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_is_reproducible() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = SamplingParams {
            temperature: 0.8,
            top_k: 1,
            top_p: 1.0,
            min_p: 0.0,
            seed: 7,
        };
        let g = sample(&logits, &SamplingParams::greedy(), &[], &mut Rng::new(0));
        assert_eq!(sample(&logits, &p, &[], &mut Rng::new(3)), g);
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.9,
            min_p: 0.05,
            seed: 7,
        };
        let a: Vec<u32> = {
            let mut r = Rng::new(42);
            (0..20).map(|_| sample(&logits, &p, &[], &mut r)).collect()
        };
        let b: Vec<u32> = {
            let mut r = Rng::new(42);
            (0..20).map(|_| sample(&logits, &p, &[], &mut r)).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn sampling_frequencies_follow_softmax() {
        // Two tokens with logit gap ln(3): probabilities 0.75 / 0.25.
        let logits = [0.0f32, 3f32.ln(), -100.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 1,
        };
        let mut rng = Rng::new(1);
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| sample(&logits, &p, &[], &mut rng) == 1)
            .count();
        let f = ones as f64 / n as f64;
        assert!((f - 0.75).abs() < 0.015, "frequency {f}");
        // top_p 0.5 keeps only the most likely token.
        let p = SamplingParams { top_p: 0.5, ..p };
        assert!((0..200).all(|_| sample(&logits, &p, &[], &mut rng) == 1));
        // min_p 0.5: token 0 has 1/3 of the top probability -> removed.
        let p = SamplingParams {
            top_p: 1.0,
            min_p: 0.5,
            ..p
        };
        assert!((0..200).all(|_| sample(&logits, &p, &[], &mut rng) == 1));
    }
}
