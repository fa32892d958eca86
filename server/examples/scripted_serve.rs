//! The real server over the scripted test model: every request is answered with `--scripted-output`
//! (tokenized with the checkpoint's tokenizer, special tokens included) instead of running the
//! weights, which are never loaded. The checkpoint's configs, tokenizer and chat template are used
//! as `gemma4 serve` uses them. The Python client tests (`conformance/openai_client`) drive thinking
//! and tool calls through it, which a random-weight fixture never emits.
//!
//! ```sh
//! cargo run -p gemma4-server --example scripted_serve -- --port 8001 --scripted-output 'TEXT'
//! ```

use anyhow::{anyhow, Result};
use clap::Parser;
use gemma4_engine::scripted::ScriptedModel;
use gemma4_engine::Engine;
use gemma4_server::serve::{run_with, ModelMeta, ServeArgs};

#[derive(Parser)]
#[command(about = "gemma4 serve over the scripted test model")]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
    /// What every request is answered with.
    #[arg(long)]
    scripted_output: String,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let Cli {
        serve: args,
        scripted_output,
    } = Cli::parse();
    let dir = &args.model;
    let config = gemma4_model::ModelConfig::from_dir(dir)?;
    let generation = gemma4_model::GenerationConfig::from_dir(dir)?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow!("{}: {e}", tok_path.display()))?;
    let script = tokenizer
        .encode(scripted_output, false)
        .map_err(|e| anyhow!("tokenizing the script: {e}"))?
        .get_ids()
        .to_vec();
    tracing::warn!(
        tokens = script.len(),
        "test server: every request is answered with the scripted output, not the model"
    );
    let meta = ModelMeta::from_configs(dir, &config, &generation, config.vision.is_some())?;
    let model = ScriptedModel {
        vocab_size: config.text.vocab_size,
        script,
        image_token_id: config.image_token_id,
    };
    let (engine, _thread) = Engine::start(args.engine_config(), move || Ok(model))?;
    run_with(args, engine, meta)
}
