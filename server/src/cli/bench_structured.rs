//! `gemma4 bench-structured`: what structured outputs cost. (1) The time llguidance takes to
//! compute one token's mask at the 31B's vocabulary (262,144 tokens: a synthetic vocabulary of
//! byte tokens, specials and word pieces, since the real tokenizer is not bundled), walking a
//! JSON schema with random allowed tokens. (2) Decode tokens/s on a checkpoint through the
//! engine, with and without the same schema, in the same run.

use std::collections::HashSet;
use std::time::Instant;

use anyhow::{anyhow, Result};
use gemma4_engine::structured::{Format, Grammars};
use gemma4_engine::{BlockBudget, Engine, EngineConfig, EngineEvent, EngineRequest};
use gemma4_model::generation::Rng;
use gemma4_model::{Gemma4Backend, Model, SamplingParams};
use serde_json::{json, Value};

/// The schema both parts walk: nested object, array of an enum, bounded string and integers.
fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 16}, "zip": {"type": "integer", "minimum": 1000, "maximum": 99999}},
                "required": ["city", "zip"],
                "additionalProperties": false
            }
        },
        "required": ["name", "age", "tags", "address"],
        "additionalProperties": false
    })
}

/// A vocabulary of `n` distinct tokens shaped like a real one: specials (0xFF-prefixed), the
/// 256 bytes, then word pieces (letters, with or without a leading space, capitalized, digits,
/// JSON punctuation). Token 1 ends the answer.
fn synthetic_vocab(n: usize, rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut words: Vec<Vec<u8>> = ["<pad>", "<turn|>", "<bos>", "<|channel>", "<channel|>"]
        .iter()
        .map(|s| [&[0xFF][..], s.as_bytes()].concat())
        .collect();
    words.extend((0..=255u8).map(|b| vec![b]));
    let mut seen: HashSet<Vec<u8>> = words.iter().cloned().collect();
    let pieces = [
        "\"", "\":", "\": ", "{\"", "\"}", "},", "\", \"", ", ", "[\"", "\"]", "]", "}",
    ];
    while words.len() < n {
        let r = rng.next_f64();
        let mut w: Vec<u8> = Vec::new();
        if r < 0.02 {
            w.extend(pieces[(rng.next_u64() % pieces.len() as u64) as usize].as_bytes());
            w.extend(format!("{}", rng.next_u64() % 100).as_bytes());
        } else if r < 0.1 {
            let digits = 1 + rng.next_u64() % 4;
            (0..digits).for_each(|_| w.push(b'0' + (rng.next_u64() % 10) as u8));
        } else {
            if rng.next_f64() < 0.5 {
                w.push(b' ');
            }
            let len = 1 + (rng.next_u64() % 10) as usize;
            for k in 0..len {
                let c = b'a' + (rng.next_u64() % 26) as u8;
                w.push(if k == 0 && rng.next_f64() < 0.2 {
                    c.to_ascii_uppercase()
                } else {
                    c
                });
            }
        }
        if seen.insert(w.clone()) {
            words.push(w);
        }
    }
    words
}

