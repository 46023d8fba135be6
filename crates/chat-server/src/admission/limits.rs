//! Places per client address, for the two per-address limits:
//!
//! - `--max-connections-per-ip`: WebSocket connections open per address
//!   (a place is held from admission until the connection closes);
//! - `--max-pending-per-ip`: connections per TCP peer still in their
//!   request phase.
//!
//! Both are [`AddressLimits`]; only the second lets places go idle. For it,
//! a connection holds a place from accept until its WebSocket handshake
//! completes or its plain HTTP exchange ends, so one address cannot fill
//! every `--max-connections` slot with sockets that never say what they
//! want. A keep-alive HTTP connection waiting for its next request is the
//! exception that makes this livable behind a NAT: it has been served and
//! is only being kept for reuse, so when a new connection from the same
//! address finds the address full, the longest-idle such connection is
//! told to close and the newcomer takes its place. Closing an idle
//! keep-alive connection is always allowed in HTTP; browsers open another.
//! Connections that have not yet had an answer are never evicted, so silent
//! sockets still meet the limit.

use super::identity::AddrKey;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// At most so many places per address (an IPv6 /64 is one address).
#[derive(Debug)]
pub(crate) struct AddressLimits {
    max: usize,
    addresses: Mutex<HashMap<AddrKey, Places>>,
    /// The next slot's id; ids only tell idle entries apart, and are never
    /// reused, so a slot cannot mistake another's entry for its own.
    next_id: AtomicU64,
}

/// One address's places.
#[derive(Debug, Default)]
struct Places {
    /// Places taken, idle connections included.
    taken: usize,
    /// Connections idle between keep-alive requests, longest idle first:
    /// each one's id and the token that tells it to close.
    idle: VecDeque<(u64, CancellationToken)>,
}

/// Every place of the address is taken (by connections that are not idle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full;

/// A connection's place. Dropping it frees the place, unless a newcomer
/// took it over.
#[derive(Debug)]
pub(crate) struct AddressSlot {
    limits: Arc<AddressLimits>,
    key: AddrKey,
    id: u64,
    /// Made when the connection first goes idle: a WebSocket never does,
    /// and holds none.
    evicted: std::sync::OnceLock<CancellationToken>,
}

