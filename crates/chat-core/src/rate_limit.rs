//! An exact sliding-window rate limiter.
//!
//! Each user keeps the times of their last `max` accepted actions. An action
//! at `now` is allowed while fewer than `max` of them lie in
//! `(now - window, now]`, so no half-open window of that length ever holds
//! more than `max` accepted actions. Token buckets and GCRA (e.g. governor's
//! `per_minute(60)`) let a full burst through at the start of a minute and
//! then refill, which admits up to `2 * max - 1` in the first minute; that is
//! not the rule users are promised.
//!
//! Memory: `max` timestamps per user who acted in the last two windows.
//! Users whose newest action has left the window are swept out once per
//! window, so the map does not grow with every user ever seen.

use crate::Timestamp;
use chat_proto::{FixedState, UserId};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// How many actions a user may take per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Actions allowed in any window.
    pub max: u32,
    /// The window's length.
    pub window: Duration,
}

impl RateLimit {
    /// `max` actions per minute.
    pub const fn per_minute(max: u32) -> Self {
        RateLimit {
            max,
            window: Duration::from_secs(60),
        }
    }

    pub(crate) fn window_ms(&self) -> u64 {
        u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX)
    }
}

/// What one rate limiter (messages, or reactions) remembers, as plain data (see
/// [`ChatSnapshot`](crate::ChatSnapshot)).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimiterSnapshot {
    /// Each user's accepted actions still remembered, in ms, oldest first;
    /// users in order of id.
    pub users: Vec<(UserId, Vec<u64>)>,
    /// When idle users are next swept out, in ms.
    pub next_sweep_ms: u64,
}

/// Tracks each user's accepted actions against one [`RateLimit`].
#[derive(Debug, Clone)]
pub(crate) struct RateLimiter {
    limit: RateLimit,
    window_ms: u64,
    users: HashMap<UserId, VecDeque<u64>, FixedState>,
    next_sweep_ms: u64,
}

impl RateLimiter {
    /// A limiter with no history.
    pub(crate) fn new(limit: RateLimit) -> Self {
        RateLimiter {
            limit,
            window_ms: limit.window_ms(),
            users: HashMap::default(),
            next_sweep_ms: 0,
        }
    }

    /// Whether `user` may act at `now`. Does not count the action.
    ///
    /// O(1): the stored times are in order (the core never lets time run
    /// backwards) and at most `max` are kept, so only the oldest one decides.
    pub(crate) fn check(&self, user: &UserId, now: Timestamp) -> bool {
        let max = self.limit.max as usize;
        match self.users.get(user) {
            None => max > 0,
            Some(times) if times.len() < max => true,
            Some(times) => times.front().is_some_and(|&t| !self.in_window(t, now)),
        }
    }

    /// The time before which every action of `user` is refused, however
    /// many more are accepted first: `Some` once the user has used up the
    /// allowance (at a later time, or after more accepted actions, the
    /// answer is the same or later), `None` while they have some left.
    /// `check(user, now)` is `false` exactly when `now` is before it.
    pub(crate) fn refused_until(&self, user: &UserId) -> Option<Timestamp> {
        let max = self.limit.max as usize;
        if max == 0 {
            return Some(Timestamp(u64::MAX));
        }
        let times = self.users.get(user)?;
        if times.len() < max {
            return None;
        }
        times
            .front()
            .map(|&t| Timestamp(t.saturating_add(self.window_ms)))
    }

    /// Counts an accepted action by `user` at `now`.
    ///
    /// Call only after [`check`](Self::check) allowed it; refused attempts
    /// are never recorded, so they do not use up the allowance.
    pub(crate) fn record(&mut self, user: &UserId, now: Timestamp) {
        let now_ms = now.as_millis();
        if now_ms >= self.next_sweep_ms {
            self.sweep(now);
        }
        let max = self.limit.max as usize;
        let times = match self.users.get_mut(user) {
            Some(times) => times,
            None => self
                .users
                .entry(user.clone())
                .or_insert_with(|| VecDeque::with_capacity(max.min(64))),
        };
        // Only the newest `max` times can ever decide a check.
        while times.len() >= max.max(1) {
            times.pop_front();
        }
        times.push_back(now_ms);
    }

    /// How many users the limiter currently remembers.
    pub(crate) fn tracked_users(&self) -> usize {
        self.users.len()
    }

    /// What the limiter remembers, as data, users in a fixed order.
    pub(crate) fn snapshot(&self) -> LimiterSnapshot {
        let mut users: Vec<(UserId, Vec<u64>)> = self
            .users
            .iter()
            .map(|(user, times)| (user.clone(), times.iter().copied().collect()))
            .collect();
        users.sort_by(|a, b| a.0.cmp(&b.0));
        LimiterSnapshot {
            users,
            next_sweep_ms: self.next_sweep_ms,
        }
    }

