//! What the chat publishes, and how it reaches connections: **apply →
//! commit → publish**.
//!
//! - [`entry`]: an applied event and its frames, serialized once;
//! - [`pipeline`]: the commit queue (bounded in bytes) and the committer
//!   thread, which writes each batch and then publishes it;
//! - [`log`]: what is published, for connections to read: the
//!   [`history`], the [`recent`] events and the head;
//! - [`fanout`]: on publish, the new frames written straight to the
//!   sockets of connections that wait at the log's head.
//!
//! The log is a data structure: it does no I/O. The socket writes of a
//! publish are the fan-out's.

pub(crate) mod entry;
pub(crate) mod fanout;
pub(crate) mod history;
pub(crate) mod log;
pub(crate) mod pipeline;
pub(crate) mod recent;
#[cfg(test)]
mod testing;
