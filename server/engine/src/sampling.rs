//! Host-side logit processing of the engine: OpenAI/vLLM penalties and logit bias, and logprobs.

use std::collections::{HashMap, HashSet};

use gemma4_model::sampling::top_k;

/// Penalties and biases applied to a logits row before sampling.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Penalties {
    /// Subtracted once from every token already generated (OpenAI `presence_penalty`).
    pub presence: f32,
    /// Subtracted per occurrence in the generated text (OpenAI `frequency_penalty`).
    pub frequency: f32,
    /// vLLM/HF `repetition_penalty` over prompt and output: positive logits divided, negative
    /// multiplied; 1.0 is off.
    pub repetition: f32,
    /// Added to the logit of each id (OpenAI `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Penalties {
    pub fn none() -> Self {
        Penalties {
            presence: 0.0,
            frequency: 0.0,
            repetition: 1.0,
            logit_bias: vec![],
        }
    }

    pub fn is_noop(&self) -> bool {
        self.presence == 0.0
            && self.frequency == 0.0
            && (self.repetition == 1.0 || self.repetition == 0.0)
            && self.logit_bias.is_empty()
    }
}

pub fn apply_penalties(logits: &mut [f32], p: &Penalties, prompt: &[u32], generated: &[u32]) {
    if p.is_noop() {
        return;
    }
    if p.repetition != 1.0 && p.repetition > 0.0 {
        // Each id of prompt and output once (not a pass over the vocabulary).
        let seen: HashSet<u32> = prompt.iter().chain(generated).copied().collect();
        for t in seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 {
                    *l / p.repetition
                } else {
                    *l * p.repetition
                };
            }
        }
    }
    if p.presence != 0.0 || p.frequency != 0.0 {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in generated {
            *counts.entry(t).or_default() += 1;
        }
        for (t, n) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= p.presence + p.frequency * n as f32;
            }
        }
    }
    for &(t, b) in &p.logit_bias {
        if let Some(l) = logits.get_mut(t as usize) {
            *l += b;
        }
    }
}

/// The chosen token's log-probability and the `k` most likely tokens, from one logits row.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// The log-softmax normaliser is one pass over the row; the `k` alternatives are found by
/// selection (`gemma4_model::sampling::top_k`), not by sorting the vocabulary.
pub fn top_logprobs(logits: &[f32], chosen: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max
        + logits
            .iter()
            .map(|l| ((l - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    TokenLogprob {
        id: chosen,
        logprob: logits
            .get(chosen as usize)
            .map_or(f32::NEG_INFINITY, |l| l - lse),
        top: top_k(logits, k, &[])
            .into_iter()
            .map(|(i, l)| (i, l - lse))
            .collect(),
    }
}

/// [`top_logprobs`] from a row's top `(id, logit)` pairs (descending) and its log-sum-exp, when
/// they hold the chosen id and at least `k` entries (the engine's `need` asks for that many).
pub fn top_logprobs_of_top(top: &[(u32, f32)], lse: f32, chosen: u32, k: usize) -> TokenLogprob {
    TokenLogprob {
        id: chosen,
        logprob: top
            .iter()
            .find(|t| t.0 == chosen)
            .map_or(f32::NEG_INFINITY, |t| t.1 - lse),
        top: top
            .iter()
            .filter(|t| !t.1.is_nan())
            .take(k)
            .map(|&(i, l)| (i, l - lse))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_normalise_and_rank() {
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        let t = top_logprobs(&logits, 2, 2);
        let total: f64 = logits.iter().map(|&l| ((l - 3.0) as f64).exp()).sum();
        let expected = 2.0 - 3.0 - total.ln();
        assert!((t.logprob as f64 - expected).abs() < 1e-6);
        assert_eq!(t.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn logprobs_from_the_top_equal_those_from_the_row() {
        // The engine's `need` fetches max(sampling's k, n) candidates and the lse: the same
        // alternatives, and logprobs equal up to the lse's rounding (here computed alike).
        let logits: Vec<f32> = (0..1000u32)
            .map(|i| ((i * 7919 % 1000) as f32 / 125.0).round() - 4.0)
            .collect();
        let lse = {
            let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            m + logits
                .iter()
                .map(|l| ((l - m) as f64).exp())
                .sum::<f64>()
                .ln() as f32
        };
        let top = top_k(&logits, 8, &[]);
        for chosen in [top[0].0, top[5].0] {
            let want = top_logprobs(&logits, chosen, 5);
            let got = top_logprobs_of_top(&top, lse, chosen, 5);
            assert_eq!(got, want, "chosen {chosen}");
        }
    }

    #[test]
    fn penalties_follow_their_definitions() {
        let mut l = vec![2.0f32, -2.0, 1.0, 0.5];
        let p = Penalties {
            presence: 0.5,
            frequency: 0.25,
            repetition: 2.0,
            logit_bias: vec![(3, 10.0)],
        };
        apply_penalties(&mut l, &p, &[0], &[1, 1]);
        // token 0: in prompt -> 2/2 = 1; token 1: -2*2 = -4, then -0.5 - 0.25*2 = -5; token 3: +10.
        assert_eq!(l, vec![1.0, -5.0, 1.0, 10.5]);
    }
}