/// Percentile `p` of sorted `v`.
fn percentile(v: &[f64], p: f64) -> f64 {
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Part (1): mask times over `steps` tokens at a `vocab`-token vocabulary.
fn mask_times(vocab: usize, steps: usize) -> Result<Value> {
    let mut rng = Rng::new(13);
    let start = Instant::now();
    let grammars =
        Grammars::from_words(&synthetic_vocab(vocab, &mut rng), 1).map_err(|e| anyhow!("{e}"))?;
    let build_ms = start.elapsed().as_secs_f64() * 1e3;
    let format = Format::JsonSchema(schema());
    let compile = Instant::now();
    let mut c = grammars
        .compile(&format, None)
        .map_err(|e| anyhow!("{e}"))?;
    let compile_ms = compile.elapsed().as_secs_f64() * 1e3;
    let (mut times, mut allowed, mut answers) = (Vec::with_capacity(steps), 0usize, 0);
    for _ in 0..steps {
        let t = Instant::now();
        let mask = c
            .allowed()
            .map_err(|e| anyhow!("{e}"))?
            .expect("no thinking");
        times.push(t.elapsed().as_secs_f64() * 1e6);
        let ids = mask.to_list();
        allowed += ids.len();
        let id = ids[(rng.next_u64() % ids.len() as u64) as usize];
        c.consume(id).map_err(|e| anyhow!("{e}"))?;
        if c.is_done() {
            answers += 1;
            c = grammars
                .compile(&format, None)
                .map_err(|e| anyhow!("{e}"))?;
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(json!({
        "vocab": vocab,
        "steps": steps,
        "answers_completed": answers,
        "vocab_build_ms": build_ms,
        "compile_ms": compile_ms,
        "mask_us_mean": times.iter().sum::<f64>() / times.len() as f64,
        "mask_us_p50": percentile(&times, 0.5),
        "mask_us_p99": percentile(&times, 0.99),
        "mask_us_max": times[times.len() - 1],
        "allowed_mean": allowed as f64 / steps as f64,
    }))
}

/// Part (2): `requests` sequential requests of up to `max_tokens` tokens at temperature 1, each
/// once free and once under the schema; decode tokens/s of each.
fn decode_rates<B: Gemma4Backend>(
    dir: &std::path::Path,
    device: B::Device,
    requests: usize,
    max_tokens: usize,
) -> Result<Value> {
    let json = std::fs::read_to_string(dir.join("tokenizer.json"))?;
    let config = gemma4_model::ModelConfig::from_dir(dir)?;
    let tok = tokenizers::Tokenizer::from_bytes(json.as_bytes()).map_err(|e| anyhow!("{e}"))?;
    let end = tok
        .token_to_id("<turn|>")
        .ok_or_else(|| anyhow!("no <turn|> token"))?;
    let grammars = Grammars::new(&json, config.text.vocab_size, end).map_err(|e| anyhow!("{e}"))?;
    let prompt = tok
        .encode("Describe a person as JSON.", false)
        .map_err(|e| anyhow!("{e}"))?
        .get_ids()
        .to_vec();
    let dir = dir.to_path_buf();
    let config = EngineConfig {
        max_num_seqs: 16,
        prefill_chunk: 2048,
        max_waiting: 16,
        blocks: BlockBudget::default(),
    };
    let (engine, thread) =
        Engine::start::<Model<B>, _>(config, move || crate::load::<B>(&dir, &device))?;
    let run = |constrained: bool| -> Result<(usize, f64)> {
        let (mut tokens, mut seconds) = (0, 0.0);
        for seed in 0..requests as u64 {
            let mut req = EngineRequest::greedy(prompt.clone(), max_tokens);
            req.sampling = SamplingParams {
                temperature: 1.0,
                seed,
                ..SamplingParams::greedy()
            };
            if constrained {
                let c = grammars.compile(&Format::JsonSchema(schema()), None);
                req.constraint = Some(c.map_err(|e| anyhow!("{e}"))?);
            }
            let mut handle = engine.submit(req).map_err(|e| anyhow!("submit: {e}"))?;
            // From the first token on: decode only.
            let mut first = None;
            let mut n = 0;
            while let Some(event) = handle.events.blocking_recv() {
                match event {
                    EngineEvent::Token { .. } => {
                        first.get_or_insert_with(Instant::now);
                        n += 1;
                    }
                    EngineEvent::Finished { .. } => break,
                    EngineEvent::Error(e) => return Err(anyhow!(e)),
                    EngineEvent::Admitted { .. } => {}
                }
            }
            if let Some(t) = first {
                seconds += t.elapsed().as_secs_f64();
                tokens += n - 1;
            }
        }
        Ok((tokens, seconds))
    };
    let (free_tokens, free_s) = run(false)?;
    let (json_tokens, json_s) = run(true)?;
    engine.shutdown();
    thread
        .join()
        .map_err(|_| anyhow!("the engine thread panicked"))?;
    Ok(json!({
        "requests": requests,
        "max_tokens": max_tokens,
        "free": {"tokens": free_tokens, "tok_s": free_tokens as f64 / free_s},
        "json_schema": {"tokens": json_tokens, "tok_s": json_tokens as f64 / json_s},
        "ratio": (json_tokens as f64 / json_s) / (free_tokens as f64 / free_s),
    }))
}

/// Both parts, one JSON line.
pub fn run<B: Gemma4Backend>(
    dir: &std::path::Path,
    device: B::Device,
    vocab: usize,
    steps: usize,
    requests: usize,
    max_tokens: usize,
) -> Result<Value> {
    Ok(json!({
        "bench": "structured",
        "model": dir.display().to_string(),
        "mask": mask_times(vocab, steps.max(1))?,
        "decode": decode_rates::<B>(dir, device, requests.max(1), max_tokens.max(2))?,
    }))
}