impl AddressLimits {
    /// At most `max` places per address.
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(AddressLimits {
            max,
            addresses: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<AddrKey, Places>> {
        self.addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a place for a new connection from `ip`: a free one, or the
    /// place of the address's longest-idle keep-alive connection (which is
    /// told to close). Refuses when every place is held by a connection
    /// that is not idle.
    pub(crate) fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<AddressSlot, Full> {
        let key = AddrKey::from(ip);
        let mut addresses = self.lock();
        let places = addresses.entry(key).or_default();
        if places.taken < self.max {
            places.taken += 1;
        } else if let Some((_, evict)) = places.idle.pop_front() {
            // The place passes from the idle connection to the newcomer:
            // `taken` stays, and the evicted slot's drop will not free it.
            evict.cancel();
        } else {
            if places.taken == 0 {
                addresses.remove(&key);
            }
            return Err(Full);
        }
        Ok(AddressSlot {
            limits: Arc::clone(self),
            key,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            evicted: std::sync::OnceLock::new(),
        })
    }

    /// How many addresses hold places.
    #[cfg(test)]
    pub(crate) fn addresses(&self) -> usize {
        self.lock().len()
    }
}

impl AddressSlot {
    fn token(&self) -> &CancellationToken {
        self.evicted.get_or_init(CancellationToken::new)
    }

    fn is_evicted(&self) -> bool {
        self.evicted
            .get()
            .is_some_and(CancellationToken::is_cancelled)
    }

    /// The connection has answered a request and now waits for the next
    /// one on a kept-alive connection: a newcomer from the same address
    /// may take its place, which [`evicted`](Self::evicted) then reports.
    pub(crate) fn idle(&self) {
        let mut addresses = self.limits.lock();
        if let Some(places) = addresses.get_mut(&self.key)
            && !self.is_evicted()
            && !places.idle.iter().any(|(id, _)| *id == self.id)
        {
            places.idle.push_back((self.id, self.token().clone()));
        }
    }

    /// A request has arrived: the connection is busy again and keeps its
    /// place. False if a newcomer took the place first; the connection
    /// must then close without answering (a client resends a request that
    /// got no answer on a reused connection).
    pub(crate) fn busy(&self) -> bool {
        let mut addresses = self.limits.lock();
        if self.is_evicted() {
            return false;
        }
        if let Some(places) = addresses.get_mut(&self.key) {
            places.idle.retain(|(id, _)| *id != self.id);
        }
        true
    }

    /// Resolves when a newcomer has taken this connection's place.
    pub(crate) fn evicted(&self) -> WaitForCancellationFuture<'_> {
        self.token().cancelled()
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut addresses = self.limits.lock();
        let Some(places) = addresses.get_mut(&self.key) else {
            return;
        };
        // Checked under the lock that eviction takes, so a place is freed
        // exactly once: by its holder, or passed on by eviction.
        if self.is_evicted() {
            return;
        }
        places.idle.retain(|(id, _)| *id != self.id);
        places.taken -= 1;
        if places.taken == 0 {
            addresses.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn fired(future: impl Future<Output = ()>) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        pin!(future).poll(&mut cx) == Poll::Ready(())
    }

    #[test]
    fn address_limits_count_and_release() {
        let limits = AddressLimits::new(2);
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let s1 = limits.acquire(a).expect("1");
        let s2 = limits.acquire(a).expect("2");
        assert_eq!(limits.acquire(a).expect_err("3"), Full);
        // Same /64 is the same address.
        let v6a: IpAddr = "2001:db8::1".parse().expect("ip");
        let v6b: IpAddr = "2001:db8::2".parse().expect("ip");
        let _x = limits.acquire(v6a).expect("v6 1");
        let _y = limits.acquire(v6b).expect("v6 2");
        assert!(limits.acquire(v6a).is_err());
        drop(s1);
        let _s3 = limits.acquire(a).expect("freed");
        drop(s2);
        drop(_s3);
        assert_eq!(limits.addresses(), 1, "empty entries are removed");
    }

    #[test]
    fn busy_connections_meet_the_limit() {
        let limits = AddressLimits::new(2);
        let a = limits.acquire(ip("192.0.2.1")).expect("first");
        let _b = limits.acquire(ip("192.0.2.1")).expect("second");
        assert_eq!(limits.acquire(ip("192.0.2.1")).err(), Some(Full));
        let _other = limits.acquire(ip("192.0.2.2")).expect("another address");
        drop(a);
        let _c = limits.acquire(ip("192.0.2.1")).expect("a freed place");
    }

    #[test]
    fn a_newcomer_takes_the_longest_idle_place() {
        let limits = AddressLimits::new(2);
        let first = limits.acquire(ip("192.0.2.1")).expect("first");
        let second = limits.acquire(ip("192.0.2.1")).expect("second");
        second.idle();
        first.idle();
        let newcomer = limits
            .acquire(ip("192.0.2.1"))
            .expect("takes an idle place");
        assert!(fired(second.evicted()), "the longest idle goes");
        assert!(!second.busy(), "and may not serve another request");
        assert!(!fired(first.evicted()));
        // The evicted connection's place is the newcomer's now.
        drop(second);
        let _next = limits.acquire(ip("192.0.2.1")).expect("first's idle place");
        assert!(fired(first.evicted()));
        assert_eq!(
            limits.acquire(ip("192.0.2.1")).err(),
            Some(Full),
            "no idle place left"
        );
        drop(newcomer);
        let _again = limits.acquire(ip("192.0.2.1")).expect("a freed place");
    }

    #[test]
    fn a_busy_connection_is_not_evicted() {
        let limits = AddressLimits::new(1);
        let only = limits.acquire(ip("192.0.2.1")).expect("only");
        only.idle();
        only.idle();
        assert!(only.busy(), "a request came in first");
        assert!(limits.acquire(ip("192.0.2.1")).is_err());
        assert!(!fired(only.evicted()));
    }

    #[test]
    fn every_place_is_freed_exactly_once() {
        let limits = AddressLimits::new(2);
        let mut held: Vec<AddressSlot> = Vec::new();
        for round in 0..60 {
            let slot = match limits.acquire(ip("2001:db8::1")) {
                Ok(slot) => slot,
                Err(_) => {
                    // Both places busy: the older connection finishes.
                    held.remove(0);
                    limits.acquire(ip("2001:db8::1")).expect("a freed place")
                }
            };
            if round % 3 != 0 {
                slot.idle();
            }
            held.push(slot);
            // Evicted connections close.
            held.retain(|s| !fired(s.evicted()));
            assert!(held.len() <= 2, "never more than the limit");
        }
        drop(held);
        assert_eq!(limits.addresses(), 0, "nothing left behind");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Acquire(u8),
        Idle(usize),
        Busy(usize),
        Drop(usize),
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum State {
        Busy,
        /// Idle since this step.
        Idle(usize),
        Evicted,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (0u8..2).prop_map(Op::Acquire),
            2 => any::<usize>().prop_map(Op::Idle),
            1 => any::<usize>().prop_map(Op::Busy),
            2 => any::<usize>().prop_map(Op::Drop),
        ]
    }

    proptest::proptest! {
        /// Against a model: an address never has more than `max` places
        /// held by connections that were not evicted; a newcomer is refused
        /// only when every place is held by a busy connection, and
        /// otherwise evicts the longest idle; every place is freed once.
        #[test]
        fn places_follow_the_model(ops in proptest::collection::vec(op(), 1..200)) {
            const MAX: usize = 3;
            let limits = AddressLimits::new(MAX);
            let addrs = [ip("192.0.2.1"), ip("2001:db8::1")];
            let mut live: Vec<(u8, AddressSlot, State)> = Vec::new();
            for (step, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Acquire(a) => {
                        let holding = |live: &Vec<(u8, AddressSlot, State)>| {
                            live.iter().filter(|(x, _, s)| *x == a && *s != State::Evicted).count()
                        };
                        let longest_idle = live
                            .iter()
                            .enumerate()
                            .filter_map(|(i, (x, _, s))| match s {
                                State::Idle(since) if *x == a => Some((*since, i)),
                                _ => None,
                            })
                            .min()
                            .map(|(_, i)| i);
                        let full = holding(&live) >= MAX;
                        match limits.acquire(addrs[a as usize]) {
                            Ok(slot) => {
                                if full {
                                    let victim = longest_idle.expect("evicts only an idle connection");
                                    proptest::prop_assert!(fired(live[victim].1.evicted()));
                                    live[victim].2 = State::Evicted;
                                }
                                live.push((a, slot, State::Busy));
                            }
                            Err(refusal) => {
                                proptest::prop_assert_eq!(refusal, Full);
                                proptest::prop_assert!(full && longest_idle.is_none(), "refused with room");
                            }
                        }
                        proptest::prop_assert!(holding(&live) <= MAX);
                    }
                    Op::Idle(i) if !live.is_empty() => {
                        let i = i % live.len();
                        live[i].1.idle();
                        if live[i].2 == State::Busy {
                            live[i].2 = State::Idle(step);
                        }
                    }
                    Op::Busy(i) if !live.is_empty() => {
                        let i = i % live.len();
                        let evicted = live[i].2 == State::Evicted;
                        proptest::prop_assert_eq!(live[i].1.busy(), !evicted);
                        if !evicted {
                            live[i].2 = State::Busy;
                        }
                    }
                    Op::Drop(i) if !live.is_empty() => {
                        live.swap_remove(i % live.len());
                    }
                    _ => {}
                }
                for (_, slot, state) in &live {
                    proptest::prop_assert_eq!(fired(slot.evicted()), *state == State::Evicted);
                }
            }
            drop(live);
            proptest::prop_assert_eq!(limits.addresses(), 0, "nothing left behind");
        }
    }
}
