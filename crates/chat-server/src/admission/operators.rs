//! Who may moderate: the operator API's keys, checked in constant time,
//! and a bound on how often one address may guess.
//!
//! Keys come from `--admin-keys-file`: one per line, a name and the key,
//! separated by white space (`alice 3q2+7w...`); `#` starts a comment.
//! The name is who the audit trail says acted. A key is at least
//! [`MIN_KEY_CHARS`] characters (`openssl rand -base64 32` gives 44). The
//! server keeps only the keys' BLAKE3 hashes, and compares a presented
//! key's hash with every one of them, each comparison in constant time
//! (`blake3::Hash`'s equality), so neither the time nor the order tells an
//! attacker anything.
//!
//! An address (an IPv6 address by its /64) that fails
//! [`MAX_FAILURES`] times within [`FAILURE_WINDOW`] is refused (429) until
//! the window has passed, whatever key it sends. At most
//! [`MAX_TRACKED`] addresses are remembered; when that many are failing,
//! every further address that fails is refused too until room frees: the
//! limit fails closed.

use chat_proto::UserId;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The shortest key taken.
pub(crate) const MIN_KEY_CHARS: usize = 24;

/// Failed attempts one address may make per window.
pub(crate) const MAX_FAILURES: u32 = 10;

/// The window failures are counted in.
pub(crate) const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Most addresses whose failures are remembered.
pub(crate) const MAX_TRACKED: usize = 4096;

/// The prefix of an operator's user id: the audit trail's `by`. No user
/// id the server derives from an address has it.
pub(crate) const OPERATOR_PREFIX: &str = "moderator:";

/// The operators' keys, and who failed lately.
#[derive(Debug)]
pub(crate) struct Operators {
    /// Each key's name and hash.
    keys: Vec<(String, blake3::Hash)>,
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    since: Instant,
}

/// Why an operator request was not let in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Denied {
    /// No `Authorization: Bearer` header.
    #[error("an operator key is needed: Authorization: Bearer KEY")]
    NoKey,
    /// A key that is none of the operators'.
    #[error("that key is not an operator's")]
    WrongKey,
    /// Too many failures from this address lately.
    #[error("too many failed attempts from this address; try again later")]
    TooManyFailures,
}

impl Denied {
    /// The metric label of the refusal.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Denied::NoKey => "no_key",
            Denied::WrongKey => "wrong_key",
            Denied::TooManyFailures => "too_many_failures",
        }
    }

    /// Every [`kind`](Self::kind).
    pub(crate) const KINDS: &'static [&'static str] = &["no_key", "wrong_key", "too_many_failures"];
}

impl Operators {
    /// Reads the keys file at `path`.
    pub(crate) fn load(path: &Path) -> Result<Operators, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--admin-keys-file {}: {e}", path.display()))?;
        let operators = Operators::parse(&text)
            .map_err(|e| format!("--admin-keys-file {}: {e}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(
                    path = %path.display(),
                    "the operator keys file can be read by other users; chmod 600 it"
                );
            }
        }
        Ok(operators)
    }

    /// The keys in `text` (the file's format).
    pub(crate) fn parse(text: &str) -> Result<Operators, String> {
        let mut keys: Vec<(String, blake3::Hash)> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(name), Some(key), None) = (words.next(), words.next(), words.next()) else {
                return Err(format!("line {}: want a name and a key", i + 1));
            };
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                || name.len() > 64
            {
                return Err(format!(
                    "line {}: a name is 1 to 64 of A-Z a-z 0-9 . _ -",
                    i + 1
                ));
            }
            if key.chars().count() < MIN_KEY_CHARS {
                return Err(format!(
                    "line {}: the key of {name} is shorter than {MIN_KEY_CHARS} characters \
                     (generate one with `openssl rand -base64 32`)",
                    i + 1
                ));
            }
            let hash = blake3::hash(key.as_bytes());
            if keys.iter().any(|(n, h)| n == name || *h == hash) {
                return Err(format!("line {}: {name} or its key is listed twice", i + 1));
            }
            keys.push((name.to_owned(), hash));
        }
        if keys.is_empty() {
            return Err("no keys in it".into());
        }
        Ok(Operators {
            keys,
            failures: Mutex::new(HashMap::new()),
        })
    }

    /// How many keys there are.
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Who sent `authorization` (the header's value, if any) from `addr`
    /// at `now`: the operator's user id, or why not.
    pub(crate) fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        addr: IpAddr,
        now: Instant,
    ) -> Result<UserId, Denied> {
        let addr = bucket(addr);
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = failures.get(&addr)
            && now.duration_since(f.since) < FAILURE_WINDOW
            && f.count >= MAX_FAILURES
        {
            return Err(Denied::TooManyFailures);
        }
        let presented = authorization.and_then(|v| {
            let v = std::str::from_utf8(v).ok()?.trim();
            let (scheme, key) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
        });
        let denied = match presented {
            None => Denied::NoKey,
            Some(key) => {
                let hash = blake3::hash(key.as_bytes());
                // Every key is compared, each in constant time.
                let mut found = None;
                for (name, h) in &self.keys {
                    if *h == hash {
                        found = Some(name);
                    }
                }
                match found {
                    Some(name) => return Ok(UserId::from(format!("{OPERATOR_PREFIX}{name}"))),
                    None => Denied::WrongKey,
                }
            }
        };
        // A request with no key at all is a page or a curl without -H:
        // it counts as a failure too, or it would be a free probe.
        if failures.len() >= MAX_TRACKED && !failures.contains_key(&addr) {
            failures.retain(|_, f| now.duration_since(f.since) < FAILURE_WINDOW);
            if failures.len() >= MAX_TRACKED {
                return Err(Denied::TooManyFailures);
            }
        }
        let entry = failures.entry(addr).or_insert(Failures {
            count: 0,
            since: now,
        });
        if now.duration_since(entry.since) >= FAILURE_WINDOW {
            *entry = Failures {
                count: 0,
                since: now,
            };
        }
        entry.count += 1;
        Err(denied)
    }
}

