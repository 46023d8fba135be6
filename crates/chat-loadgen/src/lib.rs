//! The pieces of `chat-loadgen`, usable from other programs and tests:
//! connecting many clients ([`client`]), reading plain HTTP responses
//! ([`http`]), the scenarios ([`scenario`]), the
//! soak and abuse run ([`soak`]), reconnecting after a blip ([`reconnect`]),
//! a cluster node's failover ([`failover`]), a moderator's removal
//! reaching every client ([`removal`]) and measuring ([`stats`]).
#![forbid(unsafe_code)]

pub mod client;
pub mod failover;
pub mod http;
pub mod reconnect;
pub mod removal;
pub mod scenario;
pub mod soak;
pub mod stats;
pub mod storm;
