//! Plain HTTP/1, as the server speaks it on its one port: parsing a
//! request head from the socket without consuming it, encoding and writing
//! responses, the WebSocket upgrade's form (RFC 6455) and its 101, and the
//! status of every refusal. Nothing here knows the chat: what each request
//! gets is decided above (`crate::front`).

pub(crate) mod codec;
pub(crate) mod refusal;
pub(crate) mod upgrade;

pub use codec::{Request, parse_head};
pub use refusal::Refusal;
pub(crate) use refusal::WS_PATH;
pub use upgrade::check_upgrade;

/// Most requests served on one keep-alive connection.
pub const MAX_REQUESTS: usize = 100;
