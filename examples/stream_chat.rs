//! Multi-turn chat, streamed token by token.
//!
//! `cargo run --release --example stream_chat -- --model "$(scripts/get_smollm2.sh)"`
//! (with `--features hub` and no `--model`, Qwen2.5-0.5B-Instruct is downloaded). Options:
//! `--ctx N` (context, default 4096), `--threads N`, `--max-tokens N` (default a quarter of the
//! context), `--temperature T` (0 is greedy), `--seed S`; sampling otherwise follows the model
//! (`generation_config.json`, GGUF `general.sampling.*`, else Ollama-like defaults). `/help` lists
//! the commands. Reads stdin line by line, so it also works piped:
//! `printf 'Hi!\n/exit\n' | cargo run --release --example stream_chat -- --model M`.
//! An error in a turn is printed and the chat goes on; Ctrl-C stops the reply only.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use metal_candle::chat::{ChatCommand, ChatSession, CHAT_HELP};
use metal_candle::generation::defaults::chat_reply_cap;
use metal_candle::generation::{Event, GenerateParams, Generator};
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
    let loaded = load_model(&model_path(args.model)?, &opts)?;
    let mut chat = ChatSession::new(Generator::from_loaded(&loaded)?)?;
    let context = loaded.model.max_positions();
    let mut sampling = loaded.chat_defaults.sampling.clone();
    sampling.temperature = args.temperature.unwrap_or(sampling.temperature);
    sampling.seed = args.seed.unwrap_or(299792458);
    let params = GenerateParams { sampling, max_tokens: args.max_tokens.unwrap_or(chat_reply_cap(context)), ..Default::default() };
    params.validate()?;
    let s = &params.sampling;
    eprintln!(
        "[{}: temperature {}, top-k {}, top-p {}, repetition penalty {}; replies up to {} of {context} tokens; /help lists commands]",
        loaded.chat_defaults.source.as_str(), s.temperature, s.top_k, s.top_p, s.repetition_penalty, params.max_tokens
    );
    interrupt::install();
    let interactive = std::io::stdin().is_terminal();
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if interactive {
            print!("> ");
            std::io::stdout().flush()?;
        }
        let Some(line) = lines.next().transpose()? else { break };
        let result = match ChatCommand::parse(&line) {
            ChatCommand::Exit => break,
            ChatCommand::Say(user) => reply(&mut chat, &user, &params),
            command => control(&mut chat, command),
        };
        if let Err(e) = result {
            // The conversation survives a failed turn: the user message was not kept.
            println!("error: {e}");
        }
    }
    Ok(())
}

/// Every command but `/exit` and text for the model; each confirms what it did.
fn control(chat: &mut ChatSession, command: ChatCommand) -> Res<()> {
    match command {
        ChatCommand::Help => println!("{CHAT_HELP}"),
        ChatCommand::Unknown(cmd) => println!("unknown command {cmd}\n{CHAT_HELP}"),
        ChatCommand::Reset => {
            chat.reset();
            println!("[conversation reset]");
        }
        ChatCommand::System(text) => {
            chat.reset();
            chat.set_system(Some(&text));
            println!("[system prompt set; new conversation]");
        }
        ChatCommand::Save(path) => {
            chat.history().save(&path)?;
            println!("[saved {}]", path.display());
        }
        _ => {}
    }
    Ok(())
}

fn reply(chat: &mut ChatSession, user: &str, params: &GenerateParams) -> Res<()> {
    let mut stream = chat.send(user, params)?;
    if let Some(notice) = stream.trimmed() {
        println!("{notice}");
    }
    let cancel = stream.cancel_handle();
    let _replying = interrupt::Replying::start();
    let mut out = std::io::stdout().lock();
    for event in &mut stream {
        match event? {
            Event::Token { text, .. } => write!(out, "{text}")?,
            Event::Finished(done) => {
                let t = done.timings;
                writeln!(out, "{}", done.text)?;
                let reason = done.reason.as_str();
                let (ttft, tps) = (t.ttft.as_secs_f64() * 1e3, t.decode_tokens_per_s);
                writeln!(out, "[{reason}: TTFT {ttft:.0} ms, {tps:.1} tok/s, {} prompt tokens ({} cached)]", t.prompt_tokens, t.cached_tokens)?;
            }
        }
        out.flush()?;
        if interrupt::requested() {
            cancel.iter().for_each(|c| c.cancel());
        }
    }
    Ok(())
}

/// Ctrl-C during a reply stops the reply (the stream is cancelled before its next token); at the
/// prompt it ends the program as usual.
#[cfg(unix)]
mod interrupt {
    use std::sync::atomic::{AtomicBool, Ordering};

    static REPLYING: AtomicBool = AtomicBool::new(false);
    static REQUESTED: AtomicBool = AtomicBool::new(false);

    extern "C" fn on_sigint(_: libc::c_int) {
        if REPLYING.load(Ordering::SeqCst) {
            REQUESTED.store(true, Ordering::SeqCst);
        } else {
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(130) }
        }
    }

    pub fn install() {
        // SAFETY: the handler only touches atomics and calls _exit, both async-signal-safe.
        unsafe { libc::signal(libc::SIGINT, on_sigint as extern "C" fn(libc::c_int) as *const () as libc::sighandler_t) };
    }

    pub fn requested() -> bool {
        REQUESTED.load(Ordering::SeqCst)
    }

    /// Marks a reply in progress until dropped.
    pub struct Replying;

    impl Replying {
        pub fn start() -> Self {
            REQUESTED.store(false, Ordering::SeqCst);
            REPLYING.store(true, Ordering::SeqCst);
            Replying
        }
    }

    impl Drop for Replying {
        fn drop(&mut self) {
            REPLYING.store(false, Ordering::SeqCst);
        }
    }
}

#[cfg(not(unix))]
mod interrupt {
    pub fn install() {}
    pub fn requested() -> bool {
        false
    }
    pub struct Replying;
    impl Replying {
        pub fn start() -> Self {
            Replying
        }
    }
}
