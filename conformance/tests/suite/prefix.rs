//! Prefix caching against recomputation: a sequence that reuses the KV blocks of a cached prefix
//! gives the logits of the same tokens computed from scratch, within the cache-vs-prefill
//! tolerance, in each case where reuse could go wrong: a conversation's next turn, a prefix
//! that ends mid-block, a hit cut short because the sliding layers' blocks were evicted, two
//! sequences sharing blocks in one batch, eviction under memory pressure, and images (the same
//! image reused, a different image behind the same placeholder ids not).

use burn::tensor::Tensor;
use gemma4_conformance::name;
use gemma4_model::generation::Rng;
use gemma4_model::golden::{max_abs_diff, Tolerances};
use gemma4_model::vision::PreprocessedImage;
use gemma4_model::{Gemma4Backend, KvDtype, KvPool, Logits, Model, PrefixHasher, SeqKv, SeqStep};

/// Tokens per block: small, so that short prompts span many blocks and windows.
const BS: usize = 4;

fn to_vec<B: Gemma4Backend>(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// One sequence's part of a step: its cache, tokens and soft tokens.
type Part<'a, B> = (&'a mut SeqKv, &'a [u32], Option<Tensor<B, 2>>);

/// A model and a bounded pool with prefix caching.
struct Bench<'m, B: Gemma4Backend> {
    model: &'m Model<B>,
    pool: KvPool<B>,
    hasher: PrefixHasher,
    tol: f32,
    label: String,
}

impl<'m, B: Gemma4Backend> Bench<'m, B> {
    fn new(model: &'m Model<B>, blocks: [usize; 2], tol: Tolerances, label: String) -> Self {
        let pool = model
            .text
            .new_pool(BS, Some(blocks), KvDtype::Model)
            .with_prefix_caching(true);
        Bench {
            model,
            pool,
            hasher: PrefixHasher::new(),
            tol: tol.cache,
            label,
        }
    }

    fn hashes(&self, tokens: &[u32], images: &[(std::ops::Range<usize>, u64)]) -> Vec<u64> {
        let mut h = vec![];
        self.hasher.extend(&mut h, tokens, BS, images);
        h
    }

    /// A sequence over `tokens` reusing what the cache holds (at least one token left to run,
    /// never splitting a run of `image` placeholders, as the engine asks).
    fn seq(&self, tokens: &[u32], images: &[(std::ops::Range<usize>, u64)]) -> SeqKv {
        let image = self.model.config.image_token_id;
        let usable = |p: usize| {
            let splits = |id| p < tokens.len() && tokens[p - 1] == id && tokens[p] == id;
            p < tokens.len() && !image.is_some_and(splits)
        };
        self.pool
            .new_seq_reusing(self.hashes(tokens, images), usable)
    }

    /// Runs `steps` (sequence, its tokens, soft tokens) in one forward; every row's logits.
    fn step(&mut self, steps: Vec<Part<'_, B>>) -> Vec<f32> {
        let mut steps: Vec<SeqStep<B>> = steps
            .into_iter()
            .map(|(kv, tokens, soft)| SeqStep { tokens, soft, kv })
            .collect();
        to_vec(
            self.model
                .text
                .forward_step(&mut self.pool, &mut steps, Logits::All)
                .unwrap(),
        )
    }

    /// Runs the rest of `tokens` on `seq` alone.
    fn finish(&mut self, seq: &mut SeqKv, tokens: &[u32], soft: Option<Tensor<B, 2>>) -> Vec<f32> {
        let from = seq.seq_len;
        self.step(vec![(seq, &tokens[from..], soft)])
    }

    /// Logits of `tokens[from..]` computed from scratch (a fresh cache, no reuse).
    fn fresh(&self, tokens: &[u32], soft: Option<Tensor<B, 2>>, from: usize) -> Vec<f32> {
        let text = &self.model.text;
        let all = to_vec(
            text.forward_multimodal(tokens, soft, &mut text.new_cache(), Logits::All)
                .unwrap(),
        );
        all[from * text.vocab_size..].to_vec()
    }

