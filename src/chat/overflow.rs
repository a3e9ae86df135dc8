//! What a conversation that outgrows the context keeps: the system prompt and the newest turns.
//!
//! The policy of `llama-cli` (context shift keeps `--keep` tokens, the system prompt, and drops the
//! oldest of the rest) and Ollama (it drops the oldest messages, keeping the system prompt and the
//! latest one), applied to whole turns so the chat template always sees a well-formed
//! conversation: a turn is a user message and the replies after it. The newest user message is
//! never dropped; if it alone (with the system prompt) does not fit, generation reports
//! [`crate::Error::ContextOverflow`].

use std::fmt;

use super::{Message, Role};
use crate::error::Result;

/// The prompt of a conversation trimmed to fit the context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fitted {
    /// Token ids of the kept messages (rendered with the generation prompt).
    pub ids: Vec<u32>,
    /// Leading non-system messages left out.
    pub dropped_messages: usize,
    /// How many turns those were.
    pub dropped_turns: usize,
}

/// The one-line notice for a chat that dropped turns, e.g.
/// `[context full: dropped the oldest 2 turns (4 messages) to fit 512 tokens]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrimNotice {
    /// Turns left out of the prompt by this reply.
    pub turns: usize,
    /// Messages in those turns.
    pub messages: usize,
    /// The context, in tokens.
    pub context: usize,
}

impl fmt::Display for TrimNotice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.turns == 1 { "" } else { "s" };
        write!(
            f,
            "[context full: dropped the oldest {} turn{s} ({} messages) to fit {} tokens]",
            self.turns, self.messages, self.context
        )
    }
}

/// Drops the oldest turns of `messages` (a leading system message always stays) until `encode`
/// gives at most `budget` tokens. When even the newest turn alone is over the budget, that
/// smallest prompt is returned: the caller's context check decides.
///
/// `encode` renders and tokenizes a candidate conversation; its errors are returned.
pub fn fit_turns<F>(messages: &[Message], budget: usize, mut encode: F) -> Result<Fitted>
where
    F: FnMut(&[Message]) -> Result<Vec<u32>>,
{
    let system = usize::from(messages.first().is_some_and(|m| m.role == Role::System));
    let (head, rest) = messages.split_at(system);
    let mut starts: Vec<usize> = (0..rest.len()).filter(|&i| i == 0 || rest[i].role == Role::User).collect();
    if let Some(last_user) = rest.iter().rposition(|m| m.role == Role::User) {
        starts.retain(|&s| s <= last_user);
    }
    let mut candidate = head.to_vec();
    let mut fitted = None;
    for (turns, &start) in starts.iter().enumerate() {
        candidate.truncate(system);
        candidate.extend_from_slice(&rest[start..]);
        let ids = encode(&candidate)?;
        let fits = ids.len() <= budget;
        fitted = Some(Fitted { ids, dropped_messages: start, dropped_turns: turns });
        if fits {
            break;
        }
    }
    match fitted {
        Some(f) => Ok(f),
        None => Ok(Fitted { ids: encode(head)?, dropped_messages: 0, dropped_turns: 0 }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per byte of content, plus one per message: the shape of a chat template.
    fn count(messages: &[Message]) -> Result<Vec<u32>> {
        Ok(vec![0; messages.iter().map(|m| m.content.len() + 1).sum()])
    }

    fn chat() -> Vec<Message> {
        vec![
            Message::system("sys"),        // 4
            Message::user("aaaa"),         // 5
            Message::assistant("bbbbbbb"), // 8
            Message::user("cc"),           // 3
            Message::assistant("dddd"),    // 5
            Message::user("eeeeee"),       // 7
        ]
    }

    #[test]
    fn fits_without_dropping() {
        let f = fit_turns(&chat(), 32, count).unwrap();
        assert_eq!((f.ids.len(), f.dropped_messages, f.dropped_turns), (32, 0, 0));
    }

    #[test]
    fn drops_oldest_whole_turns_and_keeps_the_system_prompt() {
        let mut seen = Vec::new();
        let f = fit_turns(&chat(), 20, |m| {
            seen.push(m.iter().map(|m| m.content.clone()).collect::<Vec<_>>());
            count(m)
        })
        .unwrap();
        // 32 > 20; without turn 1: 4 + 3 + 5 + 7 = 19.
        assert_eq!((f.ids.len(), f.dropped_messages, f.dropped_turns), (19, 2, 1));
        assert_eq!(seen.last().unwrap(), &["sys", "cc", "dddd", "eeeeee"]);
    }

    #[test]
    fn newest_user_message_is_never_dropped() {
        let f = fit_turns(&chat(), 3, count).unwrap();
        assert_eq!((f.ids.len(), f.dropped_messages, f.dropped_turns), (11, 4, 2));
        let no_system = &chat()[1..];
        let f = fit_turns(no_system, 1, count).unwrap();
        assert_eq!((f.ids.len(), f.dropped_messages, f.dropped_turns), (7, 4, 2));
    }

    #[test]
    fn leading_assistant_message_is_a_turn_and_errors_pass_through() {
        let msgs = vec![Message::assistant("hello"), Message::user("q")];
        let f = fit_turns(&msgs, 2, count).unwrap();
        assert_eq!((f.ids.len(), f.dropped_messages, f.dropped_turns), (2, 1, 1));
        let err = fit_turns(&msgs, 2, |_| Err(crate::Error::ChatTemplate { reason: "x".into() }));
        assert!(matches!(err, Err(crate::Error::ChatTemplate { .. })));
        let only_system = fit_turns(&[Message::system("s")], 0, count).unwrap();
        assert_eq!(only_system.ids.len(), 2);
    }

    #[test]
    fn notice_is_one_line() {
        let n = TrimNotice { turns: 2, messages: 4, context: 512 };
        assert_eq!(n.to_string(), "[context full: dropped the oldest 2 turns (4 messages) to fit 512 tokens]");
        assert_eq!(TrimNotice { turns: 1, messages: 2, context: 8 }.to_string().matches("turn ").count(), 1);
    }
}
