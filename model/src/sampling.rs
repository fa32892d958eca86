//! Picking the next token from one row of logits at the real vocabulary (262,144 on Gemma 4)
//! without sorting it. The candidates are found by selection: one pass over the row keeps the k
//! largest in a min-heap (most logits fail one comparison against the heap's smallest), and only
//! those k are sorted. With top-k on (the 31B's generation_config: temperature 1.0, top_k 64,
//! top_p 0.95) that is the whole work, and the token is the one [`sample_reference`] (the plain
//! full sort) picks for the same seed. With top-k off, top-p and min-p take the smallest top-k
//! set that holds their prefix, growing k fourfold until it does; with neither, the draw walks
//! the row in id order instead of probability order (the same distribution, another token than
//! the reference's for the same seed).

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use crate::generation::{Rng, SamplingParams};

/// Picks the next token. `suppress` ids and NaN logits are never chosen.
pub fn sample(logits: &[f32], params: &SamplingParams, suppress: &[u32], rng: &mut Rng) -> u32 {
    if params.temperature == 0.0 {
        return argmax(logits, suppress).unwrap_or(0);
    }
    let inv_t = 1.0 / params.temperature as f64;
    if params.top_k > 0 {
        // The reference's path exactly: probabilities over the (at most) k candidates.
        let cand = top_k(logits, params.top_k, suppress);
        if cand.is_empty() {
            return 0;
        }
        return pick(&cand, inv_t, None, params, rng);
    }
    // Every allowed token is a candidate: the mass is over all of them.
    let max = cand_max(logits, suppress);
    if max == f64::NEG_INFINITY {
        return argmax(logits, suppress).unwrap_or(0);
    }
    let mut z = 0.0f64;
    for_each_allowed(logits, suppress, |_, l| z += weight(l, max, inv_t));
    if params.top_p >= 1.0 && params.min_p == 0.0 {
        let mut r = rng.next_f64() * z;
        let mut last = 0;
        let mut chosen = None;
        for_each_allowed(logits, suppress, |i, l| {
            if chosen.is_none() {
                let p = weight(l, max, inv_t);
                if r < p {
                    chosen = Some(i as u32);
                }
                r -= p;
                last = i as u32;
            }
        });
        return chosen.unwrap_or(last);
    }
    // The smallest top set that holds the top-p prefix and every token min-p keeps.
    let min_logit = (params.min_p > 0.0).then(|| max + (params.min_p as f64).ln() / inv_t);
    let mut k = 64;
    loop {
        let cand = top_k(logits, k, suppress);
        let mass: f64 = cand.iter().map(|&(_, l)| weight(l, max, inv_t) / z).sum();
        let last = cand.last().map_or(f64::NEG_INFINITY, |&(_, l)| l as f64);
        let holds_top_p = params.top_p >= 1.0 || mass >= params.top_p as f64;
        let holds_min_p = min_logit.is_none_or(|m| last < m);
        // Fewer than k: every allowed token is in.
        if cand.len() < k || (holds_top_p && holds_min_p) {
            return pick(&cand, inv_t, Some(z), params, rng);
        }
        k *= 4;
    }
}

/// How many of a row's top logits decide [`sample`]'s token, when that is fewer than the whole
/// row: greedy needs the first allowed one, top-k sampling the first `top_k` allowed ones (top-p
/// and min-p then act on those alone, as [`sample`] does when top_k > 0), and each suppressed id
/// may take a place among them. None: the draw needs the whole row (top_k = 0 at a temperature
/// above 0: the mass of every token counts).
pub fn top_needed(params: &SamplingParams, suppress: &[u32]) -> Option<usize> {
    let base = if params.temperature == 0.0 {
        1
    } else if params.top_k > 0 {
        params.top_k
    } else {
        return None;
    };
    let mut distinct = suppress.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    Some(base + distinct.len())
}

