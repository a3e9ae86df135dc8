//! The async face of a [`TokenStream`] (feature `async`).

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::mpsc;

use super::{CancelHandle, Event, TokenStream};
use crate::error::{Error, Result};

/// Events the blocking thread may run ahead of the consumer.
const EVENT_BUFFER: usize = 4;

/// A [`TokenStream`] running on tokio's blocking pool, consumed as a `futures_core::Stream` or with
/// [`AsyncTokenStream::next`]. Dropping it (or [`CancelHandle::cancel`]) stops the generation
/// before its next token and frees its KV cache.
pub struct AsyncTokenStream {
    rx: Receiver,
    cancel: CancelHandle,
    prompt_tokens: Option<usize>,
}

/// Bounded when a blocking thread produces the events (it waits for the consumer); unbounded when
/// the engine's scheduler sends them (it never waits: a slow consumer must not stall the batch).
enum Receiver {
    Bounded(mpsc::Receiver<Result<Event>>),
    Unbounded(mpsc::UnboundedReceiver<Result<Event>>),
}

impl AsyncTokenStream {
    /// Moves `stream` to a blocking thread. Errors: [`Error::InvalidParameter`] (`runtime`) when
    /// called outside a tokio runtime.
    pub fn spawn(stream: TokenStream) -> Result<Self> {
        let cancel = stream.cancel_handle();
        Self::spawn_events(stream, cancel)
    }

    /// Moves any event iterator (an engine's [`crate::engine::RequestHandle`]) to a blocking
    /// thread; `cancel` stops its generation when this stream is dropped.
    pub(crate) fn spawn_events(stream: impl Iterator<Item = Result<Event>> + Send + 'static, cancel: CancelHandle) -> Result<Self> {
        let handle = tokio::runtime::Handle::try_current().map_err(|e| Error::InvalidParameter {
            name: "runtime",
            reason: format!("async streaming needs a tokio runtime: {e}"),
        })?;
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        handle.spawn_blocking(move || {
            for event in stream {
                if tx.blocking_send(event).is_err() {
                    break; // the consumer is gone
                }
            }
        });
        Ok(Self { rx: Receiver::Bounded(rx), cancel, prompt_tokens: None })
    }

    /// A stream fed by the engine's scheduler directly (no thread in between), for a prompt of
    /// `prompt_tokens` tokens.
    pub(crate) fn from_channel(rx: mpsc::UnboundedReceiver<Result<Event>>, cancel: CancelHandle, prompt_tokens: usize) -> Self {
        Self { rx: Receiver::Unbounded(rx), cancel, prompt_tokens: Some(prompt_tokens) }
    }

    /// The prompt's length in tokens, when the stream comes from the engine (known before the
    /// first event; the `Finished` event's timings carry it too).
    pub fn prompt_tokens(&self) -> Option<usize> {
        self.prompt_tokens
    }

    /// The next event, or `None` after the last.
    pub async fn next(&mut self) -> Option<Result<Event>> {
        match &mut self.rx {
            Receiver::Bounded(rx) => rx.recv().await,
            Receiver::Unbounded(rx) => rx.recv().await,
        }
    }

    /// A handle that stops the generation before its next token.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }
}

impl futures_core::Stream for AsyncTokenStream {
    type Item = Result<Event>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match &mut self.rx {
            Receiver::Bounded(rx) => rx.poll_recv(cx),
            Receiver::Unbounded(rx) => rx.poll_recv(cx),
        }
    }
}

impl Drop for AsyncTokenStream {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
