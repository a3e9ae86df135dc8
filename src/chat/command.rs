//! The slash commands of an interactive chat, parsed from one input line.

use std::path::PathBuf;

/// What one line typed into a chat asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatCommand {
    /// A blank line: nothing to do.
    Empty,
    /// Text for the model.
    Say(String),
    /// `/help`: list the commands.
    Help,
    /// `/reset`: forget the conversation (the system prompt stays).
    Reset,
    /// `/system TEXT`: a new system prompt, starting a new conversation.
    System(String),
    /// `/save FILE.md|FILE.json`: write the conversation.
    Save(PathBuf),
    /// `/load FILE.json`: replace the conversation with a saved one; the next turn continues it.
    Load(PathBuf),
    /// `/models`: the models that `/model` can switch to.
    Models,
    /// `/model NAME|PATH`: switch model, keeping the conversation.
    Model(String),
    /// `/params`: show the generation settings.
    ShowParams,
    /// `/params KEY VALUE`: change one generation setting.
    SetParam {
        /// The setting (`temperature`, `top_k`, …), as typed.
        key: String,
        /// Its new value, as typed.
        value: String,
    },
    /// `/exit` or `/quit`.
    Exit,
    /// Anything else starting with `/` (or a command missing its argument): never sent to the
    /// model; the caller lists the commands.
    Unknown(String),
}

/// The commands, one per line, for `/help` and unknown commands.
pub const CHAT_HELP: &str = "commands:
  /help                 this list
  /reset                forget the conversation (the system prompt stays)
  /system TEXT          set the system prompt and start a new conversation
  /save FILE.md|.json   save the conversation
  /load FILE.json       resume a conversation saved with /save (replaces this one)
  /models               the models /model can switch to (the library)
  /model NAME|PATH      switch model; the conversation goes on in the new model's template
  /params               show the generation settings
  /params KEY VALUE     set one: temperature, top_k, top_p, min_p, repetition_penalty,
                        max_tokens or seed
  /exit                 quit (also /quit, or end of input)
  Ctrl-C stops a reply; a line starting with // sends it to the model without the first /";

impl ChatCommand {
    /// Parses a line; surrounding whitespace is ignored. `//text` sends `/text` to the model.
    pub fn parse(line: &str) -> Self {
        let line = line.trim();
        if line.is_empty() {
            return ChatCommand::Empty;
        }
        if let Some(text) = line.strip_prefix("//") {
            return ChatCommand::Say(format!("/{text}"));
        }
        let Some(cmd) = line.strip_prefix('/') else { return ChatCommand::Say(line.to_string()) };
        let (name, arg) = cmd.split_once(char::is_whitespace).map_or((cmd, ""), |(n, a)| (n, a.trim()));
        match (name, arg.is_empty()) {
            ("help" | "?", _) => ChatCommand::Help,
            ("reset" | "clear", true) => ChatCommand::Reset,
            ("exit" | "quit" | "bye", true) => ChatCommand::Exit,
            ("models", true) => ChatCommand::Models,
            ("params", true) => ChatCommand::ShowParams,
            ("system", false) => ChatCommand::System(arg.to_string()),
            ("save", false) => ChatCommand::Save(PathBuf::from(arg)),
            ("load", false) => ChatCommand::Load(PathBuf::from(arg)),
            ("model", false) => ChatCommand::Model(arg.to_string()),
            ("params", false) => match arg.split_once(char::is_whitespace) {
                Some((key, value)) if !value.trim().contains(char::is_whitespace) => {
                    ChatCommand::SetParam { key: key.to_string(), value: value.trim().to_string() }
                }
                _ => ChatCommand::Unknown(line.to_string()),
            },
            _ => ChatCommand::Unknown(line.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands_and_never_sends_unknown_ones() {
        use ChatCommand::*;
        assert_eq!(ChatCommand::parse("  "), Empty);
        assert_eq!(ChatCommand::parse(" What is 2+2? "), Say("What is 2+2?".into()));
        assert_eq!(ChatCommand::parse("/help"), Help);
        assert_eq!(ChatCommand::parse("/reset"), Reset);
        assert_eq!(ChatCommand::parse("/exit"), Exit);
        assert_eq!(ChatCommand::parse("/quit"), Exit);
        assert_eq!(ChatCommand::parse("/system  Be brief. "), System("Be brief.".into()));
        assert_eq!(ChatCommand::parse("/save a b.md"), Save("a b.md".into()));
        assert_eq!(ChatCommand::parse("/system"), Unknown("/system".into()));
        assert_eq!(ChatCommand::parse("/save"), Unknown("/save".into()));
        assert_eq!(ChatCommand::parse("/reset now"), Unknown("/reset now".into()));
        assert_eq!(ChatCommand::parse("/sytem x"), Unknown("/sytem x".into()));
        assert_eq!(ChatCommand::parse("//etc/hosts?"), Say("/etc/hosts?".into()));
        assert!(CHAT_HELP.lines().all(|l| l.len() < 100));
    }

    #[test]
    fn parses_load_model_and_params() {
        use ChatCommand::*;
        assert_eq!(ChatCommand::parse("/load  old chat.json "), Load("old chat.json".into()));
        assert_eq!(ChatCommand::parse("/load"), Unknown("/load".into()));
        assert_eq!(ChatCommand::parse("/models"), Models);
        assert_eq!(ChatCommand::parse("/models x"), Unknown("/models x".into()));
        assert_eq!(ChatCommand::parse("/model smollm2"), Model("smollm2".into()));
        assert_eq!(ChatCommand::parse("/model ./My Models/a.gguf"), Model("./My Models/a.gguf".into()));
        assert_eq!(ChatCommand::parse("/model"), Unknown("/model".into()));
        assert_eq!(ChatCommand::parse("/params"), ShowParams);
        assert_eq!(ChatCommand::parse("/params  top_p   0.5 "), SetParam { key: "top_p".into(), value: "0.5".into() });
        assert_eq!(ChatCommand::parse("/params top_p"), Unknown("/params top_p".into()));
        assert_eq!(ChatCommand::parse("/params top_p 0.5 1"), Unknown("/params top_p 0.5 1".into()));
        for cmd in ["/load", "/models", "/model", "/params"] {
            assert!(CHAT_HELP.contains(cmd), "{cmd} is not in the help");
        }
    }
}
