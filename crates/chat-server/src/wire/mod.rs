//! What goes to one client's socket after the handshake, below both the
//! connection that owns the socket and the publisher that writes to it
//! while the connection waits at the log's head.
//!
//! - [`frame`]: a server frame, framed once and shared by every recipient;
//! - [`delivery`]: one connection's delivery, a state machine without
//!   I/O: its queue, cursor, parking, deadlines and close;
//! - [`link`]: the socket and what the connection's parts share around it
//!   (the delivery under its lock, tungstenite's outbox, the task to wake);
//! - [`close`]: why a connection ended, and the close code that says so.
//!
//! These live here, not in `connection`, because the publisher
//! (`crate::publish::fanout`) writes through the same delivery and link:
//! both the connection and the publisher stand on this floor.

pub(crate) mod close;
pub(crate) mod delivery;
pub(crate) mod frame;
pub(crate) mod link;
