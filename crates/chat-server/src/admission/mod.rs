//! Admission: whether a well-formed WebSocket upgrade may join the chat,
//! and who it is.
//!
//! The form of the upgrade (RFC 6455) is checked by the HTTP layer
//! (`crate::http`); here come the chat's own rules: the path, the
//! browser's origin and the client's address through trusted proxies
//! ([`policy`]), the `Host` ([`host`]), the `/ws` query ([`query`]), the
//! per-address limit ([`limits`]), and the user id ([`identity`]); and who
//! may use the operator API ([`operators`]). Every refusal
//! is an HTTP error response; the connection never reaches the chat. The
//! checks are plain functions of the request, so they can be tested (and
//! fuzzed) without sockets.

pub(crate) mod host;
pub(crate) mod identity;
pub(crate) mod limits;
pub(crate) mod operators;
pub(crate) mod policy;
pub(crate) mod query;

use crate::http::{Refusal, Request};
use chat_proto::UserId;
use identity::Identity;
use limits::{AddressLimits, AddressSlot};
use policy::Policy;
use query::Protocol;
use std::net::IpAddr;
use std::sync::Arc;

/// The chat's rules for joining, with what they need: the policy, how
/// addresses become user ids, and the per-address connection limit.
#[derive(Debug)]
pub(crate) struct Admission {
    /// Path, origin and proxy rules.
    pub policy: Policy,
    /// From an address to a user id.
    pub identity: Identity,
    /// Open WebSocket connections per address (`--max-connections-per-ip`).
    open: Arc<AddressLimits>,
}

impl Admission {
    /// The rules, with at most `max_per_address` connections per address.
    pub(crate) fn new(policy: Policy, identity: Identity, max_per_address: usize) -> Self {
        Admission {
            policy,
            identity,
            open: AddressLimits::new(max_per_address),
        }
    }

    /// Whether a well-formed upgrade from `peer` may join, and as whom:
    /// path and origin, the client's address, the `/ws` query, then a place
    /// under the per-address limit.
    pub(crate) fn admit(&self, request: &Request, peer: IpAddr) -> Result<Admitted, Refusal> {
        let addr = self.policy.check(request, peer)?;
        let protocol = query::parse(request.uri().query()).map_err(Refusal::BadResume)?;
        let slot = self
            .open
            .acquire(addr)
            .map_err(|_| Refusal::TooManyFromAddress)?;
        Ok(Admitted {
            addr,
            user: self.identity.user_id(addr),
            _slot: slot,
            protocol,
        })
    }

    /// The user id of whoever sent `request` from `peer` (for `/whoami`).
    pub(crate) fn user_id(&self, request: &Request, peer: IpAddr) -> Result<UserId, Refusal> {
        let addr = self.policy.client_addr(request, peer)?;
        Ok(self.identity.user_id(addr))
    }
}

/// A client that passed the handshake checks.
#[derive(Debug)]
pub(crate) struct Admitted {
    /// The client's address (after `X-Forwarded-For`, if trusted).
    pub addr: IpAddr,
    /// Its user id.
    pub user: UserId,
    /// Its place in the per-address limit, held until the connection ends.
    pub _slot: AddressSlot,
    /// Whether it opted in to positions, and where it resumes.
    pub protocol: Protocol,
}
