//! Test support shared by the workspace's crates.
//!
//! `asyncapi.yaml` is the contract. Tests load it from here, so that every
//! crate checks against the same file and nobody copies a schema by hand.
#![forbid(unsafe_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};

/// Where the workspace's `asyncapi.yaml` is.
pub fn asyncapi_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../asyncapi.yaml")
}

/// The workspace's `asyncapi.yaml`, as JSON.
pub fn asyncapi() -> Value {
    let path = asyncapi_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Follows a local `$ref` (`#/a/b/c`) inside `root`.
pub fn resolve<'a>(root: &'a Value, reference: &str) -> &'a Value {
    let pointer = reference
        .strip_prefix('#')
        .unwrap_or_else(|| panic!("only local $refs are supported, got {reference}"));
    root.pointer(pointer)
        .unwrap_or_else(|| panic!("dangling $ref {reference}"))
}

/// Follows `$ref`s until `value` is not a reference.
pub fn deref<'a>(root: &'a Value, mut value: &'a Value) -> &'a Value {
    while let Some(r) = value.get("$ref").and_then(Value::as_str) {
        value = resolve(root, r);
    }
    value
}

/// Which side sends a message, by the AsyncAPI operation that carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    /// The server receives it: a client frame.
    Client,
    /// The server sends it: a server frame.
    Server,
}

/// One message of `asyncapi.yaml`: its `name` (the frame's `type`), who
/// sends it, and its payload schema (unresolved).
#[derive(Debug, Clone)]
pub struct SpecMessage {
    /// The message's `name`, which is the frame's `type`.
    pub name: String,
    /// Who sends it.
    pub sender: Sender,
    /// The payload schema as written (it may be a `$ref`).
    pub payload: Value,
}

/// Every message that an operation of `asyncapi.yaml` sends or receives.
pub fn spec_messages(doc: &Value) -> Vec<SpecMessage> {
    let operations = doc["operations"].as_object().expect("operations");
    let mut out = Vec::new();
    for (op_name, op) in operations {
        let sender = match op["action"].as_str() {
            Some("receive") => Sender::Client,
            Some("send") => Sender::Server,
            other => panic!("operation {op_name}: unexpected action {other:?}"),
        };
        for m in op["messages"].as_array().expect("operation messages") {
            let message = deref(doc, m);
            out.push(SpecMessage {
                name: message["name"].as_str().expect("message name").to_owned(),
                sender,
                payload: message["payload"].clone(),
            });
        }
    }
    out
}

/// Validates frames against the payload schemas of `asyncapi.yaml`.
#[derive(Debug)]
pub struct FrameValidator {
    validator: jsonschema::Validator,
}

impl FrameValidator {
    /// A validator for every frame the server may send.
    pub fn server_frames() -> Self {
        Self::for_sender(Sender::Server)
    }

    /// A validator for every frame a client may send.
    pub fn client_frames() -> Self {
        Self::for_sender(Sender::Client)
    }

    fn for_sender(sender: Sender) -> Self {
        let mut doc = asyncapi();
        let one_of: Vec<Value> = spec_messages(&doc)
            .into_iter()
            .filter(|m| m.sender == sender)
            .map(|m| m.payload)
            .collect();
        // Draft 2020-12 rather than AsyncAPI's draft 7, because draft 7 does
        // not define the `uuid` format the payloads use. The whole document is the schema root, so its `#/components/...`
        // references resolve; the validator ignores the AsyncAPI keywords.
        doc["oneOf"] = Value::Array(one_of);
        let validator = jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&doc)
            .expect("asyncapi payload schemas compile");
        FrameValidator { validator }
    }

    /// Checks one frame's JSON text; the error names every violation.
    pub fn check(&self, text: &str) -> Result<(), String> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON ({e}): {text}"))?;
        let errors: Vec<String> = self
            .validator
            .iter_errors(&value)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{text}\n  violates asyncapi.yaml: {}",
                errors.join("; ")
            ))
        }
    }

    /// Panics unless the frame matches the schemas.
    pub fn assert_valid(&self, text: &str) {
        if let Err(e) = self.check(text) {
            panic!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asyncapi_lists_the_seed_s_five_operations_and_the_opt_in_ones() {
        let doc = asyncapi();
        let messages = spec_messages(&doc);
        let names: Vec<&str> = messages.iter().map(|m| m.name.as_str()).collect();
        let expected = [
            "send_message",
            "add_reaction",
            "message",
            "reaction_updated",
            "error",
            // Positions and resume.
            "sync",
            "reset",
            // Moderation.
            "message_removed",
            "user_restricted",
            "restriction_lifted",
            "room_updated",
        ];
        assert_eq!(
            names.len(),
            expected.len(),
            "expected the seed's five operations and the opt-in frames, got {names:?}"
        );
        for name in expected {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
    }

    #[test]
    fn validator_accepts_good_and_rejects_bad_frames() {
        let v = FrameValidator::server_frames();
        v.assert_valid(r#"{"type":"error","data":{"error":"x"}}"#);
        assert!(v.check(r#"{"type":"error","data":{}}"#).is_err());
        assert!(v.check(r#"{"type":"nope","data":{"error":"x"}}"#).is_err());
        let msg = r#"{"type":"message","data":{"id":"not-a-uuid","text":"t","author_id":"a","author_name":"n","created_at":1,"reactions":{}}}"#;
        assert!(v.check(msg).is_err(), "a malformed uuid must be refused");
        let c = FrameValidator::client_frames();
        let long = "x".repeat(501);
        let frame = format!(r#"{{"type":"send_message","data":{{"text":"{long}"}}}}"#);
        assert!(c.check(&frame).is_err(), "501 characters must be refused");
    }
}