    fn check(&self, case: &str, got: &[f32], expected: &[f32]) {
        assert_eq!(got.len(), expected.len(), "{case}: rows");
        let (d, _) = max_abs_diff(got, expected);
        println!(
            "{}/{case}: reused vs recomputed max|Δ| = {d:.2e} (tolerance {:.1e})",
            self.label, self.tol
        );
        assert!(d <= self.tol, "{}/{case}: max|Δ| {d}", self.label);
    }
}

/// Random text ids (no special or image ids: the top of the vocabulary's lower half).
fn text_ids(rng: &mut Rng, n: usize, vocab: usize, image: Option<u32>) -> Vec<u32> {
    let lo = 10.min(vocab as u32 - 1);
    (0..n)
        .map(|_| loop {
            let t = lo + (rng.next_f64() * f64::from(vocab as u32 / 2 - lo)) as u32;
            if Some(t) != image {
                break t;
            }
        })
        .collect()
}

fn argmax(row: &[f32]) -> u32 {
    gemma4_model::sampling::argmax(row, &[]).expect("a finite logit")
}

/// The text cases on one model.
pub fn text_cases<B: Gemma4Backend>(dir: &std::path::Path, device: &B::Device, tol: Tolerances) {
    let model = crate::suite::load::<B>(dir, device);
    let vocab = model.text.vocab_size;
    let image = model.config.image_token_id;
    let label = name(dir);
    let mut rng = Rng::new(12);
    let mut ids = |n| text_ids(&mut rng, n, vocab, image);
    let keep = model.text.sliding_window().map_or(0, |w| w - 1);

    // A conversation's next turn: a runs its prompt and decodes 5 tokens (the KV holds 34
    // tokens: 8 full blocks); b is a's prompt and answer and a new message.
    {
        let mut t = Bench::new(&model, [64, 64], tol, label.clone());
        let mut a_tokens = ids(30);
        let mut a = t.seq(&a_tokens, &[]);
        assert_eq!(a.seq_len, 0);
        let mut row = t.finish(&mut a, &a_tokens.clone(), None);
        for _ in 0..5 {
            let next = argmax(&row[row.len() - vocab..]);
            a_tokens.push(next);
            let from = a.hashes.len() * BS;
            t.hasher.extend(&mut a.hashes, &a_tokens[from..], BS, &[]);
            if a_tokens.len() < 35 {
                row = t.step(vec![(&mut a, &[next], None)]);
            }
        }
        drop(a);
        let b_tokens: Vec<u32> = [a_tokens, ids(9)].concat();
        let mut b = t.seq(&b_tokens, &[]);
        assert_eq!(b.seq_len, 32, "the blocks a wrote, answer included");
        let got = t.finish(&mut b, &b_tokens, None);
        t.check("next turn", &got, &t.fresh(&b_tokens, None, 32));
    }

    // A cached prefix that ends mid-block: the reuse stops at the last full block.
    {
        let mut t = Bench::new(&model, [64, 64], tol, label.clone());
        let a_tokens = ids(38);
        let mut a = t.seq(&a_tokens, &[]);
        t.finish(&mut a, &a_tokens, None);
        drop(a);
        let b_tokens: Vec<u32> = [a_tokens, ids(7)].concat();
        let mut b = t.seq(&b_tokens, &[]);
        assert_eq!(b.seq_len, 36);
        let got = t.finish(&mut b, &b_tokens, None);
        t.check("mid-block", &got, &t.fresh(&b_tokens, None, 36));
    }

    // Two sequences share blocks in one batch: b reuses the prefix a holds while a decodes,
    // then both decode together; each matches its own recomputation.
    {
        let mut t = Bench::new(&model, [64, 64], tol, label.clone());
        let mut a_tokens = ids(30);
        let mut a = t.seq(&a_tokens, &[]);
        let row = t.finish(&mut a, &a_tokens.clone(), None);
        let mut b_tokens: Vec<u32> = [&a_tokens[..28], &ids(10)].concat();
        let hit = t.pool.lookup(&t.hashes(&b_tokens, &[]), |p| p < 38);
        assert_eq!(hit.tokens, 28);
        assert!(hit.in_use[1] == 7, "b's full blocks are a's: {hit:?}");
        let mut b = t.seq(&b_tokens, &[]);
        let mut a_next = argmax(&row[row.len() - vocab..]);
        a_tokens.push(a_next);
        let rows = t.step(vec![
            (&mut a, &[a_next], None),
            (&mut b, &b_tokens[28..], None),
        ]);
        let (mut a_got, mut b_got) = (rows[..vocab].to_vec(), rows[vocab..].to_vec());
        for _ in 0..3 {
            a_next = argmax(&a_got[a_got.len() - vocab..]);
            let b_next = argmax(&b_got[b_got.len() - vocab..]);
            a_tokens.push(a_next);
            b_tokens.push(b_next);
            let rows = t.step(vec![(&mut a, &[a_next], None), (&mut b, &[b_next], None)]);
            a_got.extend(&rows[..vocab]);
            b_got.extend(&rows[vocab..]);
        }
        // Every token was run: a's rows are positions 30..34, b's 28..41.
        t.check("shared, a", &a_got, &t.fresh(&a_tokens, None, 30));
        t.check("shared, b", &b_got, &t.fresh(&b_tokens, None, 28));
        drop((a, b));
        assert_eq!(t.pool.usage().map(|(used, _)| used), [0, 0]);
    }

    // Eviction under memory pressure: x needs every block, so a's cached blocks are evicted
    // (never the blocks x holds); b, with a's prompt, finds nothing and is still exact.
    {
        let mut t = Bench::new(&model, [12, 12], tol, label.clone());
        let a_tokens = ids(40);
        let mut a = t.seq(&a_tokens, &[]);
        t.finish(&mut a, &a_tokens, None);
        drop(a);
        assert_eq!(t.pool.cached()[1], 10);
        let x_tokens = ids(48);
        let mut x = t.seq(&x_tokens, &[]);
        assert_eq!(x.seq_len, 0);
        t.finish(&mut x, &x_tokens, None);
        // Held blocks are never taken: one more sequence does not fit beside x.
        let mut y = t.seq(&ids(8), &[]);
        assert!(t
            .model
            .text
            .forward_step(
                &mut t.pool,
                &mut [SeqStep {
                    tokens: &[1; 8],
                    soft: None,
                    kv: &mut y,
                }],
                Logits::Last,
            )
            .is_err());
        drop((x, y));
        let b_tokens: Vec<u32> = [a_tokens, ids(4)].concat();
        let mut b = t.seq(&b_tokens, &[]);
        assert_eq!(b.seq_len, 0, "a's blocks were evicted");
        let got = t.finish(&mut b, &b_tokens, None);
        t.check("after eviction", &got, &t.fresh(&b_tokens, None, 0));
    }

    // A hit cut short by the sliding layers: full layers still hold all of a's prefix, but
    // the sliding blocks of its last window were evicted, while c had refreshed those of an
    // earlier window. Needs a window smaller than the prompt: sliding layers keep 15 tokens
    // (window 16, the 31B's layout at small scale).
    if keep == 15 {
        let mut t = Bench::new(&model, [20, 64], tol, label.clone());
        let a_tokens = ids(44);
        let mut a = t.seq(&a_tokens, &[]);
        t.finish(&mut a, &a_tokens, None);
        drop(a);
        // c shares a's first 20 tokens (5 blocks; sliding blocks 1..5 cover its window).
        let c_tokens: Vec<u32> = [&a_tokens[..20], &ids(24)].concat();
        let mut c = t.seq(&c_tokens, &[]);
        assert_eq!(c.seq_len, 20);
        t.finish(&mut c, &c_tokens, None);
        drop(c);
        // x takes 10 sliding blocks: 3 free, 7 evicted, least recently released first: a's
        // blocks 0, 5, 6 (out of its window during its prefill) and 10, 9, 8, 7 (at its end).
        let x_tokens = ids(40);
        let mut x = t.seq(&x_tokens, &[]);
        t.finish(&mut x, &x_tokens, None);
        drop(x);
        // The full layers' cache still holds all 44 tokens (11 blocks); the sliding layers
        // reach back to 20 only (blocks 1..5, refreshed by c).
        let b_tokens: Vec<u32> = [a_tokens, ids(6)].concat();
        let mut b = t.seq(&b_tokens, &[]);
        assert_eq!(b.seq_len, 20, "cut short by the sliding layers");
        let got = t.finish(&mut b, &b_tokens, None);
        t.check("sliding cut short", &got, &t.fresh(&b_tokens, None, 20));
    }
}

