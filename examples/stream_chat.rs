//! Multi-turn chat, streamed token by token.
//!
//! `cargo run --release --example stream_chat -- --model "$(scripts/get_smollm2.sh)"`
//! (with `--features hub` and no `--model`, Qwen2.5-0.5B-Instruct is downloaded). Commands:
//! `/reset`, `/system TEXT`, `/save FILE.md|FILE.json`, `/exit`. Reads stdin line by line, so it
//! also works piped: `printf 'Hi!\n/exit\n' | cargo run --example stream_chat -- --model M`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use metal_candle::chat::ChatSession;
use metal_candle::generation::{Event, GenerateParams, Generator};
use metal_candle::{load_model, LoadOptions};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const LOCAL_HINT: &str = "pass a local model: --model \"$(scripts/get_smollm2.sh)\" (any GGUF file or HF model directory)";

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
    let mut args = std::env::args().skip(1);
    let (mut model, mut max_tokens) = (None, 512);
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--model", Some(v)) => model = Some(v),
            ("--max-tokens", Some(v)) => max_tokens = v.parse()?,
            _ => return Err(format!("usage: stream_chat [--model PATH] [--max-tokens N]; got {flag}").into()),
        }
    }
    let loaded = load_model(&model_path(model)?, &LoadOptions::default())?;
    let mut chat = ChatSession::new(Generator::from_loaded(&loaded)?)?;
    let params = GenerateParams { max_tokens, ..GenerateParams::default() };
    let interactive = std::io::stdin().is_terminal();
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if interactive {
            print!("> ");
            std::io::stdout().flush()?;
        }
        let Some(line) = lines.next().transpose()? else { break };
        match line.trim() {
            "" => {}
            "/exit" => break,
            "/reset" => chat.reset(),
            cmd if cmd.starts_with("/system ") => chat.set_system(Some(cmd["/system ".len()..].trim())),
            cmd if cmd.starts_with("/save ") => {
                let path = PathBuf::from(cmd["/save ".len()..].trim());
                chat.history().save(&path)?;
                println!("[saved {}]", path.display());
            }
            user => reply(&mut chat, user, &params)?,
        }
    }
    Ok(())
}

fn reply(chat: &mut ChatSession, user: &str, params: &GenerateParams) -> Res<()> {
    let mut out = std::io::stdout().lock();
    for event in chat.send(user, params)? {
        match event? {
            Event::Token { text, .. } => write!(out, "{text}")?,
            Event::Finished(done) => {
                let t = done.timings;
                writeln!(out, "{}", done.text)?;
                writeln!(
                    out,
                    "[{}: TTFT {:.0} ms, {:.1} tok/s, {} prompt tokens ({} cached)]",
                    done.reason.as_str(),
                    t.ttft.as_secs_f64() * 1e3,
                    t.decode_tokens_per_s,
                    t.prompt_tokens,
                    t.cached_tokens
                )?;
            }
        }
        out.flush()?;
    }
    Ok(())
}
