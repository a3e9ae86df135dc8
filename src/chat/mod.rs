//! Chat: messages, the model's Jinja chat template, multi-turn sessions that keep their KV cache,
//! and history export (Markdown, JSON).
//!
//! ```no_run
//! use metal_candle::chat::ChatSession;
//! use metal_candle::generation::{Event, GenerateParams, Generator};
//! # fn main() -> metal_candle::Result<()> {
//! let loaded = metal_candle::load_model("model.gguf".as_ref(), &Default::default())?;
//! let mut chat = ChatSession::new(Generator::from_loaded(&loaded)?)?;
//! chat.set_system(Some("You are concise."));
//! for event in chat.send("What is the capital of France?", &GenerateParams::default())? {
//!     if let Event::Token { text, .. } = event? {
//!         print!("{text}");
//!     }
//! }
//! chat.history().save("chat.md".as_ref())?;
//! # Ok(()) }
//! ```

mod command;
mod encode;
pub mod interrupt;
pub mod overflow;
mod pyjson;
pub mod repl;
mod session;
mod template;
pub mod tools;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use command::{ChatCommand, CHAT_HELP};
pub use encode::ChatEncoder;
pub use overflow::TrimNotice;
pub use repl::{ChatModel, Flow, ModelSource, Repl};
pub use session::{ChatSession, ChatStream};
pub use template::ChatTemplate;
pub use tools::{ParsedReply, ToolCall, ToolCallFormat};

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions for the assistant.
    System,
    /// The person chatting.
    User,
    /// The model.
    Assistant,
    /// A tool's output.
    Tool,
}

impl Role {
    /// `"system"`, `"user"`, `"assistant"` or `"tool"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One chat message, as templates see it: `{"role": ..., "content": ...}`, plus `tool_calls` on
/// an assistant message that called tools and `tool_call_id` / `name` on a tool's answer (each
/// only when set, as transformers passes them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// What they wrote.
    pub content: String,
    /// The calls an assistant message made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The call a tool message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The tool's name, on a tool message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    /// A message from `role`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into(), tool_calls: Vec::new(), tool_call_id: None, name: None }
    }

    /// An assistant message that calls tools (with optional text beside the calls).
    pub fn assistant_calls(content: impl Into<String>, tool_calls: Vec<ToolCall>) -> Self {
        Self { tool_calls, ..Self::new(Role::Assistant, content) }
    }

    /// A tool's answer to call `tool_call_id` of function `name`.
    pub fn tool_result(tool_call_id: impl Into<String>, name: Option<String>, content: impl Into<String>) -> Self {
        Self { tool_call_id: Some(tool_call_id.into()), name, ..Self::new(Role::Tool, content) }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

/// A conversation, exportable as Markdown or JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatHistory {
    /// The messages, oldest first.
    pub messages: Vec<Message>,
}

impl ChatHistory {
    /// `## Role` headings, each followed by the message text.
    pub fn to_markdown(&self) -> String {
        let mut out = String::from("# Chat\n");
        for m in &self.messages {
            let role = match m.role {
                Role::System => "System",
                Role::User => "User",
                Role::Assistant => "Assistant",
                Role::Tool => "Tool",
            };
            out.push_str(&format!("\n## {role}\n\n{}\n", m.content));
        }
        out
    }

    /// `{"messages": [{"role": ..., "content": ...}, ...]}`, pretty-printed.
    pub fn to_json(&self) -> String {
        let messages: Vec<serde_json::Value> =
            self.messages.iter().map(|m| serde_json::json!({"role": m.role.as_str(), "content": m.content})).collect();
        let json = serde_json::json!({ "messages": messages });
        format!("{json:#}")
    }

    /// Parses [`ChatHistory::to_json`]'s format. Errors: [`Error::Json`] (with an empty path).
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|source| Error::Json { path: Default::default(), source })
    }

    /// Reads a file written by [`ChatHistory::save`] as JSON.
    ///
    /// Errors: [`Error::Io`] for a file that cannot be read, [`Error::Json`] for one that is not a
    /// chat history; both name the file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })
    }

    /// Writes the history to `path`: Markdown for `.md`/`.markdown`, JSON for `.json`.
    ///
    /// Errors: another extension ([`Error::InvalidParameter`] `path`), or [`Error::Io`].
    pub fn save(&self, path: &Path) -> Result<()> {
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        let text = match ext.as_deref() {
            Some("md" | "markdown") => self.to_markdown(),
            Some("json") => self.to_json(),
            _ => {
                return Err(Error::InvalidParameter {
                    name: "path",
                    reason: format!("{}: use a .md or .json file name", path.display()),
                })
            }
        };
        std::fs::write(path, text).map_err(|e| Error::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_exports_round_trip() {
        let h = ChatHistory { messages: vec![Message::system("Be brief."), Message::user("Hi \"there\""), Message::assistant("Hello!")] };
        assert_eq!(h.to_markdown(), "# Chat\n\n## System\n\nBe brief.\n\n## User\n\nHi \"there\"\n\n## Assistant\n\nHello!\n");
        assert_eq!(ChatHistory::from_json(&h.to_json()).unwrap(), h);
        assert!(h.to_json().contains("\"role\": \"user\""));
        let dir = std::env::temp_dir();
        assert!(matches!(h.save(&dir.join("chat.txt")), Err(Error::InvalidParameter { name: "path", .. })));
        let dir = tempfile::tempdir().unwrap();
        let saved = dir.path().join("chat.json");
        h.save(&saved).unwrap();
        assert_eq!(ChatHistory::load(&saved).unwrap(), h);
        let missing = dir.path().join("missing.json");
        assert!(ChatHistory::load(&missing).unwrap_err().to_string().contains("missing.json"));
        std::fs::write(&saved, "{\"messages\": [{\"role\": \"robot\"}]}").unwrap();
        let err = ChatHistory::load(&saved).unwrap_err();
        assert!(matches!(err, Error::Json { .. }) && err.to_string().contains("chat.json"), "{err}");
    }
}
