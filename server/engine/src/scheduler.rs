//! The scheduler: what one engine step does, decided from the queues and the limits alone, with
//! no model and no I/O, so every rule below is unit-tested. The runner (`run_loop`) executes the
//! plan. vLLM's scheduler is the model:
//!
//! - **Cancellation frees at once.** The runner drops cancelled sequences, running or waiting,
//!   before it plans a step (the plan never sees them), so their blocks serve that very step.
//! - **Running sequences first, oldest first.** Each running sequence either decodes one token or
//!   prefills its next chunk. Prefill chunks share a token budget per step (chunked prefill,
//!   `max_num_batched_tokens`), so a long prompt delays the running streams by one chunk, not by
//!   its whole length; decode rows do not draw on it (they join the same forward). A chunk
//!   never ends inside a run of image placeholders: one image's soft tokens attend to each other
//!   bidirectionally, so they must be run in one call. A sequence whose prefill completes in a
//!   step is listed for a decode too, and the blocks of that decode are reserved; the runner
//!   samples the token from the chunk's logits at the start of the next step, so each step is
//!   one forward.
//! - **A block budget, kept as the model's paged pool allocates.** The KV cache is counted in
//!   blocks of `block_size` tokens per layer kind: a full layer holds every token's block, a
//!   sliding layer only those of its window (plus, during a step, the step's own tokens). When a
//!   sequence's work does not fit the free blocks, the most recently admitted sequence is
//!   preempted (recompute preemption): its blocks are freed and it goes back to the front of the
//!   waiting queue, to be prefilled again from its
//!   prompt and generated tokens. The newest loses because it has the least work to redo and the
//!   oldest must always be able to finish. A sequence that does not fit even alone can never run
//!   and is aborted instead of being preempted forever.
//! - **A prefix hit costs only what it takes.** A waiting sequence's `computed` is its
//!   prefix-cache hit (looked up by the engine before planning): its first chunk starts there,
//!   and it needs only the blocks that no running sequence holds (`held`; cached blocks held by
//!   none leave the free ones when reused). Preempting a sequence frees only the blocks no
//!   other sequence shares (`frees`). A step that preempted or aborted admits nobody.
//! - **FIFO admission, no starvation.** Waiting requests are admitted in order while there are
//!   sequence slots and their first chunk's blocks fit; the first one that does not fit stops
//!   admission (it is never skipped for a later, smaller one). A step that preempted admits
//!   nobody: the blocks it freed are for the sequences already running.

use std::ops::Range;

/// A sequence's identity across queues (the engine numbers requests as they arrive).
pub type SeqId = u64;

/// Tokens per KV block unless configured.
pub const DEFAULT_BLOCK_SIZE: usize = gemma4_model::DEFAULT_BLOCK_SIZE;

/// What the layers of one kind keep of a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The model has no layer of this kind.
    Nothing,
    /// Every token (full attention).
    All,
    /// The last n tokens after each step (a sliding window minus the next query).
    Last(usize),
}

/// Block counts per layer kind (sliding, full): the KV pool keeps one set of block ids per kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Blocks(pub [usize; 2]);

impl Blocks {
    pub const UNLIMITED: Blocks = Blocks([usize::MAX; 2]);

    /// Whether every kind fits in `free`.
    pub fn fits_in(self, free: Blocks) -> bool {
        self.0[0] <= free.0[0] && self.0[1] <= free.0[1]
    }

    pub fn plus(self, o: Blocks) -> Blocks {
        Blocks([0, 1].map(|i| self.0[i].saturating_add(o.0[i])))
    }

    pub fn minus(self, o: Blocks) -> Blocks {
        Blocks([0, 1].map(|i| self.0[i].saturating_sub(o.0[i])))
    }

    pub fn total(self) -> usize {
        self.0[0] + self.0[1]
    }
}

/// The KV block budget admission and preemption count against, kept exactly as the model's
/// paged pool allocates: per kind, a sequence with `computed` cached tokens running a step to
/// `end` holds the blocks of tokens `computed - keep .. end` (full layers: `0..end`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockBudget {
    /// Blocks of each kind in the pool; None: unlimited (no admission by memory, no preemption).
    pub num_kv_blocks: Option<Blocks>,
    /// Tokens per block.
    pub block_size: usize,
    /// What each kind keeps (the engine sets it from the model at start).
    pub keep: [Keep; 2],
    /// What the pool stores (the model's float type, or fp8); scheduling does not depend on it.
    pub kv_dtype: gemma4_model::KvDtype,
    /// Whether the pool keeps and reuses the KV of prompt prefixes (on by default, as vLLM).
    pub prefix_caching: bool,
}