/// The address failures are counted by: an IPv6 address by its /64 (one
/// host usually holds a whole /64), an IPv4 address as it is.
fn bucket(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::from(octets)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "k3y-of-alice-0123456789abcdef";

    fn operators() -> Operators {
        Operators::parse(&format!(
            "# the moderators\nalice {KEY}\n\nbob   another-key-0123456789abcdef  # Bob\n"
        ))
        .expect("parses")
    }

    fn bearer(key: &str) -> Vec<u8> {
        format!("Bearer {key}").into_bytes()
    }

    #[test]
    fn a_key_names_its_operator_and_nothing_else_gets_in() {
        let ops = operators();
        assert_eq!(ops.len(), 2);
        let addr: IpAddr = "192.0.2.1".parse().expect("ip");
        let now = Instant::now();
        assert_eq!(
            ops.authenticate(Some(&bearer(KEY)), addr, now),
            Ok(UserId::from("moderator:alice"))
        );
        assert_eq!(
            ops.authenticate(Some(b"bearer another-key-0123456789abcdef"), addr, now),
            Ok(UserId::from("moderator:bob")),
            "the scheme is case-insensitive"
        );
        assert_eq!(ops.authenticate(None, addr, now), Err(Denied::NoKey));
        assert_eq!(
            ops.authenticate(Some(&bearer("k3y-of-alice-0123456789abcdeF")), addr, now),
            Err(Denied::WrongKey)
        );
        assert_eq!(
            ops.authenticate(Some(format!("Basic {KEY}").as_bytes()), addr, now),
            Err(Denied::NoKey)
        );
    }

    #[test]
    fn an_address_that_keeps_guessing_is_shut_out_for_the_window_even_with_the_key() {
        let ops = operators();
        let guesser: IpAddr = "2001:db8::1".parse().expect("ip");
        let neighbour: IpAddr = "2001:db8::2".parse().expect("ip");
        let elsewhere: IpAddr = "192.0.2.7".parse().expect("ip");
        let t0 = Instant::now();
        for _ in 0..MAX_FAILURES {
            assert_eq!(
                ops.authenticate(Some(&bearer("guess-0000000000000000000")), guesser, t0),
                Err(Denied::WrongKey)
            );
        }
        assert_eq!(
            ops.authenticate(Some(&bearer(KEY)), guesser, t0),
            Err(Denied::TooManyFailures)
        );
        assert_eq!(
            ops.authenticate(Some(&bearer(KEY)), neighbour, t0),
            Err(Denied::TooManyFailures),
            "the same /64"
        );
        assert!(ops.authenticate(Some(&bearer(KEY)), elsewhere, t0).is_ok());
        let later = t0 + FAILURE_WINDOW;
        assert!(ops.authenticate(Some(&bearer(KEY)), guesser, later).is_ok());
    }

    #[test]
    fn the_memory_of_failures_is_bounded_and_fails_closed() {
        let ops = operators();
        let t0 = Instant::now();
        for i in 0..MAX_TRACKED as u32 {
            let addr = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let _ = ops.authenticate(None, addr, t0);
        }
        let new: IpAddr = "192.0.2.200".parse().expect("ip");
        assert_eq!(
            ops.authenticate(None, new, t0),
            Err(Denied::TooManyFailures)
        );
        assert!(
            ops.authenticate(Some(&bearer(KEY)), new, t0).is_ok(),
            "a right key is still let in"
        );
        // Once the window has passed, room frees.
        assert_eq!(
            ops.authenticate(None, new, t0 + FAILURE_WINDOW),
            Err(Denied::NoKey)
        );
        assert!(ops.failures.lock().expect("lock").len() <= MAX_TRACKED);
    }

    #[test]
    fn a_bad_keys_file_says_what_is_wrong() {
        for (text, says) in [
            ("", "no keys"),
            ("alice\n", "want a name and a key"),
            ("alice short\n", "shorter than 24"),
            (
                "al ice k3y-of-alice-0123456789abcdef\n",
                "want a name and a key",
            ),
            ("al/ice k3y-of-alice-0123456789abcdef\n", "a name is"),
            (
                "a k3y-of-alice-0123456789abcdef\nb k3y-of-alice-0123456789abcdef\n",
                "twice",
            ),
        ] {
            let err = Operators::parse(text).expect_err(text);
            assert!(err.contains(says), "{text:?}: {err}");
        }
    }
}
