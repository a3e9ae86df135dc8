//! Stop strings that may span token boundaries.
//!
//! Text that could still grow into a stop string (a suffix equal to a stop string's prefix) is held
//! back; once a stop string appears, the text before it is released and the stop string itself is
//! never emitted.

use crate::error::{Error, Result};

/// What [`StopMatcher::push`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// No stop string yet; this text is final.
    Continue(String),
    /// A stop string appeared; this is the text before it. Generation should end.
    Stopped(String),
}

/// Scans streamed text for stop strings, holding back possible partial matches.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// A matcher for `stops`. Errors: an empty stop string ([`Error::InvalidParameter`] `stop`).
    pub fn new(stops: &[String]) -> Result<Self> {
        if stops.iter().any(String::is_empty) {
            return Err(Error::InvalidParameter { name: "stop", reason: "stop strings must not be empty".into() });
        }
        Ok(Self { stops: stops.to_vec(), held: String::new() })
    }

    /// Adds streamed text; returns what can be emitted now.
    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Continue(delta.to_string());
        }
        self.held.push_str(delta);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let before = self.held[..at].to_string();
            self.held.clear();
            return StopOutcome::Stopped(before);
        }
        let keep = self.partial_match_len();
        let emit = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        StopOutcome::Continue(emit)
    }

    /// Releases the held-back text (generation ended for another reason).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of some stop string.
    fn partial_match_len(&self) -> usize {
        self.stops
            .iter()
            .flat_map(|s| (1..s.len()).rev().filter(|&k| s.is_char_boundary(k) && self.held.ends_with(&s[..k])).take(1))
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (Vec<String>, bool, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops).unwrap();
        let mut out = Vec::new();
        for d in deltas {
            match m.push(d) {
                StopOutcome::Continue(t) => out.push(t),
                StopOutcome::Stopped(t) => {
                    out.push(t);
                    return (out, true, String::new());
                }
            }
        }
        let tail = m.flush();
        (out, false, tail)
    }

    #[test]
    fn stop_spanning_tokens_is_held_and_never_emitted() {
        let (out, stopped, _) = run(&["\nUser:"], &["Hi", " there", "\n", "Us", "er:", " more"]);
        assert!(stopped);
        assert_eq!(out, vec!["Hi", " there", "", "", ""]);
    }

    #[test]
    fn false_alarm_is_released() {
        let (out, stopped, tail) = run(&["STOP"], &["a S", "T", "x", "ST"]);
        assert!(!stopped);
        assert_eq!(out.concat() + &tail, "a STxST");
        assert_eq!(out, vec!["a ", "", "STx", ""]);
        assert_eq!(tail, "ST");
    }

    #[test]
    fn earliest_stop_wins_and_text_before_it_is_kept() {
        let (out, stopped, _) = run(&["b", "abc"], &["xxabc"]);
        assert!(stopped);
        assert_eq!(out, vec!["xx"]);
        let (out, _, _) = run(&["é!"], &["café", "!"]);
        assert_eq!(out, vec!["caf", ""]);
    }

    #[test]
    fn empty_stop_string_is_an_error() {
        assert!(matches!(StopMatcher::new(&["".into()]), Err(Error::InvalidParameter { name: "stop", .. })));
        assert_eq!(StopMatcher::new(&[]).unwrap().push("x"), StopOutcome::Continue("x".into()));
    }
}