impl Default for BlockBudget {
    fn default() -> Self {
        BlockBudget {
            num_kv_blocks: None,
            block_size: DEFAULT_BLOCK_SIZE,
            keep: [Keep::Nothing, Keep::All],
            kv_dtype: gemma4_model::KvDtype::Model,
            prefix_caching: true,
        }
    }
}

impl BlockBudget {
    /// The blocks a sequence holds during a step from `computed` cached tokens to `end`.
    pub fn needed(&self, computed: usize, end: usize) -> Blocks {
        let bs = self.block_size.max(1);
        Blocks(self.keep.map(|keep| match keep {
            Keep::Nothing => 0,
            Keep::All => gemma4_model::cache::blocks_needed(computed, end, None, bs),
            Keep::Last(n) => gemma4_model::cache::blocks_needed(computed, end, Some(n), bs),
        }))
    }

    /// The blocks a sequence of `tokens` cached tokens holds between steps.
    pub fn held(&self, tokens: usize) -> Blocks {
        self.needed(tokens, tokens)
    }

    /// Whether a prompt of `tokens` tokens fits the pool on its own (run in one step).
    pub fn fits(&self, tokens: usize) -> bool {
        self.num_kv_blocks
            .is_none_or(|n| self.needed(0, tokens).fits_in(n))
    }
}

/// The per-step limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sequences in the running set.
    pub max_num_seqs: usize,
    /// Prefill tokens per step over all sequences.
    pub token_budget: usize,
    pub blocks: BlockBudget,
}

/// What the scheduler sees of a sequence, waiting or running.
#[derive(Debug, Clone, Copy)]
pub struct SeqState<'a> {
    pub id: SeqId,
    /// The prompt; image placeholder runs are only ever in it.
    pub prompt: &'a [u32],
    /// Tokens the cache must hold before the next token is sampled: the prompt and the
    /// generated tokens (all of them run through the model).
    pub len: usize,
    /// Tokens in the cache now; while waiting, the tokens its prefix-cache hit would reuse.
    pub computed: usize,
    /// Blocks it needs and does not have to take from the free ones: running, the blocks it
    /// holds (`BlockBudget::held(computed)`); waiting, those of its prefix hit that running
    /// sequences hold (shared, not taken).
    pub held: Blocks,
    /// Blocks preempting it returns to the free ones: those no other sequence shares (0 while
    /// waiting).
    pub frees: Blocks,
}

impl SeqState<'_> {
    fn decoding(&self) -> bool {
        self.computed >= self.len
    }
}

/// One step's decisions. The runner applies them in this order: abort, preempt (each to the
/// front of the waiting queue, in the order listed, so the oldest ends first), admit (from the
/// front), then the prefill chunks, then one decode for each sequence in `decode`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// Need more blocks than the whole pool holds: they can never run.
    pub aborted: Vec<SeqId>,
    /// Running sequences sent back to the waiting queue, newest first.
    pub preempted: Vec<SeqId>,
    /// Taken from the front of the waiting queue, in order.
    pub admitted: Vec<SeqId>,
    /// Chunks of tokens (positions in prompt + generated) to run, in running order.
    pub prefill: Vec<(SeqId, Range<usize>)>,
    /// Sequences that sample and run one token, in running order (those whose prefill ends in
    /// this step included).
    pub decode: Vec<SeqId>,
}