/// [`sample`] from a row's top logits `top` (descending, equal logits lower id first, as
/// [`top_k`] and the backends' `top_k_rows` give them; NaN last), holding at least
/// [`top_needed`] entries or the whole row: the token [`sample`] picks from the full row for the
/// same generator state (one exception: a greedy row whose maximum is 0 held as both −0 and +0,
/// where [`argmax`] takes the first of either and the top order puts +0 first).
pub fn sample_top(
    top: &[(u32, f32)],
    params: &SamplingParams,
    suppress: &[u32],
    rng: &mut Rng,
) -> u32 {
    let mut allowed = top
        .iter()
        .copied()
        .filter(|(i, l)| !l.is_nan() && !suppress.contains(i));
    if params.temperature == 0.0 {
        return allowed.next().map_or(0, |c| c.0);
    }
    let cand: Vec<(u32, f32)> = allowed.take(params.top_k.max(1)).collect();
    if cand.is_empty() {
        return 0;
    }
    pick(&cand, 1.0 / params.temperature as f64, None, params, rng)
}

/// The plain full sort, kept beside [`sample`] as its reference (tests, `gemma4 bench-sampling`):
/// every allowed token sorted by logit, then top-k, top-p, min-p, one draw.
pub fn sample_reference(
    logits: &[f32],
    params: &SamplingParams,
    suppress: &[u32],
    rng: &mut Rng,
) -> u32 {
    if params.temperature == 0.0 {
        return argmax(logits, suppress).unwrap_or(0);
    }
    let mut cand: Vec<(u32, f32)> = Vec::with_capacity(logits.len());
    for_each_allowed(logits, suppress, |i, l| cand.push((i as u32, l)));
    if cand.is_empty() {
        return 0;
    }
    cand.sort_by(desc);
    if params.top_k > 0 && cand.len() > params.top_k {
        cand.truncate(params.top_k);
    }
    pick(&cand, 1.0 / params.temperature as f64, None, params, rng)
}

/// Candidates in descending order → top-p, min-p and the draw. The probabilities are over
/// `cand` unless `z` (the mass of every allowed token, relative to the maximum) is given.
fn pick(
    cand: &[(u32, f32)],
    inv_t: f64,
    z: Option<f64>,
    params: &SamplingParams,
    rng: &mut Rng,
) -> u32 {
    let max = cand[0].1 as f64;
    let mut probs: Vec<f64> = cand.iter().map(|&(_, l)| weight(l, max, inv_t)).collect();
    let total = z.unwrap_or_else(|| probs.iter().sum());
    probs.iter_mut().for_each(|p| *p /= total);
    let mut keep = probs.len();
    if params.top_p < 1.0 {
        // Smallest prefix whose mass reaches top_p (always at least one token).
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= params.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
    }
    if params.min_p > 0.0 {
        let threshold = probs[0] * params.min_p as f64;
        keep = probs[..keep]
            .iter()
            .take_while(|p| **p >= threshold)
            .count()
            .max(1);
    }
    let probs = &probs[..keep];
    let total: f64 = probs.iter().sum();
    let mut r = rng.next_f64() * total;
    for (i, p) in probs.iter().enumerate() {
        if r < *p {
            return cand[i].0;
        }
        r -= p;
    }
    cand[keep - 1].0
}

/// exp((l − max) / T): a logit's probability up to the normaliser, relative to the row's maximum.
fn weight(l: f32, max: f64, inv_t: f64) -> f64 {
    ((l as f64 - max) * inv_t).exp()
}

/// The first maximum among the allowed tokens (as torch.argmax), if any.
pub fn argmax(logits: &[f32], suppress: &[u32]) -> Option<u32> {
    let mut best: Option<(u32, f32)> = None;
    for_each_allowed(logits, suppress, |i, l| {
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((i as u32, l));
        }
    });
    best.map(|(i, _)| i)
}

