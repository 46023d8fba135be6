//! The `/ws` query: whether a client opted in to positions, and where it
//! asks to resume.
//!
//! - no `sync`, `since` or `epoch`: the seed protocol, exactly (other
//!   parameters are ignored, as they always were);
//! - `?sync`: the full history, then `sync` frames telling the client its
//!   position;
//! - `?since=P&epoch=E`: the events after position `P` of epoch `E`, then
//!   `sync` frames; or, if the server cannot resume there, a `reset` frame
//!   and the full history.
//!
//! Names and values are decoded as a form (`application/x-www-form-urlencoded`:
//! `%31` is `1`, `+` a space), as browsers and URL libraries encode them.
//! `sync` opts in bare, empty, `1` or `true`, and not with `0` or `false`.
//!
//! Anything else naming these parameters is refused with 400 and a reason,
//! before the upgrade: a malformed position, epoch or `sync` value, a
//! position without its epoch or the other way round, or any of them given
//! twice. A client bug then shows up as a failed connection, never as a
//! silent full replay.

use crate::publish::log::Since;
use chat_proto::{Epoch, Position, Uuid};

/// Which protocol a client asked for with its `/ws` query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// The seed protocol, exactly: the full history, and no `sync` or
    /// `reset` frames.
    Seed,
    /// Opted in to positions: `sync` frames, starting where `Since` says
    /// (from the start, or resuming).
    Positions(Since),
}

/// Reads the query of a `/ws` request.
pub(crate) fn parse(query: Option<&str>) -> Result<Protocol, &'static str> {
    let mut sync = None;
    let mut since = None;
    let mut epoch = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let value = value.as_ref();
        match key.as_ref() {
            "sync" => {
                if sync.is_some() {
                    return Err("sync is given twice");
                }
                sync = Some(match value {
                    "" | "1" | "true" => true,
                    "0" | "false" => false,
                    _ => return Err("sync must be 1 (or bare) to opt in, or 0"),
                });
            }
            "since" => {
                if since.is_some() {
                    return Err("since is given twice");
                }
                since = Some(parse_position(value)?);
            }
            "epoch" => {
                if epoch.is_some() {
                    return Err("epoch is given twice");
                }
                epoch = Some(parse_epoch(value)?);
            }
            _ => {}
        }
    }
    match (since, epoch) {
        (Some(position), Some(epoch)) => Ok(Protocol::Positions(Since::Resume { epoch, position })),
        (Some(_), None) => Err(
            "since needs the epoch it belongs to: ?since=P&epoch=E, both from the last sync frame",
        ),
        (None, Some(_)) => {
            Err("epoch needs a since position: ?since=P&epoch=E, both from the last sync frame")
        }
        (None, None) if sync == Some(true) => Ok(Protocol::Positions(Since::Start)),
        (None, None) => Ok(Protocol::Seed),
    }
}

fn parse_position(value: &str) -> Result<Position, &'static str> {
    // Plain decimal digits only: no sign, no spaces, no hex.
    if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err("since must be a position: a decimal number from a sync frame");
    }
    value
        .parse()
        .map(Position)
        .map_err(|_| "since must be a position: a decimal number from a sync frame")
}

fn parse_epoch(value: &str) -> Result<Epoch, &'static str> {
    // The hyphenated form a sync frame carries, and nothing else.
    if value.len() != 36 {
        return Err("epoch must be the epoch of a sync frame (a hyphenated UUID)");
    }
    Uuid::try_parse(value)
        .map(Epoch)
        .map_err(|_| "epoch must be the epoch of a sync frame (a hyphenated UUID)")
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: &str = "0192d7a4-5b7e-7cc1-9d3a-6c1f0e2b4a11";

    fn resume(p: u64) -> Protocol {
        Protocol::Positions(Since::Resume {
            epoch: Epoch(Uuid::try_parse(E).expect("uuid")),
            position: Position(p),
        })
    }

    #[test]
    fn queries_and_what_they_ask_for() {
        assert_eq!(parse(None), Ok(Protocol::Seed));
        assert_eq!(parse(Some("")), Ok(Protocol::Seed));
        assert_eq!(parse(Some("v=2&x")), Ok(Protocol::Seed), "others ignored");
        assert_eq!(parse(Some("sync")), Ok(Protocol::Positions(Since::Start)));
        assert_eq!(parse(Some("sync=1")), Ok(Protocol::Positions(Since::Start)));
        assert_eq!(
            parse(Some("sync=true")),
            Ok(Protocol::Positions(Since::Start))
        );
        assert_eq!(parse(Some("sync=")), Ok(Protocol::Positions(Since::Start)));
        assert_eq!(
            parse(Some("sync=0")),
            Ok(Protocol::Seed),
            "0 does not opt in"
        );
        assert_eq!(parse(Some("sync=false")), Ok(Protocol::Seed));
        // Decoded as a form, as browsers encode them.
        assert_eq!(parse(Some("s%79nc")), Ok(Protocol::Positions(Since::Start)));
        assert_eq!(
            parse(Some("sync=%31")),
            Ok(Protocol::Positions(Since::Start))
        );
        assert_eq!(parse(Some(&format!("since=%31&epoch={E}"))), Ok(resume(1)));
        assert_eq!(
            parse(Some(&format!("since=1&epoch={}", E.replace('-', "%2D")))),
            Ok(resume(1))
        );
        assert_eq!(parse(Some(&format!("since=0&epoch={E}"))), Ok(resume(0)));
        assert_eq!(
            parse(Some(&format!("epoch={E}&since=18446744073709551615&sync"))),
            Ok(resume(u64::MAX))
        );
    }

    #[test]
    fn malformed_or_half_resumes_are_refused_with_a_reason() {
        let bad = [
            "since=1".to_owned(),
            format!("epoch={E}"),
            format!("since=&epoch={E}"),
            format!("since=-1&epoch={E}"),
            format!("since=+1&epoch={E}"),
            format!("since=0x10&epoch={E}"),
            format!("since=%2B1&epoch={E}"),
            format!("since=1+&epoch={E}"),
            "sync=2".to_owned(),
            "sync=yes".to_owned(),
            "sync&sync".to_owned(),
            format!("since=18446744073709551616&epoch={E}"),
            format!("since=1&since=2&epoch={E}"),
            format!("since=1&epoch={E}&epoch={E}"),
            "since=1&epoch=nope".to_owned(),
            format!("since=1&epoch={}", E.replace('-', "")),
            format!("since=1&epoch={{{E}}}"),
        ];
        for query in bad {
            let why = parse(Some(&query)).expect_err(&query);
            assert!(
                why.contains("since") || why.contains("epoch") || why.contains("sync"),
                "{query}: {why}"
            );
        }
    }
}
