//! The interactive chat loop shared by `metal-candle chat` and `examples/stream_chat.rs`: lines
//! in, streamed replies and command results out. Where the lines come from (a terminal with line
//! editing, a pipe) and how a model is found by name (the library, a fixed list) are the
//! caller's: [`Repl::run`] takes any iterator of lines and any [`Write`], and models come from a
//! [`ModelSource`].
//!
//! ```no_run
//! use metal_candle::chat::{ChatModel, ModelSource, Repl};
//! use metal_candle::generation::{GenerateParams, Generator};
//! # fn main() -> metal_candle::Result<()> {
//! struct Files;
//! impl ModelSource for Files {
//!     fn load(&mut self, path: &str) -> metal_candle::Result<ChatModel> {
//!         let loaded = metal_candle::load_model(path.as_ref(), &Default::default())?;
//!         Ok(ChatModel { name: path.to_string(), generator: Generator::from_loaded(&loaded)? })
//!     }
//!     fn names(&mut self) -> metal_candle::Result<Vec<String>> {
//!         Ok(Vec::new())
//!     }
//! }
//! let mut source = Files;
//! let first = source.load("model.gguf")?;
//! let mut repl = Repl::new(first, GenerateParams::default(), source)?;
//! let lines = ["Hello!", "/params temperature 0", "And again?"].map(|l| Ok(l.to_string()));
//! repl.run(lines, &mut std::io::stdout()).map_err(|e| metal_candle::Error::InvalidParameter {
//!     name: "stdout",
//!     reason: e.to_string(),
//! })?;
//! # Ok(()) }
//! ```

use std::io::Write;
use std::path::Path;

use super::{interrupt, ChatCommand, ChatHistory, ChatSession, CHAT_HELP};
use crate::error::{Error, Result};
use crate::generation::{Event, GenerateParams, Generator};

/// A model ready to chat with, and the name to show for it.
#[derive(Debug, Clone)]
pub struct ChatModel {
    /// The library name, or the path it was loaded from.
    pub name: String,
    /// Model, tokenizer and chat template.
    pub generator: Generator,
}

/// Where `/model` and `/models` find models.
pub trait ModelSource {
    /// Loads the model called `name_or_path`. Errors: whatever loading fails with
    /// ([`Error::ModelNotFound`] for an unknown name, a loader error for a bad file).
    fn load(&mut self, name_or_path: &str) -> Result<ChatModel>;

    /// The names `/model` accepts (a path is always accepted too).
    fn names(&mut self) -> Result<Vec<String>>;
}

/// Whether the loop goes on after a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Read the next line.
    Continue,
    /// `/exit`.
    Exit,
}

/// The settings `/params KEY VALUE` changes, in the order `/params` shows them.
pub const PARAM_KEYS: [&str; 7] = ["temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_tokens", "seed"];

/// A failure while handling one line: the chat's own (printed, the loop goes on) or the output's.
enum Fail {
    Chat(Error),
    Out(std::io::Error),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Chat(e)
    }
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Self {
        Fail::Out(e)
    }
}

/// One interactive conversation: a [`ChatSession`], the generation settings and the model
/// source. Every command's outcome is one bracketed line (`[saved chat.json]`) or an `error: …`
/// line; an error never ends the loop and leaves the conversation as it was.
pub struct Repl<S> {
    chat: ChatSession,
    model: String,
    params: GenerateParams,
    source: S,
}

impl<S: ModelSource> Repl<S> {
    /// A conversation with `model`. Errors: `params` invalid ([`Error::InvalidParameter`]), or the
    /// model without a chat template ([`Error::ChatTemplate`]).
    pub fn new(model: ChatModel, params: GenerateParams, source: S) -> Result<Self> {
        params.validate()?;
        Ok(Self { chat: ChatSession::new(model.generator)?, model: model.name, params, source })
    }

    /// The conversation.
    pub fn session(&self) -> &ChatSession {
        &self.chat
    }

    /// The conversation, to set a system prompt before the first line.
    pub fn session_mut(&mut self) -> &mut ChatSession {
        &mut self.chat
    }

    /// The current generation settings.
    pub fn params(&self) -> &GenerateParams {
        &self.params
    }

    /// The current model's name.
    pub fn model_name(&self) -> &str {
        &self.model
    }

