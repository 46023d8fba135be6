//! The reading half: the client's frames, decoded, submitted, and each
//! refusal answered to this client alone.

use crate::admission::Admitted;
use crate::metrics::{FRAME_MALFORMED, FRAME_NOT_TAKEN, FRAME_UNAVAILABLE};
use crate::sequencer::ApplyError;
use crate::shared::Shared;
use crate::wire::close::CloseReason;
use crate::wire::frame::Frame;
use crate::wire::link::{Link, Ws};
use chat_core::ChatError;
use chat_proto::{ClientFrame, DecodeError, ServerFrame};
use futures_util::StreamExt;
use std::time::Duration;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tracing::debug;

/// Reads the client's frames until the connection ends: each command goes
/// to the sequencer, each refusal back to this client alone.
pub(crate) async fn read_loop(
    stream: &mut Ws,
    admitted: &Admitted,
    shared: &Shared,
    link: &Link,
) -> CloseReason {
    let mut refusals = RefusalBudget::new(shared.config.max_refusals);
    // Each step keeps in a block of its own what it needs only until its
    // `.await`: what a future holds across one, it holds for the
    // connection's life.
    loop {
        // Decoded here, so that only commands reach the sequencer.
        let decoded = {
            // No timer here: the delivery keeps the idle timeout.
            let message = match stream.next().await {
                None => return CloseReason::ClientClosed,
                Some(Err(e)) => return CloseReason::from_read_error(&e),
                Some(Ok(m)) => m,
            };
            link.delivery().on_heard(std::time::Instant::now());
            match message {
                Message::Text(text) => ClientFrame::decode(&text).map(Some),
                Message::Binary(_) => Err(DecodeError::Binary),
                // The client closes: tungstenite answers it, in the close.
                Message::Close(_) => return CloseReason::ClientClosed,
                // tungstenite answers pings itself.
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(None),
            }
        };
        let reply = {
            let refusal = match decoded {
                Ok(None) => continue,
                Err(e) => Refused::Malformed(e),
                Ok(Some(frame)) => {
                    match shared.sequencer.submit(&admitted.user, frame.into()).await {
                        Ok(_) => continue,
                        Err(ApplyError::Refused(refusal)) => Refused::Rule(refusal),
                        Err(ApplyError::Stopping) => return CloseReason::Shutdown,
                        Err(ApplyError::Unavailable) => Refused::Unavailable,
                        Err(ApplyError::NotTaken) => Refused::NotTaken,
                    }
                }
            };
            debug!(user = %admitted.user, %refusal, "refused");
            shared.metrics.frame_refused(refusal.kind());
            // Only the client's own mistakes count against its budget.
            if !matches!(refusal, Refused::Unavailable | Refused::NotTaken) && !refusals.take() {
                return CloseReason::TooManyRefusals;
            }
            Frame::text(ServerFrame::error(&refusal).encode())
        };
        // A full queue means the client is not reading its replies: stop
        // reading from it until it does (or the writer gives up).
        link.reply(reply).await;
    }
}

/// Why a client's frame was refused; its `Display` is the wire text.
#[derive(Debug, thiserror::Error)]
enum Refused {
    /// Not a well-formed frame.
    #[error(transparent)]
    Malformed(DecodeError),
    /// Against the chat's rules.
    #[error(transparent)]
    Rule(ChatError),
    /// Not the client's doing: whether the sequencer took it is not known.
    #[error("{UNAVAILABLE}")]
    Unavailable,
    /// Not the client's doing: the sequencer did not take it, for sure.
    #[error("{NOT_TAKEN}")]
    NotTaken,
}

/// The wire text of [`Refused::Unavailable`].
pub(crate) const UNAVAILABLE: &str = "the chat is unavailable: your last message or reaction was not confirmed, and shows up only if it was taken";

/// The wire text of [`Refused::NotTaken`].
pub(crate) const NOT_TAKEN: &str =
    "the chat is unavailable: your last message or reaction was not taken; send it again";

impl Refused {
    /// A short stable name, for metrics labels.
    fn kind(&self) -> &'static str {
        match self {
            Refused::Malformed(_) => FRAME_MALFORMED,
            Refused::Rule(e) => e.kind(),
            Refused::Unavailable => FRAME_UNAVAILABLE,
            Refused::NotTaken => FRAME_NOT_TAKEN,
        }
    }
}

/// How long the refusal budget's window is.
const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

/// Counts one connection's refused frames per [`REFUSAL_WINDOW`].
struct RefusalBudget {
    max: u32,
    used: u32,
    since: Instant,
}

impl RefusalBudget {
    fn new(max: u32) -> Self {
        RefusalBudget {
            max,
            used: 0,
            since: Instant::now(),
        }
    }

    /// Counts one refusal; false once the window's budget is spent.
    fn take(&mut self) -> bool {
        if self.since.elapsed() >= REFUSAL_WINDOW {
            self.since = Instant::now();
            self.used = 0;
        }
        self.used += 1;
        self.used <= self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unavailable_texts_are_documented_in_asyncapi() {
        let doc = chat_testkit::asyncapi();
        let description = doc
            .pointer("/components/schemas/ErrorFrame/properties/data/properties/error/description")
            .and_then(|d| d.as_str())
            .expect("the error text's description");
        for text in [UNAVAILABLE, NOT_TAKEN] {
            assert!(
                description.contains(&format!("- \"{text}\"")),
                "asyncapi.yaml does not list {text:?}"
            );
        }
        assert_eq!(Refused::Unavailable.to_string(), UNAVAILABLE);
        assert_eq!(Refused::NotTaken.to_string(), NOT_TAKEN);
    }
}
