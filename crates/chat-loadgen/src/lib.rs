//! The pieces of `chat-loadgen`, usable from other programs and tests:
//! connecting many clients ([`client`]), the scenarios ([`scenario`]) and
//! measuring ([`stats`]).
#![forbid(unsafe_code)]

pub mod client;
pub mod scenario;
pub mod stats;