    /// `temperature 0.8, top_k 40, …`: the settings `/params` shows.
    pub fn params_line(&self) -> String {
        let (p, s) = (&self.params, &self.params.sampling);
        format!(
            "temperature {}, top_k {}, top_p {}, min_p {}, repetition_penalty {}, max_tokens {}, seed {}",
            s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty, p.max_tokens, s.seed
        )
    }

    /// Handles lines until `/exit` or the end of `lines`. Errors: only reading a line or writing
    /// to `out` (a command's failure is printed and the loop goes on).
    pub fn run<I, W>(&mut self, lines: I, out: &mut W) -> std::io::Result<()>
    where
        I: IntoIterator<Item = std::io::Result<String>>,
        W: Write,
    {
        for line in lines {
            if self.handle(&line?, out)? == Flow::Exit {
                break;
            }
        }
        Ok(())
    }

    /// Handles one line: text is sent to the model and the reply streamed to `out`, commands
    /// run. Errors: only writing to `out`.
    pub fn handle<W: Write>(&mut self, line: &str, out: &mut W) -> std::io::Result<Flow> {
        let command = ChatCommand::parse(line);
        if command == ChatCommand::Exit {
            return Ok(Flow::Exit);
        }
        let hint = matches!(command, ChatCommand::Model(_));
        match self.execute(command, out) {
            Ok(()) => {}
            Err(Fail::Out(e)) => return Err(e),
            Err(Fail::Chat(e)) => {
                writeln!(out, "error: {e}")?;
                if hint && matches!(e, Error::ModelNotFound { .. }) {
                    writeln!(out, "(/models lists the library's models; /model also takes a file or directory path)")?;
                }
            }
        }
        out.flush()?;
        Ok(Flow::Continue)
    }

    fn execute<W: Write>(&mut self, command: ChatCommand, out: &mut W) -> std::result::Result<(), Fail> {
        match command {
            ChatCommand::Empty | ChatCommand::Exit => {}
            ChatCommand::Say(text) => self.reply(&text, out)?,
            ChatCommand::Help => writeln!(out, "{CHAT_HELP}")?,
            ChatCommand::Unknown(cmd) => writeln!(out, "unknown command {cmd}\n{CHAT_HELP}")?,
            ChatCommand::Reset => {
                self.chat.reset();
                writeln!(out, "[conversation reset]")?;
            }
            ChatCommand::System(text) => {
                self.chat.reset();
                self.chat.set_system(Some(&text));
                writeln!(out, "[system prompt set; new conversation]")?;
            }
            ChatCommand::Save(path) => {
                self.chat.history().save(&path)?;
                writeln!(out, "[saved {} messages to {}]", self.chat.history().messages.len(), path.display())?;
            }
            ChatCommand::Load(path) => self.load(&path, out)?,
            ChatCommand::Models => self.list_models(out)?,
            ChatCommand::Model(name) => self.switch(&name, out)?,
            ChatCommand::ShowParams => writeln!(out, "[{}]", self.params_line())?,
            ChatCommand::SetParam { key, value } => {
                self.params = with_param(&self.params, &key, &value)?;
                writeln!(out, "[{}]", self.params_line())?;
            }
        }
        Ok(())
    }

    fn load<W: Write>(&mut self, path: &Path, out: &mut W) -> std::result::Result<(), Fail> {
        let history = ChatHistory::load(path)?;
        let n = history.messages.len();
        self.chat.set_history(history);
        writeln!(out, "[loaded {n} messages from {}; the next turn continues that conversation]", path.display())?;
        Ok(())
    }

    fn list_models<W: Write>(&mut self, out: &mut W) -> std::result::Result<(), Fail> {
        let names = self.source.names()?;
        if names.is_empty() {
            writeln!(out, "[no models in the library (metal-candle models add PATH); /model also takes a path]")?;
        }
        for name in names {
            let mark = if name == self.model { "*" } else { " " };
            writeln!(out, "{mark} {name}")?;
        }
        Ok(())
    }

    /// Loads the new model first and only then drops the old one, so that a failed load (unknown
    /// name, bad file, no chat template) leaves the chat as it was; the price is both models in
    /// memory for the length of the load.
    fn switch<W: Write>(&mut self, name: &str, out: &mut W) -> std::result::Result<(), Fail> {
        let model = self.source.load(name)?;
        self.chat.set_generator(model.generator)?;
        self.model = model.name;
        let n = self.chat.history().messages.len();
        writeln!(out, "[switched to {}; the conversation ({n} messages) goes on with its chat template]", self.model)?;
        Ok(())
    }

