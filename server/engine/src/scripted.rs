//! A test model behind the same engine (burn-lm's test-model idea): whatever the prompt, its
//! logits put all the mass on the next token of a fixed script. Server tests use it to drive the
//! paths a random-weight fixture never takes (thinking blocks, tool calls) through the real
//! engine, parser and HTTP layer. Compiled only with the `scripted` feature, which only test
//! builds enable (`server/examples/scripted_serve.rs`, a dev-dependency), never the product binary.

use std::ops::Range;
use std::sync::Arc;

use gemma4_model::vision::PreprocessedImage;

use super::{BlockBudget, StepItem, StepLogits, StepModel};

pub struct ScriptedModel {
    pub vocab_size: usize,
    /// Emitted in order; after the end, the last id repeats (end it with a stop id).
    pub script: Vec<u32>,
    /// The checkpoint's `image_token_id`: chunks with soft tokens are checked (soft rows against
    /// placeholders), and otherwise ignored.
    pub image_token_id: Option<u32>,
}

impl ScriptedModel {
    /// One item: checks the ids and the soft rows against the placeholders, then the script's
    /// next token.
    fn run(
        &self,
        tokens: &[u32],
        soft: Option<(&usize, Range<usize>)>,
        cache: &mut (usize, usize),
    ) -> Result<Vec<f32>, String> {
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.vocab_size
            ));
        }
        // As the model: without soft tokens a placeholder is a plain token (a generated one).
        if let Some((&total, rows)) = soft {
            let placeholders = self
                .image_token_id
                .map_or(0, |id| tokens.iter().filter(|&&t| t == id).count());
            if rows.len() != placeholders || rows.end > total {
                return Err(format!(
                    "{placeholders} image placeholders but soft rows {rows:?} of {total}"
                ));
            }
        }
        let step = cache.1;
        cache.0 += tokens.len();
        cache.1 += 1;
        let mut logits = vec![-30.0f32; self.vocab_size];
        if let Some(&id) = self.script.get(step).or(self.script.last()) {
            logits[id as usize] = 30.0;
        }
        Ok(logits)
    }
}

impl StepModel for ScriptedModel {
    /// No KV: nothing to pool.
    type Pool = ();
    /// (tokens seen, forward calls made).
    type Cache = (usize, usize);
    /// The number of soft-token rows (no vision tower runs).
    type Soft = usize;

    fn new_pool(&self, _: &BlockBudget) {}

    fn new_cache(&self, _: &()) -> (usize, usize) {
        (0, 0)
    }

    fn pool_usage(&self, _: &()) -> [(usize, usize); 2] {
        [(0, 0); 2]
    }

    fn image_token_id(&self) -> Option<u32> {
        self.image_token_id
    }

    fn encode_images(&self, images: &[Arc<PreprocessedImage>]) -> Result<Option<usize>, String> {
        Ok((!images.is_empty()).then(|| images.iter().map(|i| i.num_soft_tokens).sum()))
    }

    fn forward_step(
        &self,
        _: &mut (),
        items: &mut [StepItem<'_, Self>],
    ) -> Result<Vec<StepLogits>, String> {
        items
            .iter_mut()
            .map(|item| {
                let soft = item.soft.as_ref().map(|(n, r)| (*n, r.clone()));
                self.run(item.tokens, soft, item.cache).map(StepLogits::Row)
            })
            .collect()
    }
}