/// The `k` largest allowed logits, in descending order (equal logits: lower id first, as a
/// stable sort of the row would give).
pub fn top_k(logits: &[f32], k: usize, suppress: &[u32]) -> Vec<(u32, f32)> {
    if k == 0 {
        return vec![];
    }
    // A min-heap of the best k so far; its top is the worst of them.
    let mut heap: BinaryHeap<Reverse<Ranked>> = BinaryHeap::with_capacity(k + 1);
    // Once the heap is full, the logit of its worst: most of a row is below it and is
    // rejected by this one comparison.
    let mut floor = f32::NEG_INFINITY;
    for_each_allowed(logits, suppress, |i, l| {
        if l < floor {
            return;
        }
        let r = Ranked(l, i as u32);
        if heap.len() < k {
            heap.push(Reverse(r));
        } else if heap.peek().is_some_and(|Reverse(worst)| r > *worst) {
            heap.pop();
            heap.push(Reverse(r));
        } else {
            return;
        }
        if heap.len() == k {
            floor = heap.peek().map_or(floor, |Reverse(w)| w.0);
        }
    });
    let mut out: Vec<(u32, f32)> = heap
        .into_iter()
        .map(|Reverse(Ranked(l, i))| (i, l))
        .collect();
    out.sort_by(desc);
    out
}

/// A logit ranked as a candidate: higher logit first, then lower id.
#[derive(Clone, Copy, PartialEq)]
struct Ranked(f32, u32);

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0).then(other.1.cmp(&self.1))
    }
}