/// The image cases: the same image reused past it; a different image behind the same
/// placeholder ids reused only up to the block before it; a prefix that diverges just after
/// an image reused only up to the block before it (a hit never splits an image).
pub fn image_cases<B: Gemma4Backend>(
    dir: &std::path::Path,
    images: [&PreprocessedImage; 2],
    device: &B::Device,
    tol: Tolerances,
) {
    let model = crate::suite::load::<B>(dir, device);
    let vocab = model.text.vocab_size;
    let id = model.config.image_token_id.expect("a vision model");
    let n = images[0].num_soft_tokens;
    assert_eq!(n, images[1].num_soft_tokens, "two images of one size");
    let soft = images.map(|img| model.encode_image(img).unwrap());
    let mut t = Bench::new(&model, [128, 128], tol, name(dir));
    let keys = images.map(|img| t.hasher.image(img));
    let mut rng = Rng::new(5);
    let mut ids = |k| text_ids(&mut rng, k, vocab, Some(id));
    // 10 text tokens, the image (positions 10..10+n), 10 text tokens.
    let run = 10..10 + n;
    let prompt: Vec<u32> = [ids(10), vec![id; n], ids(10)].concat();
    let len = prompt.len();

    let mut a = t.seq(&prompt, &[(run.clone(), keys[0])]);
    t.finish(&mut a, &prompt, Some(soft[0].clone()));
    drop(a);

    // The same image: reused up to the last full block of a's prompt.
    let b_tokens: Vec<u32> = [prompt.clone(), ids(9)].concat();
    let mut b = t.seq(&b_tokens, &[(run.clone(), keys[0])]);
    assert_eq!(b.seq_len, len / BS * BS);
    let got = t.finish(&mut b, &b_tokens, None);
    let expected = t.fresh(&b_tokens, Some(soft[0].clone()), len / BS * BS);
    t.check("same image", &got, &expected);
    drop(b);

    // Another image behind the same ids: only the blocks before the image (0..8) are reused.
    let mut c = t.seq(&b_tokens, &[(run.clone(), keys[1])]);
    assert_eq!(c.seq_len, 8);
    let got = t.finish(&mut c, &b_tokens, Some(soft[1].clone()));
    t.check(
        "other image",
        &got,
        &t.fresh(&b_tokens, Some(soft[1].clone()), 8),
    );
    drop(c);

    // The same image, then other text from the image's end: the block holding the image's
    // end differs, and every block boundary before it is inside the image, so the hit falls
    // back to the block before the image.
    let d_tokens: Vec<u32> = [&prompt[..run.end], &ids(12)].concat();
    let mut d = t.seq(&d_tokens, &[(run.clone(), keys[0])]);
    assert!(run.end % BS != 0);
    assert_eq!(d.seq_len, 8, "never inside the image");
    let got = t.finish(&mut d, &d_tokens, Some(soft[0].clone()));
    t.check(
        "diverging after the image",
        &got,
        &t.fresh(&d_tokens, Some(soft[0].clone()), 8),
    );
}
