//! The server's front door: every accepted TCP connection, from the
//! accept to the WebSocket handed to `crate::connection`.
//!
//! - [`listener`]: the accept loop and the connection limits;
//! - [`serve`]: one accepted connection's task;
//! - [`request`]: plain HTTP requests on a kept-alive connection, until a
//!   WebSocket upgrade (or the end);
//! - [`routes`] and [`web`]: what each plain path answers, and the page;
//! - [`admin`]: the operator API under `/admin/`;
//! - [`upgrade`]: the chat's checks, the 101, and the socket split.

pub(crate) mod admin;
pub(crate) mod listener;
pub(crate) mod request;
pub(crate) mod routes;
pub(crate) mod serve;
pub(crate) mod upgrade;
pub(crate) mod web;
