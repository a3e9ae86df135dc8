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
            ("system", false) => ChatCommand::System(arg.to_string()),
            ("save", false) => ChatCommand::Save(PathBuf::from(arg)),
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
}