/// Plans one step. `running` is in admission order (the newest last), `waiting` in queue order;
/// `available` are the blocks of each kind a sequence can take now (free, or cached and held by
/// none; ignored without a block budget); `image_id` is the placeholder whose runs a chunk must
/// not split.
pub fn plan(
    waiting: &[SeqState],
    running: &[SeqState],
    limits: &Limits,
    available: Blocks,
    image_id: Option<u32>,
) -> StepPlan {
    let mut plan = StepPlan::default();
    let needed = |computed: usize, end: usize| limits.blocks.needed(computed, end);
    // Unlimited: as many free blocks as any step could ask for.
    let mut free = limits
        .blocks
        .num_kv_blocks
        .map_or(Blocks::UNLIMITED, |_| available);
    let mut running: Vec<&SeqState> = running.iter().collect();
    let mut budget = limits.token_budget.max(1);

    // The work a sequence asks for now: its chunk (None for a decode) and the blocks it needs.
    let work = |s: &SeqState, budget: usize| -> (Option<Range<usize>>, Blocks) {
        if s.decoding() {
            return (None, needed(s.computed, s.len + 1).minus(s.held));
        }
        let end = chunk_end(s.prompt, s.len, s.computed, budget, image_id);
        // A chunk that completes the prefill is followed by a decode (counted here).
        let after = end + usize::from(end == s.len);
        (
            Some(s.computed..end),
            needed(s.computed, after).minus(s.held),
        )
    };

    let mut i = 0;
    while i < running.len() {
        let s = running[i];
        if !s.decoding() && budget == 0 {
            i += 1; // waits for the next step's budget, holding its blocks
            continue;
        }
        let (chunk, need) = work(s, budget);
        while !need.fits_in(free) && running.len() > i + 1 {
            let victim = running.pop().expect("a newer sequence");
            free = free.plus(victim.frees);
            plan.preempted.push(victim.id);
        }
        if !need.fits_in(free) {
            running.remove(i);
            free = free.plus(s.frees);
            if i == 0 {
                plan.aborted.push(s.id); // alone, and still does not fit
            } else {
                plan.preempted.push(s.id);
            }
            continue;
        }
        free = free.minus(need);
        match chunk {
            Some(c) => {
                budget -= (c.end - c.start).min(budget);
                if c.end == s.len {
                    plan.decode.push(s.id);
                }
                plan.prefill.push((s.id, c));
            }
            None => plan.decode.push(s.id),
        }
        i += 1;
    }

    // Blocks freed by preemption are for the running sequences; and a waiting sequence's hit
    // may count blocks of a sequence that just left as held (free now, and counted twice).
    if !plan.preempted.is_empty() || !plan.aborted.is_empty() {
        return plan;
    }
    let mut slots = limits.max_num_seqs.saturating_sub(running.len());
    for s in waiting {
        // With a block budget, a request joins with its first chunk; without one, it may join
        // and wait for the budget, as before.
        if slots == 0 || (budget == 0 && limits.blocks.num_kv_blocks.is_some()) {
            break;
        }
        let (chunk, need) = work(s, budget);
        if !need.fits_in(free) {
            if limits
                .blocks
                .num_kv_blocks
                .is_some_and(|n| !need.fits_in(n))
            {
                plan.aborted.push(s.id);
                continue; // it could never run: not a reason to hold up the queue
            }
            break; // the head waits; no later request overtakes it
        }
        free = free.minus(need);
        slots -= 1;
        plan.admitted.push(s.id);
        if budget > 0 {
            let c = chunk.expect("a waiting sequence prefills");
            budget -= (c.end - c.start).min(budget);
            if c.end == s.len {
                plan.decode.push(s.id);
            }
            plan.prefill.push((s.id, c));
        }
    }
    plan
}

