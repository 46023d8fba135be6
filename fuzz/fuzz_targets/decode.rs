//! Any bytes a client sends, as a text frame: decoding never panics, and a
//! refusal always starts with the documented text.
#![no_main]

use chat_proto::ClientFrame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return; // the transport refuses non-UTF-8 text frames (1007)
    };
    match ClientFrame::decode(text) {
        Ok(frame) => {
            // What decodes re-encodes and decodes to the same frame.
            let again = ClientFrame::decode(&frame.encode()).expect("round trip");
            assert_eq!(again, frame);
        }
        Err(e) => assert!(e.to_string().starts_with("Invalid message format")),
    }
});
