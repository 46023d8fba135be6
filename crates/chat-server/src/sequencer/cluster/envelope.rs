//! The envelope: one command in the stream, and its pure apply.
//!
//! Everything applying an entry uses comes from the entry (its stream
//! sequence, its timestamp, the envelope), so every node computes the same
//! chat from the same stream.

use chat_core::{Chat, Command, Context, Event, Timestamp};
use chat_proto::{Epoch, Moderation, Position, RemoveMessage, UserId, Uuid};
use serde::{Deserialize, Serialize};

/// The newest envelope format this build applies. A node that meets one
/// it does not know stops applying rather than diverge from the nodes that
/// know it. Version 2 added [`Envelope::deadline`]; version 3 added
/// [`Envelope::seen`] and the [`NewEpoch`] entry; version 4 added
/// moderation orders; version 5, a [`NewEpoch`] that removes messages
/// ([`NewEpoch::removed`]). This build applies 1 to 5.
pub(crate) const ENVELOPE_VERSION: u32 = 5;

/// The version a moderation order is written with.
pub(crate) const MODERATION_VERSION: u32 = 4;

/// The version of a [`NewEpoch`] that removes messages.
const REMOVING_NEW_EPOCH_VERSION: u32 = 5;

/// The version written for what a build before moderation applies too (a
/// client's command, a new epoch): a cluster being upgraded node by node
/// goes on, and an older node stops at the first moderation order rather
/// than skip it.
pub(crate) const COMPATIBLE_VERSION: u32 = 3;

/// The version an envelope of `command` is written with.
pub(crate) fn version_for(command: &Command) -> u32 {
    match command {
        Command::Client(_) => COMPATIBLE_VERSION,
        Command::Moderation(_) => MODERATION_VERSION,
    }
}

/// The oldest envelope format this build applies.
const OLDEST_ENVELOPE_VERSION: u32 = 1;

/// One command in the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Envelope {
    /// [`version_for`] its command, when written.
    pub v: u32,
    /// The node the client is connected to.
    pub node: String,
    /// That node's run (a fresh id each start), so request ids of two runs
    /// never meet.
    pub boot: Uuid,
    /// The command's number on that node's run.
    pub request: u64,
    /// Who sent it, as the origin node judged it (from the address or a
    /// trusted proxy).
    pub user: UserId,
    /// The fingerprint of the origin node's chat rules ([`rules_of`]):
    /// nodes with other rules would compute another chat from the same
    /// log. The stream records the chat's rules, and a node whose rules
    /// differ refuses to start (`super::nats`), so a command under other
    /// rules (from a build that does not check) is skipped by every node
    /// alike, and its sender told it was not taken.
    pub rules: String,
    /// The command: a client's frame, or (version 4 on) an operator's
    /// order.
    pub command: Command,
    /// The latest chat time, in ms, at which the command may be applied
    /// (version 2 on): one the stream stamps later is not applied by any
    /// node, and its sender is told the chat was unavailable. Bounding when
    /// a command can take effect is what lets the origin node refuse alone
    /// what the stream is sure to refuse (see [`ClusterSequencer`](super::submit::ClusterSequencer)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u64>,
    /// The last stream entry the origin node had applied when it sent the
    /// command (version 3 on). The stream gives every new entry a sequence
    /// past every entry it holds, so an entry at or before `seen` proves
    /// the stream went back (a lost tail): see [`NewEpoch`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen: Option<u64>,
}

/// An entry that starts a new epoch (version 3 on), appended by a node
/// that found the stream rewound: it applied entries the stream no longer
/// holds, and their positions will be reused. Every node switches to the
/// epoch [`next_epoch`] derives when it applies this entry, so all agree
/// on where the new epoch starts, and a client holding a position of the
/// old one is told to reset wherever it resumes.
///
/// Two nodes that find the same rewind append two of these: every node
/// applies both, in the stream's order, and ends in the same epoch. The
/// only cost is a second reset for a client that resumed in between.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct NewEpoch {
    /// [`COMPATIBLE_VERSION`] when written, or version 5 with
    /// [`NewEpoch::removed`] (a build that does not know it stops rather
    /// than keep those messages).
    pub v: u32,
    /// Why, and who saw it.
    pub new_epoch: Rewind,
    /// Messages every node removes when it applies this entry: their
    /// entries were erased after a removal that the lost tail took with
    /// it. Their text is gone from the stream, so no node can serve them
    /// (a node that had applied the post still holds it; one that applies
    /// the stream now meets a hole, and the tombstone's redacted post),
    /// and the moderator's order stands. See [`NewEpoch::new`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<Uuid>,
}

