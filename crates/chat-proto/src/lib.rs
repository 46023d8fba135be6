//! The chat protocol's wire format, defined once.
//!
//! Every frame on the `/ws` channel is a JSON text frame of the form
//! `{"type": "...", "data": {...}}`. Clients send [`ClientFrame`]s, the server
//! sends [`ServerFrame`]s. Unknown properties are accepted and ignored, as the
//! protocol allows, so that older servers keep working with newer clients.
//!
//! The JSON schemas of these types are generated with `schemars`
//! ([`client_frame_schema`], [`server_frame_schema`]); a test checks them
//! against the payload schemas in the workspace's `asyncapi.yaml`, so the two
//! cannot drift apart.
//!
//! This crate holds no rules beyond the shape of a frame: what text is
//! allowed, who may react and how often are decided by `chat-core`.
#![forbid(unsafe_code)]

mod decode;
mod moderation;

use indexmap::{IndexMap, IndexSet};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

pub use decode::DecodeError;
pub use moderation::{
    Applied, AuditEntry, LiftRestriction, MAX_REASON_CHARS, MessageRemoved, Moderation, Purge,
    RemoveMessage, RestrictUser, Restriction, RestrictionEntry, RestrictionLifted, Room, Term,
};
pub use uuid::Uuid;

/// The longest message text the protocol allows, counted in Unicode scalar
/// values (as JSON Schema's `maxLength` counts), not bytes.
pub const MAX_TEXT_CHARS: usize = 500;

/// The author name used when a client sends none, `null`, or only white space.
pub const DEFAULT_AUTHOR_NAME: &str = "Anonymous";

/// A frame sent by a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Post a new message, broadcast to every connected client.
    SendMessage(
        #[serde(deserialize_with = "object")]
        #[schemars(with = "SendMessage")]
        SendMessage,
    ),
    /// Toggle the sender's reaction with an emoji on a message.
    AddReaction(
        #[serde(deserialize_with = "object")]
        #[schemars(with = "AddReaction")]
        AddReaction,
    ),
}

/// Deserializes a payload that must be a JSON object. serde would also
/// take a struct from an array of its fields in order
/// (`"data": ["hi", "Bob"]`), which the schema does not allow.
fn object<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    use serde::de::{Error, IntoDeserializer};
    let fields = serde_json::Map::<String, serde_json::Value>::deserialize(deserializer)
        .map_err(|_| D::Error::custom("data must be an object"))?;
    T::deserialize(serde_json::Value::Object(fields).into_deserializer()).map_err(D::Error::custom)
}

/// The payload of a `send_message` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SendMessage {
    /// Message content.
    #[schemars(length(max = 500))]
    pub text: String,
    /// Display name for the author; missing, `null` or blank means
    /// [`DEFAULT_AUTHOR_NAME`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "Anonymous"))]
    pub author_name: Option<String>,
}

/// The payload of an `add_reaction` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AddReaction {
    /// Id of the message to react to.
    pub message_id: Uuid,
    /// A single emoji.
    pub emoji: String,
}

/// A frame sent by the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum ServerFrame {
    /// A new message, or one replayed from history on connect.
    Message(Message),
    /// A reaction was added or removed; carries the full updated message.
    ReactionUpdated(ReactionUpdated),
    /// The client's last frame was refused. Sent to that client only.
    Error(ErrorBody),
    /// Where the client stands in the chat's log: every event up to
    /// `position` has been sent to it. Sent only to clients that opted in
    /// (`/ws?sync` or `/ws?since=...&epoch=...`): once the replay is done,
    /// then after each batch of live events.
    Sync(SyncPoint),
    /// The client's position cannot be resumed: it must drop every message
    /// it shows, because the full history follows. Sent only to clients
    /// that asked to resume, as their first frame.
    Reset(Reset),
    /// A moderator removed a message: drop it. Sent only to clients that
    /// opted in (as for `sync`); others never get the message again.
    MessageRemoved(MessageRemoved),
    /// A moderator timed a user out or banned them. Sent only to clients
    /// that opted in.
    UserRestricted(Restriction),
    /// A user's time-out or ban was lifted. Sent only to clients that
    /// opted in.
    RestrictionLifted(RestrictionLifted),
    /// The room's modes changed. Sent only to clients that opted in.
    RoomUpdated(Room),
}

/// A place in the chat's one ordered log: the number of events applied
/// before it and including it. The first event is at 1; `0` is the empty
/// log. Positions have no gaps, so a client that has seen `n` needs
/// exactly the events after `n`.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(transparent)]
pub struct Position(pub u64);

impl Position {
    /// The position of the empty log, before the first event.
    pub const ZERO: Position = Position(0);

    /// The position after this one.
    pub const fn next(self) -> Position {
        Position(self.0 + 1)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Which log a [`Position`] belongs to. A server's epoch changes when its
/// history starts over (a new data directory, a restored backup, an
/// in-memory server's restart), so a position from before is never taken
/// for a current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct Epoch(pub Uuid);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The payload of a `sync` frame: the point in the log a client has
/// reached. (Not `Sync`, which would shadow `std::marker::Sync`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SyncPoint {
    /// The log the position belongs to; send it back as `epoch=`.
    pub epoch: Epoch,
    /// Every event up to this one has been sent; send it back as `since=`.
    pub position: Position,
}

/// The payload of a `reset` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Reset {
    /// Why the client could not resume where it asked.
    pub reason: ResetReason,
}

/// Why a resume became a full replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResetReason {
    /// The position belongs to another epoch: the history started over.
    EpochChanged,
    /// The events after the position are no longer kept.
    Expired,
    /// The position is ahead of every event in this epoch.
    Ahead,
}

