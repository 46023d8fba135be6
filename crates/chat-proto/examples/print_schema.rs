//! Prints the generated JSON schemas of every frame.
fn main() {
    let schemas = serde_json::json!({
        "client": chat_proto::client_frame_schema(),
        "server": chat_proto::server_frame_schema(),
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&schemas).expect("schema is JSON")
    );
}