/// Who a [`NewEpoch`]'s removals are by, in the audit trail.
pub(crate) const LOST_REMOVAL_BY: &str = "cluster";

/// Their reason, in the audit trail.
pub(crate) const LOST_REMOVAL_REASON: &str =
    "removed before a lost tail of the stream took the order; its text was erased";

impl NewEpoch {
    /// The entry for `rewind`, removing `removed`, with the oldest version
    /// that says it.
    pub(crate) fn new(rewind: Rewind, removed: Vec<Uuid>) -> NewEpoch {
        NewEpoch {
            v: if removed.is_empty() {
                COMPATIBLE_VERSION
            } else {
                REMOVING_NEW_EPOCH_VERSION
            },
            new_epoch: rewind,
            removed,
        }
    }
}

/// What a node saw that made it append a [`NewEpoch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Rewind {
    /// The node that saw it.
    pub node: String,
    /// That node's run: with `node`, makes the entry unique.
    pub boot: Uuid,
    /// The last entry that node had applied.
    pub applied: u64,
    /// What it saw, for the operator reading the stream.
    pub why: String,
}

/// What became of a command in the stream.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Applied: accepted (at the position of its last event), or refused
    /// by the chat's rules.
    Applied(Result<Position, chat_core::ChatError>),
    /// Stamped after its deadline: no node applied it.
    Expired,
    /// Sent under other chat rules than the stream's: no node applied it.
    OtherRules,
}

/// The fingerprint of a chat's rules: the same rules, the same chat from
/// the same log.
pub(crate) fn rules_of(config: &chat_core::Config) -> String {
    let hash = blake3::hash(format!("{config:?}").as_bytes());
    hash.to_hex()[..16].to_owned()
}

/// The epoch of a stream: the same on every node, new when the stream is
/// recreated.
pub(super) fn epoch_of(stream: &str, created_nanos: i128) -> Epoch {
    let name = blake3::hash(stream.as_bytes());
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&name.as_bytes()[..8]);
    bytes[8..].copy_from_slice(&(created_nanos as u64).to_be_bytes());
    Epoch(Uuid::from_bytes(bytes))
}

