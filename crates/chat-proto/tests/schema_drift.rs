//! The schemas generated from the Rust types must say what `asyncapi.yaml`
//! says. Both sides are reduced to the keywords that constrain a frame
//! (properties, required, type, format, const, enum, length limits, default,
//! items, additionalProperties) and compared whole, so any drift fails here.

use chat_testkit::{Sender, asyncapi, deref, spec_messages};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

/// Keywords compared verbatim.
const SCALAR_KEYWORDS: &[&str] = &[
    "format",
    "const",
    "maxLength",
    "minLength",
    "maximum",
    "minimum",
    "uniqueItems",
    "default",
];

/// Reduces a schema to the keywords that constrain a frame, following
/// `$ref`s against `root` and sorting what has no order.
fn normalize(root: &Value, schema: &Value) -> Value {
    let schema = deref(root, schema);
    let Some(obj) = schema.as_object() else {
        return schema.clone(); // `true` / `false` schemas
    };
    let mut out = Map::new();
    if let Some(t) = obj.get("type") {
        let mut types: Vec<String> = match t {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a
                .iter()
                .map(|v| v.as_str().expect("type name").to_owned())
                .collect(),
            other => panic!("odd type {other}"),
        };
        types.sort();
        out.insert("type".into(), json!(types));
    }
    for k in SCALAR_KEYWORDS {
        if let Some(v) = obj.get(*k) {
            out.insert((*k).into(), v.clone());
        }
    }
    // schemars writes a documented unit enum as `oneOf` of `const`s; that
    // means the same as `enum`.
    let enum_values = obj.get("enum").cloned().or_else(|| {
        let alts = obj.get("oneOf")?.as_array()?;
        alts.iter()
            .map(|a| deref(root, a).get("const").cloned())
            .collect::<Option<Vec<_>>>()
            .map(Value::Array)
    });
    if let Some(Value::Array(mut values)) = enum_values {
        values.sort_by_key(|v| v.to_string());
        out.insert("enum".into(), Value::Array(values));
        if !out.contains_key("type") {
            out.insert("type".into(), json!(["string"]));
        }
    } else if let Some(Value::Array(alts)) = obj.get("oneOf") {
        // Alternatives of other kinds (an enum with data): each reduced,
        // in no particular order.
        let mut alts: Vec<Value> = alts.iter().map(|a| normalize(root, a)).collect();
        alts.sort_by_key(|v| v.to_string());
        out.insert("oneOf".into(), Value::Array(alts));
    }
    if let Some(Value::Array(req)) = obj.get("required") {
        let mut req: Vec<String> = req
            .iter()
            .map(|v| v.as_str().expect("required").to_owned())
            .collect();
        req.sort();
        out.insert("required".into(), json!(req));
    }
    if let Some(Value::Object(props)) = obj.get("properties") {
        let props: BTreeMap<&String, Value> =
            props.iter().map(|(k, v)| (k, normalize(root, v))).collect();
        out.insert("properties".into(), json!(props));
    }
    for k in ["items", "additionalProperties"] {
        if let Some(v) = obj.get(k) {
            out.insert(k.into(), normalize(root, v));
        }
    }
    Value::Object(out)
}

/// The generated schema of each frame, by its `type`.
fn generated_frames(schema: &Value) -> BTreeMap<String, Value> {
    schema["oneOf"]
        .as_array()
        .expect("frames are a oneOf by type")
        .iter()
        .map(|variant| {
            let name = variant["properties"]["type"]["const"]
                .as_str()
                .expect("each frame has a const type")
                .to_owned();
            (name, normalize(schema, variant))
        })
        .collect()
}

fn spec_frames(doc: &Value, sender: Sender) -> BTreeMap<String, Value> {
    spec_messages(doc)
        .into_iter()
        .filter(|m| m.sender == sender)
        .map(|m| (m.name, normalize(doc, &m.payload)))
        .collect()
}

fn assert_same(side: &str, generated: BTreeMap<String, Value>, spec: BTreeMap<String, Value>) {
    let g: Vec<&String> = generated.keys().collect();
    let s: Vec<&String> = spec.keys().collect();
    assert_eq!(
        g, s,
        "{side} frames: generated types vs asyncapi.yaml messages"
    );
    for (name, gen_schema) in &generated {
        let spec_schema = &spec[name];
        assert_eq!(
            gen_schema,
            spec_schema,
            "{side} frame `{name}` drifted from asyncapi.yaml\n generated: {}\n asyncapi:  {}",
            serde_json::to_string_pretty(gen_schema).unwrap_or_default(),
            serde_json::to_string_pretty(spec_schema).unwrap_or_default(),
        );
    }
}

#[test]
fn client_frames_match_asyncapi() {
    let generated = serde_json::to_value(chat_proto::client_frame_schema()).expect("schema");
    assert_same(
        "client",
        generated_frames(&generated),
        spec_frames(&asyncapi(), Sender::Client),
    );
}

#[test]
fn server_frames_match_asyncapi() {
    let generated = serde_json::to_value(chat_proto::server_frame_schema()).expect("schema");
    assert_same(
        "server",
        generated_frames(&generated),
        spec_frames(&asyncapi(), Sender::Server),
    );
}

#[test]
fn whoami_body_matches_asyncapi() {
    let doc = asyncapi();
    let generated = serde_json::to_value(chat_proto::whoami_schema()).expect("schema");
    let spec = doc
        .pointer("/components/schemas/WhoAmI")
        .expect("asyncapi.yaml documents the /whoami body as components.schemas.WhoAmI");
    assert_eq!(normalize(&generated, &generated), normalize(&doc, spec));
}

#[test]
fn operator_api_bodies_match_asyncapi() {
    let doc = asyncapi();
    for (name, schema) in chat_proto::operator_api_schemas() {
        let generated = serde_json::to_value(schema).expect("schema");
        let spec = doc
            .pointer(&format!("/components/schemas/{name}"))
            .unwrap_or_else(|| panic!("asyncapi.yaml documents {name} under components.schemas"));
        let (generated, spec) = (normalize(&generated, &generated), normalize(&doc, spec));
        assert_eq!(
            generated,
            spec,
            "the operator API's `{name}` drifted from asyncapi.yaml\n generated: {}\n asyncapi:  {}",
            serde_json::to_string_pretty(&generated).unwrap_or_default(),
            serde_json::to_string_pretty(&spec).unwrap_or_default(),
        );
    }
}

/// The comparison must notice drift: changing any one constraint in the
/// document makes its frame normalize differently.
#[test]
fn comparison_notices_each_kind_of_drift() {
    let doc = asyncapi();
    let before = spec_frames(&doc, Sender::Client);
    let text = "/components/schemas/SendMessageFrame/properties/data/properties/text";
    let edits: [(&str, Value); 4] = [
        ("maxLength", json!(499)),
        ("type", json!("integer")),
        ("format", json!("uuid")),
        ("minLength", json!(1)),
    ];
    for (keyword, value) in edits {
        let mut changed = doc.clone();
        changed.pointer_mut(text).expect("text schema")[keyword] = value;
        let after = spec_frames(&changed, Sender::Client);
        assert_ne!(before, after, "changing {keyword} went unnoticed");
    }
    let mut changed = doc.clone();
    changed
        .pointer_mut("/components/schemas/SendMessageFrame/properties/data/required")
        .expect("required")
        .as_array_mut()
        .expect("array")
        .clear();
    assert_ne!(
        before,
        spec_frames(&changed, Sender::Client),
        "dropping a required field went unnoticed"
    );
}
