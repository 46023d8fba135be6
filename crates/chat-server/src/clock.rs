//! The time the server gives the chat.
//!
//! The wall clock steps: NTP corrects it, an operator sets it, a VM is
//! restored from a snapshot. A chat fed the wall clock directly would see a
//! step forwards as time passing (every rate-limit window ends early) and a
//! step backwards as time standing still. So the wall clock is read once,
//! when the server starts, and from then on time advances by the monotonic
//! clock, which never steps. A restart re-anchors to the wall clock; if
//! that is behind the newest stored message, the chat goes on from that
//! message instead (see `chat_core::Chat::restore`), so `created_at` never
//! runs backwards.

use chat_core::Timestamp;
use std::time::{Duration, Instant, SystemTime};

/// A wall-clock reading taken once, advanced by the monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    anchor: Timestamp,
    started: Instant,
}

impl Clock {
    /// The host's clock, anchored now.
    pub fn system() -> Self {
        Clock::starting_at(SystemTime::now())
    }

    /// A clock whose time is `wall` now, and advances in real time from
    /// there. Tests use it to start a server at a chosen time.
    pub fn starting_at(wall: SystemTime) -> Self {
        Clock {
            anchor: Timestamp::from(wall),
            started: Instant::now(),
        }
    }

    /// The time now.
    pub fn now(&self) -> Timestamp {
        let elapsed = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        Timestamp::from_unix_millis(self.anchor.as_millis().saturating_add(elapsed))
    }

    /// How far the newest stored time, `newest`, is ahead of this clock.
    pub fn behind(&self, newest: Timestamp) -> Option<Duration> {
        let now = self.now().as_millis();
        (newest.as_millis() > now).then(|| Duration::from_millis(newest.as_millis() - now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_starts_where_it_is_told_and_runs_in_real_time() {
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let clock = Clock::starting_at(wall);
        let first = clock.now();
        assert!(first >= Timestamp::from(wall));
        std::thread::sleep(Duration::from_millis(20));
        let later = clock.now();
        assert!(later.as_millis() >= first.as_millis() + 20);
        // Minutes, not the hours a stepped wall clock would show.
        assert!(later.as_millis() < first.as_millis() + 60_000);
        let ahead = Timestamp::from_unix_millis(later.as_millis() + 3_600_000);
        assert!(
            clock
                .behind(ahead)
                .is_some_and(|d| d > Duration::from_secs(3_500))
        );
        assert_eq!(clock.behind(first), None);
    }
}
