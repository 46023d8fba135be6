//! What the real binary says when it starts: true warnings only, and the
//! loud ones where they matter.

mod binary;

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

/// The log lines the binary prints up to "listening", with `args`.
fn start_up_lines(args: &[&str]) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().display().to_string();
    let all: Vec<&str> = ["--data-dir", data_dir.as_str()]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    let mut child = binary::logging(&all);
    let stdout = child.stdout.take().expect("stdout");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut lines = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("a log line");
        let done = line.contains("web client at");
        lines.push(line);
        if done || Instant::now() > deadline {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    lines
}

fn mentions(lines: &[String], text: &str) -> bool {
    lines.iter().any(|l| l.contains(text))
}

#[test]
fn the_user_id_warning_appears_only_when_ids_will_change() {
    let durable = start_up_lines(&["--listen", "127.0.0.1:0"]);
    assert!(mentions(&durable, "listening"), "{durable:#?}");
    assert!(
        !mentions(&durable, "ids will change"),
        "the key is kept in the store: {durable:#?}"
    );
    let in_memory = start_up_lines(&["--listen", "127.0.0.1:0", "--in-memory"]);
    assert!(mentions(&in_memory, "ids will change"), "{in_memory:#?}");
}

#[test]
fn an_open_host_list_is_announced_only_off_loopback() {
    let loopback = start_up_lines(&[
        "--listen",
        "127.0.0.1:0",
        "--in-memory",
        "--identity-secret",
        "a secret for the start-up log test",
    ]);
    assert!(
        !mentions(&loopback, "every Host is accepted"),
        "{loopback:#?}"
    );
    let everywhere = start_up_lines(&[
        "--listen",
        "0.0.0.0:0",
        "--in-memory",
        "--identity-secret",
        "a secret for the start-up log test",
    ]);
    assert!(
        mentions(&everywhere, "every Host is accepted"),
        "{everywhere:#?}"
    );
    assert!(
        mentions(&everywhere, "--public-host"),
        "says what to do: {everywhere:#?}"
    );
    let named = start_up_lines(&[
        "--listen",
        "0.0.0.0:0",
        "--in-memory",
        "--identity-secret",
        "a secret for the start-up log test",
        "--public-host",
        "chat.example",
    ]);
    assert!(!mentions(&named, "every Host is accepted"), "{named:#?}");
}

#[test]
fn a_log_that_is_not_a_terminal_has_no_colours() {
    let lines = start_up_lines(&["--listen", "127.0.0.1:0", "--in-memory"]);
    assert!(mentions(&lines, "listening"), "{lines:#?}");
    assert!(
        !lines.iter().any(|l| l.contains('\x1b')),
        "escape codes on a pipe: {lines:#?}"
    );
}
