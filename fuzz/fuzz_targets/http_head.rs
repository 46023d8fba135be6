//! The request-head parser on arbitrary bytes: it never panics, a complete
//! head is never longer than the input, the same head is found again in
//! any longer input that starts with it, and any prefix of a complete head
//! is either incomplete or an error — never a different complete head.
#![no_main]

use chat_server::checks::parse_head;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(Some(head)) = parse_head(bytes) else {
        return;
    };
    assert!(head.len <= bytes.len());
    let exact = parse_head(&bytes[..head.len])
        .expect("the head alone parses")
        .expect("the head alone is complete");
    assert_eq!(exact.len, head.len);
    assert_eq!(exact.request.uri(), head.request.uri());
    assert_eq!(exact.request.method(), head.request.method());
    assert_eq!(exact.request.headers(), head.request.headers());
    for cut in [head.len / 2, head.len.saturating_sub(1)] {
        if let Ok(Some(early)) = parse_head(&bytes[..cut]) {
            panic!("a prefix of {} bytes parsed as a {}-byte head", cut, early.len);
        }
    }
});