/// The epoch after `epoch` switches at stream entry `seq`: the same on
/// every node that applies the same stream.
pub(super) fn next_epoch(epoch: Epoch, seq: u64) -> Epoch {
    let mut hasher = blake3::Hasher::new();
    hasher.update(epoch.0.as_bytes());
    hasher.update(&seq.to_be_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    Epoch(uuid::Builder::from_custom_bytes(bytes).into_uuid())
}

/// What applying one stream entry did.
pub(super) enum Applied {
    Done {
        origin: Option<(String, Uuid, u64)>,
        /// Whose command it was, if it was applied.
        user: Option<UserId>,
        outcome: Outcome,
        events: Vec<Event>,
    },
    /// Not an envelope: skipped, on every node alike.
    Skipped(String),
    /// An envelope of a version this build does not know.
    Unknown(u32),
    /// A [`NewEpoch`] entry: the epoch switched, and the events of the
    /// removals it carries.
    NewEpoch { rewind: Rewind, events: Vec<Event> },
}

/// Applies the entry at stream sequence `seq`, stored at `ms`, to `chat`
/// in `epoch` (switched here when the entry says so). Everything it uses
/// comes from the entry, so every node computes the same thing.
pub(super) fn apply(
    chat: &mut Chat,
    epoch: &mut Epoch,
    rules: &str,
    seq: u64,
    ms: u64,
    payload: &[u8],
) -> Applied {
    #[derive(Deserialize)]
    struct Versioned {
        v: u32,
        #[serde(default)]
        new_epoch: Option<serde::de::IgnoredAny>,
    }
    let marker = match serde_json::from_slice::<Versioned>(payload) {
        Ok(Versioned { v, new_epoch })
            if (OLDEST_ENVELOPE_VERSION..=ENVELOPE_VERSION).contains(&v) =>
        {
            v >= 3 && new_epoch.is_some()
        }
        Ok(Versioned { v, .. }) => return Applied::Unknown(v),
        Err(e) => return Applied::Skipped(e.to_string()),
    };
    if marker {
        return match serde_json::from_slice::<NewEpoch>(payload) {
            Ok(entry) => {
                *epoch = next_epoch(*epoch, seq);
                let now = Timestamp::from_unix_millis(ms);
                for id in entry.removed {
                    let ctx = Context {
                        user: UserId::from(LOST_REMOVAL_BY),
                        now,
                        message_id: message_id(seq, ms),
                    };
                    let order = Moderation::RemoveMessage(RemoveMessage {
                        message_id: id,
                        reason: Some(LOST_REMOVAL_REASON.to_owned()),
                    });
                    // Removed already, or never applied here: nothing to do,
                    // on every node alike.
                    let _ = chat.handle(ctx, Command::Moderation(order));
                }
                Applied::NewEpoch {
                    rewind: entry.new_epoch,
                    events: std::iter::from_fn(|| chat.poll_event()).collect(),
                }
            }
            Err(e) => Applied::Skipped(e.to_string()),
        };
    }
    let envelope: Envelope = match serde_json::from_slice(payload) {
        Ok(envelope) => envelope,
        Err(e) => return Applied::Skipped(e.to_string()),
    };
    if envelope.v >= 2 && envelope.deadline.is_none() {
        return Applied::Skipped("an envelope of version 2 or later without its deadline".into());
    }
    if envelope.v >= 3 && envelope.seen.is_none() {
        return Applied::Skipped(
            "an envelope of version 3 or later without what it had seen".into(),
        );
    }
    let origin = Some((envelope.node, envelope.boot, envelope.request));
    if envelope.rules != rules {
        return Applied::Done {
            origin,
            user: None,
            outcome: Outcome::OtherRules,
            events: Vec::new(),
        };
    }
    // Its sender had applied an entry at this sequence or later: the
    // stream went back, and positions from here on are new ones.
    if envelope.seen.is_some_and(|seen| seen >= seq) {
        *epoch = next_epoch(*epoch, seq);
    }
    let now = Timestamp::from_unix_millis(ms);
    if envelope
        .deadline
        .is_some_and(|deadline| chat.time_at(now).as_millis() > deadline)
    {
        return Applied::Done {
            origin,
            user: None,
            outcome: Outcome::Expired,
            events: Vec::new(),
        };
    }
    let ctx = Context {
        user: envelope.user.clone(),
        now,
        message_id: message_id(seq, ms),
    };
    if matches!(envelope.command, Command::Moderation(_)) && envelope.v < MODERATION_VERSION {
        return Applied::Skipped("a moderation order in an envelope older than version 4".into());
    }
    let outcome = chat.handle(ctx, envelope.command).map(|()| chat.head());
    let events = std::iter::from_fn(|| chat.poll_event()).collect();
    Applied::Done {
        origin,
        user: Some(envelope.user),
        outcome: Outcome::Applied(outcome),
        events,
    }
}

/// The id of a message posted by the entry at stream sequence `seq`: a
/// UUIDv7 whose time is the entry's and whose other bits are the sequence,
/// unique within the stream and the same on every node.
pub(super) fn message_id(seq: u64, ms: u64) -> Uuid {
    let mut rest = [0u8; 10];
    rest[..8].copy_from_slice(&seq.to_be_bytes());
    uuid::Builder::from_unix_timestamp_millis(ms, &rest).into_uuid()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use chat_core::Config;
    use chat_proto::{ClientFrame, SendMessage};

    pub(in crate::sequencer::cluster) fn envelope(text: &str) -> Vec<u8> {
        envelope_by(text, Some(u64::MAX))
    }

    pub(in crate::sequencer::cluster) fn envelope_by(text: &str, deadline: Option<u64>) -> Vec<u8> {
        serde_json::to_vec(&Envelope {
            v: COMPATIBLE_VERSION,
            node: "a".into(),
            boot: Uuid::from_u128(1),
            request: 0,
            user: "u".into(),
            rules: "r".into(),
            command: ClientFrame::SendMessage(SendMessage {
                text: text.into(),
                author_name: None,
            })
            .into(),
            deadline,
            seen: Some(0),
        })
        .expect("encodes")
    }

    #[test]
    fn the_same_entries_give_every_node_the_same_chat() {
        let entries: Vec<(u64, u64, Vec<u8>)> = vec![
            (1, 1_700_000_000_000, envelope("one")),
            (2, 1_700_000_000_005, b"junk from elsewhere".to_vec()),
            (3, 1_699_000_000_000, envelope("two")),
            (4, 1_700_000_001_000, envelope("")),
        ];
        let run = || {
            let mut chat = Chat::new(Config::default());
            let mut log = Vec::new();
            for (seq, ms, payload) in &entries {
                match apply(&mut chat, &mut Epoch(Uuid::nil()), "r", *seq, *ms, payload) {
                    Applied::Done {
                        outcome: Outcome::Applied(outcome),
                        events,
                        ..
                    } => {
                        log.push(format!("{outcome:?} {events:?}"));
                    }
                    Applied::Done {
                        outcome: Outcome::Expired | Outcome::OtherRules,
                        ..
                    } => log.push("not applied".into()),
                    Applied::Skipped(_) => log.push("skipped".into()),
                    Applied::Unknown(v) => log.push(format!("unknown {v}")),
                    Applied::NewEpoch { .. } => log.push("new epoch".into()),
                }
            }
            (log, chat.head())
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        assert_eq!(a.0[1], "skipped");
        assert!(a.0[3].starts_with("Err(EmptyText)"), "{}", a.0[3]);
        assert_eq!(a.1, chat_proto::Position(2));
    }

    #[test]
    fn an_unknown_envelope_version_stops_the_node() {
        let mut chat = Chat::new(Config::default());
        let newer = serde_json::json!({ "v": ENVELOPE_VERSION + 1, "anything": "else" });
        let newer = serde_json::to_vec(&newer).expect("json");
        assert!(matches!(
            apply(&mut chat, &mut Epoch(Uuid::nil()), "r", 1, 0, &newer),
            Applied::Unknown(v) if v == ENVELOPE_VERSION + 1
        ));
    }

    #[test]
    fn a_command_under_other_rules_is_applied_by_no_node_and_its_sender_told() {
        let mut chat = Chat::new(Config::default());
        assert!(matches!(
            apply(&mut chat, &mut Epoch(Uuid::nil()), "other rules", 1, 0, &envelope("hi")),
            Applied::Done {
                origin: Some((ref node, _, 0)),
                outcome: Outcome::OtherRules,
                ref events,
                ..
            } if node == "a" && events.is_empty()
        ));
        assert_eq!(chat.head(), chat_proto::Position(0), "nothing applied");
        let strict = Config {
            history_limit: 10,
            ..Config::default()
        };
        assert_ne!(rules_of(&strict), rules_of(&Config::default()));
        assert_eq!(rules_of(&Config::default()), rules_of(&Config::default()));
    }

    #[test]
    fn a_command_stamped_after_its_deadline_is_applied_by_no_node() {
        let t = 1_700_000_000_000u64;
        let mut chat = Chat::new(Config::default());
        let on_time = apply(
            &mut chat,
            &mut Epoch(Uuid::nil()),
            "r",
            1,
            t,
            &envelope_by("on time", Some(t)),
        );
        assert!(matches!(
            on_time,
            Applied::Done {
                outcome: Outcome::Applied(Ok(_)),
                ..
            }
        ));
        let late = apply(
            &mut chat,
            &mut Epoch(Uuid::nil()),
            "r",
            2,
            t + 1,
            &envelope_by("late", Some(t)),
        );
        assert!(matches!(
            late,
            Applied::Done {
                outcome: Outcome::Expired,
                ref events,
                ..
            } if events.is_empty()
        ));
        assert_eq!(chat.head(), chat_proto::Position(1), "nothing applied");
        // Version 1 had no deadline: still applied as it was.
        let mut v1: serde_json::Value =
            serde_json::from_slice(&envelope_by("from v1", None)).expect("json");
        v1["v"] = 1.into();
        let v1 = serde_json::to_vec(&v1).expect("json");
        assert!(matches!(
            apply(&mut chat, &mut Epoch(Uuid::nil()), "r", 3, t + 2, &v1),
            Applied::Done {
                outcome: Outcome::Applied(Ok(_)),
                ..
            }
        ));
        // Version 2 without one is not a command.
        assert!(matches!(
            apply(
                &mut chat,
                &mut Epoch(Uuid::nil()),
                "r",
                4,
                t + 3,
                &envelope_by("no deadline", None)
            ),
            Applied::Skipped(_)
        ));
    }

    fn seen_at(text: &str, seen: u64) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_slice(&envelope(text)).expect("json");
        v["seen"] = seen.into();
        serde_json::to_vec(&v).expect("json")
    }

    fn rewind() -> Rewind {
        Rewind {
            node: "a".into(),
            boot: Uuid::from_u128(2),
            applied: 9,
            why: "rewound".into(),
        }
    }

    fn new_epoch_entry() -> Vec<u8> {
        serde_json::to_vec(&NewEpoch::new(rewind(), Vec::new())).expect("encodes")
    }

    #[test]
    fn a_new_epoch_removes_the_messages_whose_removal_the_lost_tail_took() {
        let mut chat = Chat::new(Config::default());
        let mut epoch = Epoch(Uuid::nil());
        let t = 1_700_000_000_000;
        for (seq, text) in [(1, "erased"), (2, "kept")] {
            apply(&mut chat, &mut epoch, "r", seq, t + seq, &envelope(text));
        }
        let erased = message_id(1, t + 1);
        let entry = NewEpoch::new(rewind(), vec![erased, Uuid::from_u128(7)]);
        assert_eq!(entry.v, 5, "a build that cannot remove them stops");
        assert_eq!(NewEpoch::new(rewind(), Vec::new()).v, COMPATIBLE_VERSION);
        let payload = serde_json::to_vec(&entry).expect("json");
        let Applied::NewEpoch { events, .. } =
            apply(&mut chat, &mut epoch, "r", 3, t + 9, &payload)
        else {
            panic!("a new epoch")
        };
        assert_eq!(
            events.len(),
            1,
            "one removed; the unknown id changes nothing"
        );
        assert!(matches!(
            &events[0].kind,
            chat_core::EventKind::MessageRemoved { message, .. } if message.id == erased
        ));
        let texts: Vec<&str> = chat.history().iter().map(|m| m.text.as_str()).collect();
        assert_eq!(texts, ["kept"]);
        let audit: Vec<_> = chat.audit().collect();
        assert_eq!(audit.len(), 1);
        assert_eq!(audit[0].by.as_str(), LOST_REMOVAL_BY);
        assert_eq!(audit[0].removed, [erased]);
    }

    #[test]
    fn a_rewound_stream_starts_a_new_epoch_at_the_same_entry_on_every_node() {
        let t = 1_700_000_000_000u64;
        // A lost tail: entries 3 and 4 were applied, then lost; the
        // stream gives their sequences to new entries. One from a node
        // that had applied 4 proves it; so does a node's NewEpoch entry.
        let entries: Vec<(u64, Vec<u8>)> = vec![
            (1, seen_at("one", 0)),
            (2, seen_at("two", 1)),
            (3, seen_at("from a node that saw 4", 4)),
            (4, seen_at("from a lagging node", 2)),
            (5, new_epoch_entry()),
            (6, seen_at("after", 5)),
        ];
        let start = epoch_of("chat", 1);
        let run = || {
            let mut chat = Chat::new(Config::default());
            let mut epoch = start;
            let mut epochs = Vec::new();
            for (seq, payload) in &entries {
                let applied = apply(&mut chat, &mut epoch, "r", *seq, t + seq, payload);
                assert!(
                    matches!(
                        applied,
                        Applied::Done {
                            outcome: Outcome::Applied(Ok(_)),
                            ..
                        } | Applied::NewEpoch { .. }
                    ),
                    "entry {seq}"
                );
                epochs.push(epoch);
            }
            (epochs, chat.head())
        };
        let (epochs, head) = run();
        assert_eq!((epochs.clone(), head), run(), "the same on every node");
        let at_3 = next_epoch(start, 3);
        let at_5 = next_epoch(at_3, 5);
        assert_eq!(epochs, vec![start, start, at_3, at_3, at_5, at_5]);
        assert_ne!(at_3, start);
        assert_ne!(at_5, at_3);
        assert_eq!(head, chat_proto::Position(5), "the commands still apply");
        // Version 3 without what it saw is not a command.
        let mut v: serde_json::Value = serde_json::from_slice(&envelope("x")).expect("json");
        v.as_object_mut().expect("object").remove("seen");
        let mut chat = Chat::new(Config::default());
        assert!(matches!(
            apply(
                &mut chat,
                &mut Epoch(Uuid::nil()),
                "r",
                1,
                t,
                &serde_json::to_vec(&v).expect("json")
            ),
            Applied::Skipped(_)
        ));
    }

    #[test]
    fn message_ids_come_from_the_stream_position() {
        assert_eq!(message_id(7, 1000), message_id(7, 1000));
        assert_ne!(message_id(7, 1000), message_id(8, 1000));
        assert_eq!(message_id(7, 1000).get_version_num(), 7);
    }
}