    fn reply<W: Write>(&mut self, text: &str, out: &mut W) -> std::result::Result<(), Fail> {
        let mut stream = self.chat.send(text, &self.params)?;
        if let Some(notice) = stream.trimmed() {
            writeln!(out, "{notice}")?;
        }
        let cancel = stream.cancel_handle();
        let _replying = interrupt::Replying::start();
        for event in &mut stream {
            match event? {
                Event::Token { text, .. } => write!(out, "{text}")?,
                Event::Finished(done) => {
                    let t = done.timings;
                    writeln!(out, "{}", done.text)?;
                    let (ttft, tps) = (t.ttft.as_secs_f64() * 1e3, t.decode_tokens_per_s);
                    writeln!(
                        out,
                        "[{}: TTFT {ttft:.0} ms, {tps:.1} tok/s, {} prompt tokens ({} cached)]",
                        done.reason.as_str(),
                        t.prompt_tokens,
                        t.cached_tokens
                    )?;
                }
            }
            out.flush()?;
            if interrupt::requested() {
                cancel.iter().for_each(|c| c.cancel());
            }
        }
        Ok(())
    }
}

/// `params` with `key` set to `value`, validated. Errors: [`Error::InvalidParameter`] naming the
/// setting for an unknown key, a value that does not parse, or one out of range.
pub fn with_param(params: &GenerateParams, key: &str, value: &str) -> Result<GenerateParams> {
    let mut next = params.clone();
    let s = &mut next.sampling;
    match key {
        "temperature" => s.temperature = number("temperature", value)?,
        "top_k" => s.top_k = number("top_k", value)?,
        "top_p" => s.top_p = number("top_p", value)?,
        "min_p" => s.min_p = number("min_p", value)?,
        "repetition_penalty" => s.repetition_penalty = number("repetition_penalty", value)?,
        "max_tokens" => next.max_tokens = number("max_tokens", value)?,
        "seed" => s.seed = number("seed", value)?,
        _ => {
            return Err(Error::InvalidParameter {
                name: "params",
                reason: format!("unknown setting `{key}`; one of {}", PARAM_KEYS.join(", ")),
            })
        }
    }
    next.validate()?;
    Ok(next)
}