    /// A limiter for `limit` that remembers what `snapshot` says.
    pub(crate) fn from_snapshot(limit: RateLimit, snapshot: LimiterSnapshot) -> Self {
        let mut limiter = RateLimiter::new(limit);
        limiter.next_sweep_ms = snapshot.next_sweep_ms;
        limiter.users = snapshot
            .users
            .into_iter()
            .map(|(user, times)| (user, times.into_iter().collect()))
            .collect();
        limiter
    }

    fn in_window(&self, t: u64, now: Timestamp) -> bool {
        now.as_millis().saturating_sub(t) < self.window_ms
    }

    fn sweep(&mut self, now: Timestamp) {
        let window_ms = self.window_ms;
        let now_ms = now.as_millis();
        self.users.retain(|_, times| {
            times
                .back()
                .is_some_and(|&t| now_ms.saturating_sub(t) < window_ms)
        });
        self.next_sweep_ms = now_ms.saturating_add(window_ms.max(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_unix_millis(ms)
    }

    fn take(l: &mut RateLimiter, u: &UserId, ms: u64) -> bool {
        let ok = l.check(u, at(ms));
        if ok {
            l.record(u, at(ms));
        }
        ok
    }

    #[test]
    fn sixty_then_refused_until_the_first_leaves_the_window() {
        let mut l = RateLimiter::new(RateLimit::per_minute(60));
        let u = UserId::from("u");
        for i in 0..60 {
            assert!(take(&mut l, &u, 1_000 + i), "message {}", i + 1);
        }
        assert!(!take(&mut l, &u, 1_060), "61st inside the window");
        assert!(!take(&mut l, &u, 60_999), "1 ms before the first expires");
        assert!(take(&mut l, &u, 61_000), "the first has left the window");
        assert!(!take(&mut l, &u, 61_000), "only one slot came free");
        assert!(take(&mut l, &u, 61_001), "the second has left");
    }

    #[test]
    fn no_burst_across_a_minute_boundary() {
        // governor-style buckets admit ~2x at the start; this must not.
        let mut l = RateLimiter::new(RateLimit::per_minute(60));
        let u = UserId::from("u");
        let mut accepted = 0;
        for ms in (0..120_000).step_by(100) {
            if take(&mut l, &u, ms) {
                accepted += 1;
            }
        }
        assert_eq!(accepted, 120, "two windows allow exactly 2 * 60");
        let mut l = RateLimiter::new(RateLimit::per_minute(60));
        let accepted = (0..60_000)
            .step_by(10)
            .filter(|&ms| take(&mut l, &u, ms))
            .count();
        assert_eq!(accepted, 60, "one window allows exactly 60");
    }

    #[test]
    fn refused_until_says_exactly_when_check_refuses() {
        let mut l = RateLimiter::new(RateLimit::per_minute(3));
        let u = UserId::from("u");
        for ms in [0, 10_000, 20_000] {
            assert_eq!(l.refused_until(&u), None);
            assert!(take(&mut l, &u, ms));
        }
        assert_eq!(l.refused_until(&u), Some(at(60_000)));
        for ms in [20_000, 59_999, 60_000, 60_001] {
            assert_eq!(
                l.check(&u, at(ms)),
                l.refused_until(&u).is_none_or(|t| at(ms) >= t),
                "at {ms}"
            );
        }
        assert!(take(&mut l, &u, 60_000));
        assert_eq!(
            l.refused_until(&u),
            Some(at(70_000)),
            "later, never earlier"
        );
        let none = RateLimiter::new(RateLimit::per_minute(0));
        assert_eq!(none.refused_until(&u), Some(at(u64::MAX)));
    }

    #[test]
    fn users_are_independent() {
        let mut l = RateLimiter::new(RateLimit::per_minute(1));
        assert!(take(&mut l, &UserId::from("a"), 0));
        assert!(take(&mut l, &UserId::from("b"), 0));
        assert!(!take(&mut l, &UserId::from("a"), 1));
    }

    #[test]
    fn idle_users_are_forgotten() {
        let mut l = RateLimiter::new(RateLimit::per_minute(5));
        for i in 0..1_000 {
            take(&mut l, &UserId::from(format!("u{i}").as_str()), 0);
        }
        assert_eq!(l.tracked_users(), 1_000);
        // Two windows later one more action sweeps the idle ones out.
        take(&mut l, &UserId::from("late"), 120_000);
        assert_eq!(l.tracked_users(), 1);
    }

    #[test]
    fn zero_allows_nothing() {
        let mut l = RateLimiter::new(RateLimit::per_minute(0));
        assert!(!take(&mut l, &UserId::from("u"), 0));
    }
}