/// Descending by logit, then ascending by id.
fn desc(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

fn cand_max(logits: &[f32], suppress: &[u32]) -> f64 {
    let mut m = f32::NEG_INFINITY;
    for_each_allowed(logits, suppress, |_, l| m = m.max(l));
    m as f64
}

/// Calls `f(id, logit)` for every id not in `suppress` whose logit is not NaN, in id order: the
/// row is walked in the runs between the (few) suppressed ids, without a lookup per id.
fn for_each_allowed(logits: &[f32], suppress: &[u32], mut f: impl FnMut(usize, f32)) {
    let mut cut: Vec<usize> = suppress
        .iter()
        .map(|&s| s as usize)
        .filter(|&s| s < logits.len())
        .collect();
    cut.sort_unstable();
    cut.push(logits.len());
    let mut start = 0;
    for end in cut {
        for (i, &l) in logits[start.min(end)..end].iter().enumerate() {
            if !l.is_nan() {
                f(start + i, l);
            }
        }
        start = end + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits like a language model's (a few large, a long tail), with ties (quantized), NaNs and
    /// infinities sprinkled in.
    fn row(rng: &mut Rng, vocab: usize, quantize: bool) -> Vec<f32> {
        (0..vocab)
            .map(|_| {
                let u = rng.next_f64();
                let v = (-2.0 * (1.0 - u).ln()).sqrt() as f32 * 4.0 - 6.0;
                match rng.next_u64() % 1000 {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    _ if quantize => (v * 2.0).round() / 2.0,
                    _ => v,
                }
            })
            .collect()
    }

    #[test]
    fn selection_picks_the_reference_token() {
        let mut gen = Rng::new(42);
        let mut checked = 0;
        for case in 0..400 {
            let vocab = [1, 7, 300, 5000][case % 4];
            let logits = row(&mut gen, vocab, case % 3 == 0);
            let suppress: Vec<u32> = (0..case % 4).map(|j| (j * 97 % vocab) as u32).collect();
            let params = SamplingParams {
                temperature: [0.0, 0.3, 1.0, 1.7][case / 4 % 4],
                top_k: [0, 1, 5, 64, 100_000][case / 16 % 5],
                top_p: [1.0, 0.95, 0.5][case / 80 % 3],
                min_p: [0.0, 0.05][case / 240 % 2],
                seed: case as u64,
            };
            // With neither top-k nor top-p/min-p the draw walks another order (tested below).
            if params.temperature > 0.0
                && (params.top_k == 0 || params.top_k >= vocab)
                && params.top_p >= 1.0
                && params.min_p == 0.0
            {
                continue;
            }
            for draw in 0..5 {
                let seed = case as u64 * 31 + draw;
                let fast = sample(&logits, &params, &suppress, &mut Rng::new(seed));
                let slow = sample_reference(&logits, &params, &suppress, &mut Rng::new(seed));
                assert_eq!(fast, slow, "case {case} draw {draw}: {params:?}");
                checked += 1;
            }
        }
        assert!(checked > 1000, "{checked}");
    }

    #[test]
    fn sampling_from_the_top_picks_the_full_rows_token() {
        // What the engine does with a device top-k: the row's top `top_needed` (from a full sort,
        // the definition the kernels are tested against), then `sample_top`.
        let mut gen = Rng::new(11);
        let mut checked = 0;
        for case in 0..480 {
            let vocab = [5, 300, 5000, 70_000][case % 4];
            let logits = row(&mut gen, vocab, case % 3 == 0);
            let suppress: Vec<u32> = (0..case % 3).map(|j| (j * 131 % vocab) as u32).collect();
            let params = SamplingParams {
                temperature: [0.0, 1.0, 0.7][case / 4 % 3],
                top_k: [1, 64, 0][case / 12 % 3],
                top_p: [1.0, 0.95][case / 36 % 2],
                min_p: [0.0, 0.05][case / 72 % 2],
                seed: case as u64,
            };
            let Some(need) = top_needed(&params, &suppress) else {
                assert!(params.temperature > 0.0 && params.top_k == 0);
                continue;
            };
            let mut sorted: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l))
                .collect();
            // NaN last, as the kernels order them.
            sorted.sort_by(|a, b| match (a.1.is_nan(), b.1.is_nan()) {
                (false, false) => desc(a, b),
                (x, y) => x.cmp(&y).then(a.0.cmp(&b.0)),
            });
            sorted.truncate(need);
            for draw in 0..8 {
                let seed = case as u64 * 131 + draw;
                let full = sample(&logits, &params, &suppress, &mut Rng::new(seed));
                let top = sample_top(&sorted, &params, &suppress, &mut Rng::new(seed));
                assert_eq!(top, full, "case {case} draw {draw}: {params:?}");
                checked += 1;
            }
        }
        assert!(checked >= 2500, "{checked}");
    }

    #[test]
    fn pure_temperature_sampling_has_the_softmax_distribution() {
        let logits = [1.0f32, 0.0, -1.0, 2.0, f32::NAN, 0.5];
        let params = SamplingParams {
            temperature: 0.8,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
        };
        let suppress = [5];
        let z: f64 = [1.0f64, 0.0, -1.0, 2.0]
            .iter()
            .map(|l| (l / 0.8).exp())
            .sum();
        let mut counts = [0usize; 6];
        let mut rng = Rng::new(7);
        let n = 200_000;
        for _ in 0..n {
            counts[sample(&logits, &params, &suppress, &mut rng) as usize] += 1;
        }
        assert_eq!((counts[4], counts[5]), (0, 0), "NaN and suppressed ids");
        for (i, l) in [1.0f64, 0.0, -1.0, 2.0].iter().enumerate() {
            let want = (l / 0.8).exp() / z;
            let got = counts[i] as f64 / n as f64;
            // 5 standard deviations of a binomial proportion at n = 200,000.
            let tol = 5.0 * (want * (1.0 - want) / n as f64).sqrt();
            assert!((got - want).abs() < tol, "id {i}: {got} vs {want}");
        }
    }

    #[test]
    fn greedy_and_top_k_by_selection() {
        let logits = [0.5f32, 3.0, f32::NAN, 3.0, -1.0, 2.0];
        assert_eq!(argmax(&logits, &[]), Some(1), "first maximum");
        assert_eq!(argmax(&logits, &[1]), Some(3));
        assert_eq!(argmax(&logits, &[0, 1, 3, 4, 5]), None, "only NaN left");
        assert_eq!(top_k(&logits, 3, &[]), [(1, 3.0), (3, 3.0), (5, 2.0)]);
        assert_eq!(top_k(&logits, 2, &[3]), [(1, 3.0), (5, 2.0)]);
        assert_eq!(top_k(&logits, 99, &[]).len(), 5);
        let mut gen = Rng::new(3);
        for vocab in [10, 1000, 20_000] {
            let l = row(&mut gen, vocab, true);
            let mut all: Vec<(u32, f32)> = l
                .iter()
                .enumerate()
                .filter(|(_, x)| !x.is_nan())
                .map(|(i, &x)| (i as u32, x))
                .collect();
            all.sort_by(desc);
            for k in [1, 8, 64, 300] {
                let want: Vec<_> = all.iter().copied().take(k).collect();
                assert_eq!(top_k(&l, k, &[]), want, "vocab {vocab} k {k}");
            }
        }
    }
}