fn number<T: std::str::FromStr>(name: &'static str, value: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|e| Error::InvalidParameter { name, reason: format!("`{value}`: {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{load_model, DeviceChoice, LoadOptions};

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(name)
    }

    /// The tiny random fixtures, by name; loads count how often the source was asked.
    struct Fixtures {
        loads: usize,
    }

    impl ModelSource for Fixtures {
        fn load(&mut self, name: &str) -> Result<ChatModel> {
            self.loads += 1;
            if !["qwen2", "qwen3", "llama3"].contains(&name) {
                return Err(Error::ModelNotFound { name: name.to_string(), available: self.names()? });
            }
            let opts = LoadOptions { device: DeviceChoice::Cpu, ..LoadOptions::default() };
            let loaded = load_model(&fixture(name), &opts)?;
            Ok(ChatModel { name: name.to_string(), generator: Generator::from_loaded(&loaded)? })
        }

        fn names(&mut self) -> Result<Vec<String>> {
            Ok(vec!["llama3".into(), "qwen2".into(), "qwen3".into()])
        }
    }

    fn repl() -> Repl<Fixtures> {
        let mut source = Fixtures { loads: 0 };
        let model = source.load("qwen2").unwrap();
        let params = GenerateParams { max_tokens: 4, ignore_eos: true, ..GenerateParams::default() };
        Repl::new(model, params, source).unwrap()
    }

    /// Runs `lines`; returns what was written.
    fn drive(repl: &mut Repl<Fixtures>, lines: &[&str]) -> String {
        let mut out = Vec::new();
        repl.run(lines.iter().map(|l| Ok(l.to_string())), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// The prompt-token counts of the stats lines in `out`.
    fn prompt_tokens(out: &str) -> Vec<usize> {
        out.lines()
            .filter_map(|l| l.split(" tok/s, ").nth(1))
            .filter_map(|rest| rest.split(' ').next()?.parse().ok())
            .collect()
    }

    #[test]
    fn params_are_shown_set_and_validated() {
        let mut r = repl();
        let out = drive(&mut r, &["/params", "/params temperature 0.5", "/params top_k 7", "/params seed 9", "/params max_tokens 3"]);
        assert!(out.lines().next().unwrap().contains("max_tokens 4"), "{out}");
        let s = &r.params().sampling;
        assert_eq!((s.temperature, s.top_k, s.seed, r.params().max_tokens), (0.5, 7, 9, 3));
        let before = r.params().clone();
        for (line, name) in [
            ("/params top_p 2", "top_p"),
            ("/params top_p 0", "top_p"),
            ("/params temperature -1", "temperature"),
            ("/params temperature hot", "temperature"),
            ("/params max_tokens 0", "max_tokens"),
            ("/params max_tokens -3", "max_tokens"),
            ("/params seed 1.5", "seed"),
            ("/params colour blue", "params"),
        ] {
            let out = drive(&mut r, &[line]);
            assert!(out.starts_with("error: invalid parameter") && out.contains(&format!("`{name}`")), "{line}: {out}");
            assert_eq!(r.params(), &before, "{line} changed the settings");
        }
        assert!(drive(&mut r, &["/params colour blue"]).contains("repetition_penalty"), "the error lists the keys");
    }

    #[test]
    fn a_switch_keeps_the_history_and_a_failed_one_changes_nothing() {
        let mut r = repl();
        let out = drive(&mut r, &["Hello there", "/models"]);
        assert_eq!(prompt_tokens(&out).len(), 1, "{out}");
        assert!(out.contains("* qwen2\n") && out.contains("  qwen3\n"), "{out}");
        let history = r.session().history().clone();
        assert_eq!(history.messages.len(), 2);

        let out = drive(&mut r, &["/model nope"]);
        assert!(out.contains("error: model `nope` does not exist; available: llama3, qwen2, qwen3") && out.contains("/models"), "{out}");
        assert_eq!((r.model_name(), r.session().history()), ("qwen2", &history));

        let out = drive(&mut r, &["/model qwen3", "And now?"]);
        assert!(out.contains("[switched to qwen3; the conversation (2 messages)"), "{out}");
        assert_eq!(r.model_name(), "qwen3");
        let messages = &r.session().history().messages;
        assert_eq!(messages.len(), 4);
        assert_eq!(&messages[..2], &history.messages[..]);
        // The new model prefilled the whole conversation: nothing of the old cache was reused.
        assert!(out.contains("(0 cached)"), "{out}");
    }

    #[test]
    fn load_replaces_the_history_and_the_next_turn_renders_all_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let saved = dir.path().join("chat.json");
        let mut r = repl();
        let first = drive(&mut r, &["/system Be brief.", "Hello there", "Tell me more", &format!("/save {}", saved.display())]);
        assert!(first.contains("[saved 5 messages"), "{first}");

        let mut fresh = repl();
        let fresh_tokens = prompt_tokens(&drive(&mut fresh, &["One more thing"]))[0];
        let mut resumed = repl();
        let out = drive(&mut resumed, &[&format!("/load {}", saved.display()), "One more thing"]);
        assert!(out.contains("[loaded 5 messages"), "{out}");
        let tokens = prompt_tokens(&out)[0];
        assert!(tokens > fresh_tokens + 10, "after /load {tokens} prompt tokens, fresh {fresh_tokens}: {out}");
        let messages = &resumed.session().history().messages;
        assert_eq!(messages.len(), 7);
        assert_eq!(&messages[..5], &r.session().history().messages[..]);
    }

    #[test]
    fn bad_loads_and_unknown_commands_leave_the_chat_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (missing, broken) = (dir.path().join("missing.json"), dir.path().join("broken.json"));
        std::fs::write(&broken, "{\"messages\": [{\"role\": \"user\"").unwrap();
        let mut r = repl();
        drive(&mut r, &["Hello there"]);
        let history = r.session().history().clone();
        let out = drive(&mut r, &[&format!("/load {}", missing.display())]);
        assert!(out.starts_with("error: ") && out.contains("missing.json"), "{out}");
        let out = drive(&mut r, &[&format!("/load {}", broken.display())]);
        assert!(out.starts_with("error: ") && out.contains("broken.json") && out.contains("invalid JSON"), "{out}");
        let out = drive(&mut r, &["/frobnicate", "/save chat.txt"]);
        assert!(out.starts_with("unknown command /frobnicate\ncommands:"), "{out}");
        assert!(out.contains("error: invalid parameter `path`"), "{out}");
        assert_eq!(r.session().history(), &history);
        assert_eq!(drive(&mut r, &["/exit", "never read"]), "");
        assert_eq!(r.session().history(), &history);
    }
}
