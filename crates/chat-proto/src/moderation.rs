//! Moderation on the wire: what an operator orders (the bodies of the
//! admin API, and what the log carries), and what clients that opted in
//! are told of it.
//!
//! Clients on `/ws` never send these: the server takes moderation only
//! from its operator API, with a key. `chat-core` decides what each does.

use crate::{Position, UserId};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The longest moderation reason, in Unicode scalar values.
pub const MAX_REASON_CHARS: usize = 200;

/// An operator's command. Applied in the log's order like a client's, on
/// every node alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum Moderation {
    /// Take one message out of the history, for everyone.
    RemoveMessage(RemoveMessage),
    /// Time a user out, or ban them; optionally remove their messages.
    RestrictUser(RestrictUser),
    /// End a user's time-out or ban.
    LiftRestriction(LiftRestriction),
    /// Change the room's modes.
    SetRoom(Room),
}

/// The body of `remove_message`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoveMessage {
    /// The message to remove.
    pub message_id: Uuid,
    /// Why, for the audit trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 200))]
    pub reason: Option<String>,
}

/// The body of `restrict_user`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestrictUser {
    /// The user, by the pseudonymous id their messages carry
    /// (`author_id`), never by address: one address can be a whole
    /// office.
    pub user_id: UserId,
    /// How long: a time-out of some seconds, or a ban.
    pub term: Term,
    /// Which of the user's messages to remove with it.
    #[serde(default)]
    pub purge: Purge,
    /// Why: shown to the user, and kept in the audit trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 200))]
    pub reason: Option<String>,
}

/// How long a restriction lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Term {
    /// A time-out: this many seconds from when it is applied.
    Seconds(#[schemars(range(min = 1))] u64),
    /// A ban, until lifted.
    Forever,
}

/// Which of a restricted user's messages are removed with the restriction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Purge {
    /// None: the messages stay.
    #[default]
    None,
    /// Those posted in the last this many minutes.
    LastMinutes(#[schemars(range(min = 1))] u32),
    /// Every one still in the history.
    All,
}

/// The body of `lift_restriction`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LiftRestriction {
    /// The user whose time-out or ban ends.
    pub user_id: UserId,
    /// Why, for the audit trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 200))]
    pub reason: Option<String>,
}

/// The room's modes: the body of `set_room`, and the `room_updated`
/// frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Room {
    /// Slow mode: each user may post one message per this many seconds.
    /// 0 turns it off.
    #[serde(default)]
    pub slow_mode_seconds: u32,
}

/// A user's time-out or ban, as clients that opted in are told of it
/// (the `user_restricted` frame).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Restriction {
    /// The restricted user.
    pub user_id: UserId,
    /// When it ends, in Unix seconds; `null` for a ban.
    #[schemars(required, schema_with = "unix_seconds_or_null")]
    pub until: Option<i64>,
    /// Why, as the moderator gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Unix seconds, or `null`: always present.
fn unix_seconds_or_null(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "type": ["integer", "null"], "format": "int64" })
}

/// The payload of a `message_removed` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MessageRemoved {
    /// The message that left the history.
    pub message_id: Uuid,
}

/// The payload of a `restriction_lifted` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RestrictionLifted {
    /// The user who may post again.
    pub user_id: UserId,
}

/// One restriction in force, as the operator API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RestrictionEntry {
    /// The restriction, as clients see it.
    #[serde(flatten)]
    pub restriction: Restriction,
    /// Who set it: the name of the operator's key.
    pub by: UserId,
    /// When it was set, in Unix seconds.
    #[schemars(extend("format" = "int64"))]
    pub since: i64,
    /// The position of the event that set it.
    pub position: Position,
}

/// One moderation command that was applied, as the audit trail lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AuditEntry {
    /// The position of its event.
    pub position: Position,
    /// When it was applied, in Unix seconds.
    #[schemars(extend("format" = "int64"))]
    pub at: i64,
    /// Who ordered it: the name of the operator's key.
    pub by: UserId,
    /// What was ordered, with its reason.
    pub command: Moderation,
    /// The messages it removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<Uuid>,
}

/// The operator API's answer to a command: it was applied, at this
/// position (durable, and replicated in cluster mode, before the answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Applied {
    /// The position of the command's (last) event.
    pub position: Position,
}
