//! `examples/embed.rs` does what its documentation says: positions on
//! every event, a store rebuilt with `Chat::restore` (the example checks
//! it holds the live history), and a snapshot that a second run resumes
//! from. The example's own code runs here, included from its file.

#[path = "../examples/embed.rs"]
#[allow(dead_code, reason = "the example's main is not called here")]
mod embed;

/// Runs the example on `input` with `--state state`: what it broadcast,
/// and what it said of its state.
fn run(state: &std::path::Path, input: &str) -> (String, String) {
    let mut out = Vec::new();
    let mut status = Vec::new();
    embed::run(
        Some(state.to_owned()),
        input.as_bytes(),
        &mut out,
        &mut status,
    )
    .expect("the example runs");
    (
        String::from_utf8(out).expect("utf-8"),
        String::from_utf8(status).expect("utf-8"),
    )
}

#[test]
fn the_embedding_example_persists_and_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("chat.json");

    let (out, err) = run(&state, "hello\nworld\n{\"type\":\"nonsense\"}\n");
    assert!(err.contains("0 messages, at position 0"), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("1 {\"type\":\"message\""), "{out}");
    assert!(lines[1].starts_with("2 {\"type\":\"message\""), "{out}");
    assert!(lines[2].starts_with("{\"type\":\"error\""), "{out}");
    let first: serde_json::Value =
        serde_json::from_str(lines[0].split_once(' ').expect("position").1).expect("json");
    let id = first["data"]["id"].as_str().expect("id").to_owned();
    assert!(state.exists(), "the snapshot was written");

    // The second run starts from the snapshot: the history, the position,
    // and a reaction to a message of the first run.
    let react = format!(
        "{{\"type\":\"add_reaction\",\"data\":{{\"message_id\":\"{id}\",\"emoji\":\"👍\"}}}}\nagain\n"
    );
    let (out, err) = run(&state, &react);
    assert!(err.contains("2 messages, at position 2"), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with("3 {\"type\":\"reaction_updated\""),
        "{out}"
    );
    assert!(lines[1].starts_with("4 {\"type\":\"message\""), "{out}");
}
