//! The workspace's root package, `chat`: it owns what belongs to the whole
//! product rather than to one crate.
//!
//! - `tests/`: the end-to-end tests. Each starts real servers
//!   (`chat-server`) on real sockets, speaks the protocol (`chat-proto`)
//!   and checks every frame against `asyncapi.yaml`, so they need all three
//!   crates at once and live above them.
//! - `examples/`: `embed.rs` (`chat-core` with no network, persisting and
//!   resuming), `client.rs` (a terminal client) and `echo.rs` (the server
//!   in conformance mode).
//!
//! It has no code of its own and re-exports nothing: it is not published,
//! and a second path to every type would be a second name for each. Depend
//! on `chat-core`, `chat-proto` or `chat-server` directly.
#![forbid(unsafe_code)]
