//! Multi-turn chat, streamed token by token.
//!
//! `cargo run --release --features full --example stream_chat -- --model "$(scripts/get_smollm2.sh)"`
//! (with `--features hub` and no `--model`, Qwen2.5-0.5B-Instruct is downloaded). Options:
//! `--ctx N` (context, default 4096), `--threads N`, `--max-tokens N` (default a quarter of the
//! context), `--temperature T` (0 is greedy), `--seed S`; sampling otherwise follows the model
//! (`generation_config.json`, GGUF `general.sampling.*`, else Ollama-like defaults). `/help` lists
//! the commands (`/model PATH` switches to another model file). Reads stdin line by line, so it
//! also works piped: `printf 'Hi!\n/exit\n' | cargo run --release --features full --example stream_chat -- --model M`.
//! An error in a turn is printed and the chat goes on; Ctrl-C stops the reply only. The loop is
//! the library's [`metal_candle::chat::Repl`], as in `metal-candle chat` (which adds the model
//! library and line editing).

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use metal_candle::chat::{interrupt, ChatModel, ModelSource, Repl};
use metal_candle::generation::defaults::chat_reply_cap;
use metal_candle::generation::{GenerateParams, Generator};
use metal_candle::{load_model, LoadOptions};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const USAGE: &str = "usage: stream_chat [--model PATH] [--ctx N] [--threads N] [--max-tokens N] [--temperature T] [--seed S]";
const LOCAL_HINT: &str = "pass a local model: --model \"$(scripts/get_smollm2.sh)\" (any GGUF file or HF model directory)";

#[derive(Default)]
struct Args {
    model: Option<String>,
    ctx: Option<usize>,
    threads: Option<usize>,
    max_tokens: Option<usize>,
    temperature: Option<f64>,
    seed: Option<u64>,
}

fn parse_args() -> Res<Args> {
    let (mut a, mut it) = (Args::default(), std::env::args().skip(1));
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value; {USAGE}"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--model" => a.model = Some(value.clone()),
            "--ctx" => a.ctx = Some(value.parse().map_err(|e| bad(&e))?),
            "--threads" => a.threads = Some(value.parse().map_err(|e| bad(&e))?),
            "--max-tokens" => a.max_tokens = Some(value.parse().map_err(|e| bad(&e))?),
            "--temperature" => a.temperature = Some(value.parse().map_err(|e| bad(&e))?),
            "--seed" => a.seed = Some(value.parse().map_err(|e| bad(&e))?),
            _ => return Err(format!("unknown option {flag}; {USAGE}").into()),
        }
    }
    Ok(a)
}

fn model_path(arg: Option<String>) -> Res<PathBuf> {
    if let Some(path) = arg {
        return Ok(PathBuf::from(path));
    }
    #[cfg(feature = "hub")]
    {
        let (repo, file) = ("Qwen/Qwen2.5-0.5B-Instruct-GGUF", "qwen2.5-0.5b-instruct-q8_0.gguf");
        eprintln!("downloading {repo}/{file} (cached after the first time)");
        metal_candle::hub::download_file(repo, None, file, true)
            .map_err(|e| format!("{e}\nno network? {LOCAL_HINT}").into())
    }
    #[cfg(not(feature = "hub"))]
    Err(format!("no --model given; {LOCAL_HINT}, or build with --features hub to download one").into())
}

/// `/model PATH` loads a file or directory; there is no library to list.
struct Files(LoadOptions);

impl ModelSource for Files {
    fn load(&mut self, path: &str) -> metal_candle::Result<ChatModel> {
        let loaded = load_model(path.as_ref(), &self.0)?;
        Ok(ChatModel { name: path.to_string(), generator: Generator::from_loaded(&loaded)? })
    }

    fn names(&mut self) -> metal_candle::Result<Vec<String>> {
        Ok(Vec::new())
    }
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Res<()> {
    let args = parse_args()?;
    if let Some(n) = args.threads {
        // Before the first computation: candle and rayon size their pools from it once.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let defaults = LoadOptions::default();
    let opts = LoadOptions { max_positions: args.ctx.unwrap_or(defaults.max_positions), ..defaults };
    let path = model_path(args.model)?;
    let loaded = load_model(&path, &opts)?;
    let model = ChatModel { name: path.display().to_string(), generator: Generator::from_loaded(&loaded)? };
    let context = loaded.model.max_positions();
    let mut sampling = loaded.chat_defaults.sampling.clone();
    sampling.temperature = args.temperature.unwrap_or(sampling.temperature);
    sampling.seed = args.seed.unwrap_or(299792458);
    let params = GenerateParams { sampling, max_tokens: args.max_tokens.unwrap_or(chat_reply_cap(context)), ..Default::default() };
    let settings = loaded.chat_defaults.source.as_str();
    drop(loaded);
    let mut repl = Repl::new(model, params, Files(opts))?;
    eprintln!("[{}: {} ({settings}); context {context}; /help lists commands]", repl.model_name(), repl.params_line());
    interrupt::install();
    let interactive = std::io::stdin().is_terminal();
    let mut lines = std::io::stdin().lock().lines();
    let prompted = std::iter::from_fn(|| {
        if interactive {
            print!("> ");
            let _ = std::io::stdout().flush();
        }
        lines.next()
    });
    repl.run(prompted, &mut std::io::stdout())?;
    Ok(())
}