/// End of the next chunk of a sequence of `len` tokens (the prompt, then generated tokens) from
/// `start` with `budget` tokens: at most `budget` tokens, but extended to the end of a run of
/// image placeholders rather than ending inside one. Runs are only looked for in the prompt.
pub fn chunk_end(
    prompt: &[u32],
    len: usize,
    start: usize,
    budget: usize,
    image_id: Option<u32>,
) -> usize {
    let mut end = len.min(start + budget.max(1));
    if let Some(id) = image_id {
        while end < prompt.len() && end > start && prompt[end - 1] == id && prompt[end] == id {
            end += 1;
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_never_end_inside_an_image_run() {
        let p = [1, 9, 5, 5, 5, 5, 8, 2, 3];
        let n = p.len();
        assert_eq!(chunk_end(&p, n, 0, 3, Some(5)), 6); // [1 9 5 | 5 5 5] -> extended to the run's end
        assert_eq!(chunk_end(&p, n, 0, 2, Some(5)), 2); // ends before the run
        assert_eq!(chunk_end(&p, n, 0, 6, Some(5)), 6); // ends exactly at the run's end
        assert_eq!(chunk_end(&p, n, 6, 100, Some(5)), 9);
        assert_eq!(chunk_end(&p, n, 0, 3, None), 3);
        assert_eq!(chunk_end(&p, n, 2, 0, Some(5)), 6); // a zero budget still makes progress
        assert_eq!(chunk_end(&p, n + 4, 6, 100, Some(5)), 13); // recompute: generated tokens too
    }

    /// A sequence in the simulator: prompt length, tokens to generate, state.
    #[derive(Debug, Clone)]
    struct Sim {
        id: SeqId,
        prompt: Vec<u32>,
        max_new: usize,
        generated: usize,
        computed: usize,
    }

    impl Sim {
        /// No prefix caching: a running sequence holds and frees its own blocks only.
        fn state(&self, blocks: &BlockBudget) -> SeqState<'_> {
            SeqState {
                id: self.id,
                prompt: &self.prompt,
                len: self.prompt.len() + self.generated,
                computed: self.computed,
                held: blocks.held(self.computed),
                frees: blocks.held(self.computed),
            }
        }
    }

    /// The queues, and the runner's side of a plan (without a model): prefill moves `computed`,
    /// a decode samples one token and runs it, a sequence with all its tokens finishes.
    #[derive(Default)]
    struct Queues {
        waiting: Vec<Sim>,
        running: Vec<Sim>,
        finished: Vec<SeqId>,
    }

    impl Queues {
        fn new(requests: &[(usize, usize)]) -> Queues {
            let waiting = requests
                .iter()
                .enumerate()
                .map(|(i, &(prompt, max_new))| Sim {
                    id: i as SeqId,
                    prompt: vec![1; prompt],
                    max_new,
                    generated: 0,
                    computed: 0,
                })
                .collect();
            Queues {
                waiting,
                ..Queues::default()
            }
        }

        fn plan(&self, limits: &Limits) -> StepPlan {
            let w: Vec<_> = self
                .waiting
                .iter()
                .map(|s| s.state(&limits.blocks))
                .collect();
            let r: Vec<_> = self
                .running
                .iter()
                .map(|s| s.state(&limits.blocks))
                .collect();
            let n = limits.blocks.num_kv_blocks.unwrap_or_default();
            plan(&w, &r, limits, n.minus(self.held(&limits.blocks)), None)
        }

        fn held(&self, blocks: &BlockBudget) -> Blocks {
            self.running
                .iter()
                .fold(Blocks::default(), |a, s| a.plus(blocks.held(s.computed)))
        }

        fn apply(&mut self, p: &StepPlan) {
            for &id in &p.aborted {
                self.running.retain(|s| s.id != id);
                self.waiting.retain(|s| s.id != id);
            }
            for &id in &p.preempted {
                let i = self.running.iter().position(|s| s.id == id).unwrap();
                let mut s = self.running.remove(i);
                s.computed = 0;
                self.waiting.insert(0, s);
            }
            for &id in &p.admitted {
                assert_eq!(self.waiting[0].id, id, "admitted from the front");
                let s = self.waiting.remove(0);
                self.running.push(s);
            }
            for (id, c) in &p.prefill {
                let s = self.running.iter_mut().find(|s| s.id == *id).unwrap();
                assert_eq!(s.computed, c.start);
                s.computed = c.end;
            }
            for &id in &p.decode {
                let s = self.running.iter_mut().find(|s| s.id == id).unwrap();
                assert_eq!(s.computed, s.prompt.len() + s.generated);
                s.generated += 1; // sampled
                if s.generated == s.max_new {
                    self.finished.push(id);
                    self.running.retain(|s| s.id != id);
                } else {
                    s.computed += 1; // run through the model
                }
            }
        }

        /// Steps until both queues are empty; the plans.
        fn run(&mut self, limits: &Limits) -> Vec<StepPlan> {
            let mut plans = vec![];
            while !self.waiting.is_empty() || !self.running.is_empty() {
                assert!(plans.len() < 10_000, "no progress");
                let p = self.plan(limits);
                self.apply(&p);
                if let Some(n) = limits.blocks.num_kv_blocks {
                    assert!(self.held(&limits.blocks).fits_in(n), "over the pool: {p:?}");
                }
                assert!(self.running.len() <= limits.max_num_seqs);
                plans.push(p);
            }
            plans
        }
    }

    fn limits(max_num_seqs: usize, token_budget: usize, num_blocks: Option<usize>) -> Limits {
        Limits {
            max_num_seqs,
            token_budget,
            blocks: BlockBudget {
                num_kv_blocks: num_blocks.map(|n| Blocks([0, n])),
                block_size: 4,
                keep: [Keep::Nothing, Keep::All],
                ..BlockBudget::default()
            },
        }
    }

    #[test]
    fn admission_is_fifo_up_to_the_sequence_limit() {
        let mut q = Queues::new(&[(3, 2), (3, 2), (3, 2), (3, 2)]);
        let l = limits(2, 100, None);
        let p = q.plan(&l);
        assert_eq!(p.admitted, vec![0, 1]);
        assert_eq!(p.prefill, vec![(0, 0..3), (1, 0..3)]);
        assert_eq!(p.decode, vec![0, 1]); // prefill done: the first token in the same step
        q.apply(&p);
        let p = q.plan(&l);
        assert!(p.admitted.is_empty(), "no free slot: {p:?}");
        q.apply(&p); // 0 and 1 finish
        assert_eq!(q.finished, vec![0, 1]);
        assert_eq!(q.plan(&l).admitted, vec![2, 3]);
        q.run(&l);
        assert_eq!(q.finished, vec![0, 1, 2, 3]);
    }

    #[test]
    fn prefill_is_chunked_under_the_token_budget() {
        // Budget 4 per step: a 10-token prompt takes three steps; the one behind it gets what
        // is left of each step's budget, and decodes do not draw on it.
        let mut q = Queues::new(&[(10, 3), (3, 3)]);
        let l = limits(4, 4, None);
        let p = q.plan(&l);
        assert_eq!(p.prefill, vec![(0, 0..4)]);
        assert_eq!(p.admitted, vec![0, 1]); // admitted without a chunk: no budget left
        q.apply(&p);
        let p = q.plan(&l);
        assert_eq!(p.prefill, vec![(0, 4..8)]);
        q.apply(&p);
        let p = q.plan(&l);
        assert_eq!(p.prefill, vec![(0, 8..10), (1, 0..2)]);
        assert_eq!(p.decode, vec![0]);
        q.apply(&p);
        let p = q.plan(&l);
        assert_eq!(p.prefill, vec![(1, 2..3)]);
        assert_eq!(p.decode, vec![0, 1]);
        for p in q.run(&l) {
            let tokens: usize = p.prefill.iter().map(|(_, c)| c.len()).sum();
            assert!(tokens <= 4, "{p:?}");
        }
    }

    #[test]
    fn admission_waits_for_the_first_chunks_blocks() {
        // Blocks of 4 tokens, 4 in all. Request 0 (prompt 9 and its first decode: 3 blocks)
        // fits; request 1 (prompt 6 and a decode: 2 blocks) does not fit beside it until 0
        // finishes.
        let mut q = Queues::new(&[(9, 2), (6, 1)]);
        let l = limits(8, 100, Some(4));
        let p = q.plan(&l);
        assert_eq!(p.admitted, vec![0]);
        q.apply(&p);
        assert!(q.plan(&l).admitted.is_empty()); // 0 holds 3 blocks (10 tokens), 2 free
        let p = q.plan(&l);
        q.apply(&p); // 0 finishes
        assert_eq!(q.finished, vec![0]);
        assert_eq!(q.plan(&l).admitted, vec![1]);
        let plans = q.run(&l);
        assert!(plans.iter().all(|p| p.preempted.is_empty()));
        assert_eq!(q.finished, vec![0, 1]);
    }

    #[test]
    fn preemption_takes_the_newest_and_requeues_it_at_the_front() {
        // Three sequences of 4-token prompts, 3 blocks of 4: each fills its block with its
        // prompt, so the first decode needs a fourth block.
        let mut q = Queues::new(&[(3, 8), (3, 8), (3, 8), (3, 8)]);
        let l = limits(8, 100, Some(3));
        let p = q.plan(&l);
        assert_eq!(p.admitted, vec![0, 1, 2]); // 3 + 1 tokens each: one block each
        q.apply(&p);
        // Each now holds 4 tokens (one full block) and needs a second block to decode.
        let p = q.plan(&l);
        assert_eq!(p.preempted, vec![2, 1], "newest first");
        assert_eq!(p.decode, vec![0]);
        assert!(p.admitted.is_empty(), "a step that preempts admits nobody");
        q.apply(&p);
        let order: Vec<SeqId> = q.waiting.iter().map(|s| s.id).collect();
        assert_eq!(
            order,
            vec![1, 2, 3],
            "the preempted go back in front, oldest first"
        );
        q.run(&l);
        assert_eq!(q.finished, vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_preempted_sequence_is_recomputed_with_its_generated_tokens() {
        // Two 3-token prompts in 3 blocks of 4: at their second decode 1 is preempted, and it
        // comes back after 0 finishes, prefilling its prompt and the token it had generated.
        let mut q = Queues::new(&[(3, 8), (3, 8)]);
        let l = limits(8, 100, Some(3));
        let mut generated = None;
        loop {
            let p = q.plan(&l);
            if let Some(g) = generated {
                if p.admitted == vec![1] {
                    assert_eq!(q.finished, vec![0]);
                    assert_eq!(p.prefill, vec![(1, 0..3 + g)]);
                    break;
                }
            }
            q.apply(&p);
            if p.preempted == vec![1] {
                generated = Some(q.waiting[0].generated);
            }
        }
        assert_eq!(generated, Some(1));
        q.run(&l);
        assert_eq!(q.finished, vec![0, 1]);
    }

    #[test]
    fn the_head_of_the_queue_is_never_skipped() {
        // A big request at the head does not fit beside the running one; the small ones behind
        // it would, but wait their turn.
        let mut q = Queues::new(&[(4, 6), (15, 1), (2, 1), (2, 1)]);
        let l = limits(8, 100, Some(5));
        let p = q.plan(&l);
        assert_eq!(p.admitted, vec![0]); // 1 needs 4 blocks; 0 holds 2 of 5 after its decode
        q.apply(&p);
        let mut order = vec![];
        for p in q.run(&l) {
            order.extend(p.admitted);
        }
        assert_eq!(order, vec![1, 2, 3]);
        assert_eq!(q.finished, vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_sequence_larger_than_the_pool_is_aborted() {
        // A prompt that needs more blocks than there are is aborted, not left at the head.
        let q = Queues::new(&[(20, 1), (3, 1)]);
        let l = limits(8, 100, Some(3));
        let p = q.plan(&l);
        assert_eq!(p.aborted, vec![0]);
        assert_eq!(p.admitted, vec![1]);
        // One that outgrows the pool while decoding alone is aborted too.
        let mut q = Queues::new(&[(3, 100)]);
        let plans = q.run(&l);
        assert_eq!(plans.last().unwrap().aborted, vec![0]);
        assert!(plans.iter().all(|p| p.preempted.is_empty()));
    }

    #[test]
    fn many_sequences_in_a_small_pool_all_finish() {
        let requests: Vec<(usize, usize)> = (0..24).map(|i| (1 + i * 7 % 13, 1 + i % 9)).collect();
        let mut q = Queues::new(&requests);
        let plans = q.run(&limits(6, 8, Some(8)));
        assert!(plans.iter().any(|p| !p.preempted.is_empty()));
        assert!(plans.iter().all(|p| p.aborted.is_empty()));
        let mut finished = q.finished.clone();
        finished.sort();
        assert_eq!(finished, (0..24).collect::<Vec<_>>());
    }

    /// A hand-made state (prefix caching: `held` and `frees` as the pool reports them).
    fn state(
        id: SeqId,
        prompt: &[u32],
        len: usize,
        computed: usize,
        held: usize,
        frees: usize,
    ) -> SeqState<'_> {
        SeqState {
            id,
            prompt,
            len,
            computed,
            held: Blocks([0, held]),
            frees: Blocks([0, frees]),
        }
    }

    #[test]
    fn a_prefix_hit_needs_only_the_blocks_it_does_not_share() {
        // Blocks of 4. r decodes its 16th token (4 blocks held, a 5th needed); w's 20-token
        // prompt shares r's 16 tokens: it runs 16..20 and holds 6 blocks by its first decode,
        // 4 of them r's. With 3 blocks available both fit; without the hit w needs 6.
        let l = limits(8, 100, Some(7));
        let (a, b) = ([1; 16], [1; 20]);
        let r = [state(0, &a, 16, 16, 4, 4)];
        let p = plan(&[state(1, &b, 20, 16, 4, 0)], &r, &l, Blocks([0, 3]), None);
        assert_eq!(p.admitted, vec![1]);
        assert_eq!(p.prefill, vec![(1, 16..20)]);
        let p = plan(&[state(1, &b, 20, 0, 0, 0)], &r, &l, Blocks([0, 3]), None);
        assert!(p.admitted.is_empty());
    }

    #[test]
    fn preemption_counts_only_the_blocks_it_frees() {
        // a needs one more block and none is available; c (newest) shares all its blocks with
        // a, so preempting it frees nothing, and b must go too.
        let l = limits(8, 100, Some(20));
        let t = [1; 16];
        let running = [
            state(0, &t, 16, 16, 4, 4),
            state(1, &t, 16, 16, 4, 1),
            state(2, &t, 16, 16, 4, 0),
        ];
        let p = plan(&[], &running, &l, Blocks([0, 0]), None);
        assert_eq!(p.preempted, vec![2, 1]);
        assert_eq!(p.decode, vec![0]);
    }
}
