//! Benchmarks of the state machine alone: no sockets, no serialization
//! unless named.
//!
//! Run: `cargo bench -p chat-core --bench core`

use chat_core::{Chat, Config, Context, Timestamp};
use chat_proto::{AddReaction, ClientFrame, SendMessage, ServerFrame, UserId, Uuid};
use divan::Bencher;

fn main() {
    divan::main();
}

const USERS: u64 = 10_000;

/// A chat whose history is full, so every send also evicts.
struct Warm {
    chat: Chat,
    users: Vec<UserId>,
    n: u64,
}

impl Warm {
    fn new(history: usize) -> Self {
        let mut w = Warm {
            chat: Chat::new(Config {
                history_limit: history,
                ..Config::default()
            }),
            users: (0..USERS)
                .map(|i| UserId::from(format!("user-{i:016x}")))
                .collect(),
            n: 0,
        };
        for _ in 0..history {
            w.send();
        }
        w
    }

    fn ctx(&mut self) -> Context {
        self.n += 1;
        Context {
            // Each user sends once per USERS commands, one command per ms:
            // well inside 60 a minute, so nothing is refused.
            user: self.users[(self.n % USERS) as usize].clone(),
            now: Timestamp::from_unix_millis(1_700_000_000_000 + self.n),
            message_id: Uuid::from_u128(u128::from(self.n)),
        }
    }

    fn send(&mut self) {
        let ctx = self.ctx();
        let cmd = ClientFrame::SendMessage(SendMessage {
            text: "The quick brown fox jumps over the lazy dog, again and again.".into(),
            author_name: Some("Ada".into()),
        });
        self.chat.handle(ctx, cmd).expect("accepted");
        while let Some(e) = self.chat.poll_event() {
            divan::black_box(e);
        }
    }
}

/// One accepted `send_message`, history full (so it also evicts the oldest).
/// The same cost at every history size shows no per-command work grows
/// with history.
#[divan::bench(args = [100, 10_000, 100_000])]
fn send_message(bencher: Bencher<'_, '_>, history: usize) {
    let mut w = Warm::new(history);
    bencher.bench_local(|| w.send());
}

/// One reaction toggle on a message in a full 10,000-message history. The
/// message holds about 50 reactions over 4 emojis, and the event carries a
/// clone of it.
#[divan::bench]
fn toggle_reaction(bencher: Bencher<'_, '_>) {
    let mut w = Warm::new(10_000);
    let target = w.chat.history().iter().nth(5_000).expect("held").id;
    let emojis = ["👍", "🎉", "❤️", "😀"];
    let reactors: Vec<UserId> = w.users[..50].to_vec();
    let mut i = 0usize;
    let mut now = 1_800_000_000_000;
    bencher.bench_local(|| {
        i += 1;
        now += 2_000; // each of 50 users reacts once per 100 s
        let ctx = Context {
            user: reactors[i % 50].clone(),
            now: Timestamp::from_unix_millis(now),
            message_id: Uuid::nil(),
        };
        let cmd = ClientFrame::AddReaction(AddReaction {
            message_id: target,
            emoji: emojis[i % 4].to_owned(),
        });
        w.chat.handle(ctx, cmd).expect("accepted");
        divan::black_box(w.chat.poll_event());
    });
}

/// Walking the whole 10,000-message history in order, as replay does.
#[divan::bench]
fn replay_history_walk(bencher: Bencher<'_, '_>) {
    let w = Warm::new(10_000);
    bencher.bench_local(|| {
        let mut bytes = 0;
        for m in w.chat.history().iter() {
            bytes += m.text.len();
        }
        bytes
    });
}

/// Serializing the whole 10,000-message history to frames: what a server
/// would pay per connecting client without a frame cache.
#[divan::bench(sample_count = 20)]
fn replay_history_encode(bencher: Bencher<'_, '_>) {
    let w = Warm::new(10_000);
    bencher.bench_local(|| {
        w.chat
            .history()
            .iter()
            .map(|m| ServerFrame::Message(m.clone()).encode().len())
            .sum::<usize>()
    });
}