/// The identity of a user as it appears on the wire (`author_id`, `user_id`).
///
/// The server derives it from the client's address; `chat-core` treats it as
/// an opaque string. It is shared (`Arc<str>`), because one user's id is
/// copied into every message and reaction they make.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct UserId(pub Arc<str>);

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl UserId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for UserId {
    fn from(s: &str) -> Self {
        UserId(s.into())
    }
}

impl From<String> for UserId {
    fn from(s: String) -> Self {
        UserId(s.into())
    }
}

/// The hasher of every map in the protocol types and in `chat-core`.
///
/// It has fixed keys, so that nothing in the state machine depends on a
/// random seed. The keys it hashes (message ids, server-derived user ids,
/// validated emojis) are not chosen freely by clients.
pub type FixedState = std::hash::BuildHasherDefault<std::hash::DefaultHasher>;

/// The users who reacted with one emoji, in the order they reacted.
pub type Reactors = IndexSet<UserId, FixedState>;

/// Emoji mapped to the users who reacted with it.
///
/// Emojis are kept in the order they were first used on the message, and
/// users in the order they reacted, so the JSON is deterministic.
pub type Reactions = IndexMap<String, Reactors, FixedState>;

/// A chat message as stored in history and sent to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Message {
    /// Unique message identifier.
    pub id: Uuid,
    /// Message content.
    pub text: String,
    /// The author's user id, derived from the client's address.
    pub author_id: UserId,
    /// Display name chosen by the author.
    pub author_name: String,
    /// When the server accepted the message, in Unix seconds.
    #[schemars(extend("format" = "int64"))]
    pub created_at: i64,
    /// Map of emoji to the ids of the users who reacted with it.
    pub reactions: Reactions,
}

/// Whether a toggle added or removed the user's reaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReactionAction {
    /// The user had not reacted with this emoji; now they have.
    Added,
    /// The user had reacted with this emoji; the reaction is gone.
    Removed,
}

/// The payload of a `reaction_updated` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReactionUpdated {
    /// The message whose reactions changed.
    pub message_id: Uuid,
    /// The emoji that was toggled.
    pub emoji: String,
    /// The user who toggled it.
    pub user_id: UserId,
    /// What the toggle did.
    pub action: ReactionAction,
    /// The full message after the change.
    pub message: Message,
}

/// The payload of an `error` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    /// Human-readable reason, e.g. `"message text cannot be empty"`.
    pub error: String,
}

/// The body of `GET /whoami`: the user id the server derives for the
/// client that asks, so a client can recognise its own messages and
/// reactions. It is served over plain HTTP on the same port, not as a frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WhoAmI {
    /// The asking client's user id, as it appears in `author_id` and in
    /// reaction lists.
    pub user_id: UserId,
}

impl WhoAmI {
    /// Encodes the body as JSON text.
    pub fn encode(&self) -> String {
        encode(self)
    }
}

impl ClientFrame {
    /// Decodes a client's text frame.
    ///
    /// Anything that is not a well-formed frame (bad JSON, an unknown
    /// `type`, a missing or mistyped field, a malformed uuid) is a
    /// [`DecodeError`] whose text starts with `"Invalid message format"`.
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        serde_json::from_str(text).map_err(DecodeError::from_json)
    }

    /// Encodes the frame as JSON text, as a client would send it.
    pub fn encode(&self) -> String {
        encode(self)
    }
}

impl ServerFrame {
    /// Builds an `error` frame from any refusal whose `Display` is the wire
    /// text.
    pub fn error(reason: &impl fmt::Display) -> Self {
        ServerFrame::Error(ErrorBody {
            error: reason.to_string(),
        })
    }

    /// Encodes the frame as JSON text.
    pub fn encode(&self) -> String {
        encode(self)
    }

    /// Decodes a server frame (for clients and tests).
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        serde_json::from_str(text).map_err(DecodeError::from_json)
    }
}

fn encode<T: Serialize>(frame: &T) -> String {
    // Every frame is a tree of structs, strings, integers and string-keyed
    // maps, which serde_json always serializes.
    serde_json::to_string(frame).expect("frames always serialize to JSON")
}

/// The generated JSON schema of every client frame (a `oneOf` by `type`).
pub fn client_frame_schema() -> schemars::Schema {
    schemars::schema_for!(ClientFrame)
}

/// The generated JSON schema of every server frame (a `oneOf` by `type`).
pub fn server_frame_schema() -> schemars::Schema {
    schemars::schema_for!(ServerFrame)
}

/// The generated JSON schema of the `GET /whoami` body.
pub fn whoami_schema() -> schemars::Schema {
    schemars::schema_for!(WhoAmI)
}

/// The generated JSON schemas of the operator API's bodies (requests and
/// answers), each with the name `asyncapi.yaml` gives it under
/// `components.schemas`.
pub fn operator_api_schemas() -> Vec<(&'static str, schemars::Schema)> {
    vec![
        ("RemoveMessage", schemars::schema_for!(RemoveMessage)),
        ("RestrictUser", schemars::schema_for!(RestrictUser)),
        ("LiftRestriction", schemars::schema_for!(LiftRestriction)),
        ("Room", schemars::schema_for!(Room)),
        ("Applied", schemars::schema_for!(Applied)),
        ("RestrictionEntry", schemars::schema_for!(RestrictionEntry)),
        ("AuditEntry", schemars::schema_for!(AuditEntry)),
        ("ErrorBody", schemars::schema_for!(ErrorBody)),
    ]
}
