//! Open user requests: what the server knows about a request between its
//! first admission and its finish, so it can report the two signals that are
//! defined over a *user request* rather than one provider call — the failure
//! rate after all retries and fallbacks, and latency with retries included.
//!
//! A client names a request with `request_id` on CanProceed / Route /
//! RecordOutcome and closes it with FinishRequest (or `finish` on the last
//! RecordOutcome). In between, the server only needs the first time it saw
//! the id, the route it was served under and how many outcomes were
//! reported, so an entry is a few words.
//!
//! Everything here is bounded, because a careless client can name a fresh id
//! on every call and never finish any: the table holds at most
//! `max_open_requests` ids (split over shards; past it new ids are simply not
//! tracked and counted as such), and an id not finished within
//! `request_ttl` is dropped by [`Requests::sweep`] and counted as
//! `result="expired"`. A finished id is remembered for a short while so that
//! finishing it again (a retried FinishRequest) does not count twice.
//!
//! The table is per process. In cluster mode a request whose calls land on
//! different replicas is finished where its FinishRequest lands; if that
//! replica never saw it, the client's own measurement (`elapsed`,
//! `attempts`) is counted instead and the answer says `tracked = false`.

use crate::domain::time::Time;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Longest request id accepted, in bytes.
pub const MAX_REQUEST_ID: usize = 128;
/// Shards of the table: a request id's calls contend only with ids in its shard.
const SHARDS: usize = 16;
/// How long a finished id is remembered (to answer a repeated finish as a
/// duplicate), at most `request_ttl`.
const FINISHED_RETENTION: Duration = Duration::from_secs(60);
/// Most attempts a client may claim for a request the server never saw: a
/// hostile value must not be able to skew (or overflow) the attempts sum.
pub const MAX_CLIENT_ATTEMPTS: u32 = 1000;
/// The route label of a request no configured route served.
pub const DIRECT: &str = "direct";

/// How a user request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestResult {
    Completed,
    Deferred,
    Failed,
    /// Not finished within `request_ttl` (the client crashed or forgot).
    Expired,
}

impl RequestResult {
    /// The `result` label value.
    pub fn label(self) -> &'static str {
        match self {
            RequestResult::Completed => "completed",
            RequestResult::Deferred => "deferred",
            RequestResult::Failed => "failed",
            RequestResult::Expired => "expired",
        }
    }
}

/// What a finish (or an expiry) counted.
#[derive(Clone, Debug, PartialEq)]
pub struct Finished {
    /// The server saw the request start and measured it itself.
    pub tracked: bool,
    /// It had been finished before: nothing is counted again.
    pub duplicate: bool,
    pub result: RequestResult,
    pub duration: Duration,
    pub attempts: u32,
    /// The route label (a configured route's name, or [`DIRECT`]).
    pub route: Arc<str>,
    /// Duration and attempts are real measures: the server saw the
    /// request's first call, or the client sent its own. False when the
    /// first the server heard of it was an outcome (it started elsewhere):
    /// counted, but kept out of the duration and attempts histograms so a
    /// near-zero guess does not pull the p99 down.
    pub measured: bool,
}

/// The client's own measurement, counted when the server never saw the request.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClientMeasure<'a> {
    pub route: Option<&'a str>,
    pub elapsed: Duration,
    pub attempts: u32,
}

#[derive(Debug)]
struct Entry {
    started: Time,
    route: Option<Arc<str>>,
    attempts: u32,
    /// Created by a CanProceed / Route call (its start is known), not by an outcome.
    seen_start: bool,
    /// Set once finished; the entry then stays until `FINISHED_RETENTION`
    /// after `done_at` so a second finish is recognised.
    done: Option<(Time, Finished)>,
}

/// One shard: request id → what is known of it.
type Shard = Mutex<HashMap<Box<str>, Entry>>;

/// The open-request table.
#[derive(Debug)]
pub struct Requests {
    shards: Box<[Shard]>,
    per_shard: usize,
    ttl: Duration,
}

/// The result of noting a call: whether the id is (now) tracked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Noted {
    Tracked,
    /// The table is full: this id is not tracked (its finish will use the
    /// client's measurement).
    Full,
}

impl Requests {
    /// A table for at most `max_open` ids (rounded up to a multiple of the
    /// shard count), each expiring `ttl` after it was first seen.
    pub fn new(max_open: usize, ttl: Duration) -> Requests {
        Requests {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: max_open.div_ceil(SHARDS).max(1),
            ttl,
        }
    }

    fn shard(&self, id: &str) -> &Shard {
        // FNV-1a: cheap, and ids are not attacker-chosen to collide any more
        // than they could simply fill the table.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in id.as_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        &self.shards[(h % SHARDS as u64) as usize]
    }

    /// A CanProceed / Route call for `id` at `now`. The first call starts the
    /// request's clock; a Route names its route (the first one named wins).
    pub fn note_call(&self, id: &str, route: Option<&Arc<str>>, now: Time) -> Noted {
        self.touch(id, route, now, true, |_| {})
    }

    /// A RecordOutcome for `id`: one more attempt (starting the request if
    /// this is the first the server hears of it).
    pub fn note_outcome(&self, id: &str, now: Time) -> Noted {
        self.touch(id, None, now, false, |e| {
            if e.done.is_none() {
                e.attempts = e.attempts.saturating_add(1);
            }
        })
    }

    /// Finds or starts `id`'s entry (one lock) and applies `f` to it.
    fn touch(
        &self,
        id: &str,
        route: Option<&Arc<str>>,
        now: Time,
        call: bool,
        f: impl FnOnce(&mut Entry),
    ) -> Noted {
        let Ok(mut map) = self.shard(id).lock() else {
            return Noted::Full;
        };
        if let Some(e) = map.get_mut(id) {
            if e.route.is_none() {
                e.route = route.cloned();
            }
            f(e);
            return Noted::Tracked;
        }
        if map.len() >= self.per_shard {
            return Noted::Full;
        }
        let mut e = Entry {
            started: now,
            route: route.cloned(),
            attempts: 0,
            seen_start: call,
            done: None,
        };
        f(&mut e);
        map.insert(id.into(), e);
        Noted::Tracked
    }

    /// Closes `id` with `result` at `now`. `known_route` says whether a name
    /// is a configured route (labels must stay bounded).
    pub fn finish(
        &self,
        id: &str,
        result: RequestResult,
        client: ClientMeasure<'_>,
        now: Time,
        known_route: impl Fn(&str) -> Option<Arc<str>>,
    ) -> Finished {
        let direct = || -> Arc<str> { DIRECT.into() };
        if let Ok(mut map) = self.shard(id).lock()
            && let Some(e) = map.get_mut(id)
        {
            if let Some((_, f)) = &e.done {
                return Finished {
                    duplicate: true,
                    ..f.clone()
                };
            }
            let f = Finished {
                tracked: true,
                duplicate: false,
                result,
                duration: now.since(e.started),
                attempts: e.attempts,
                route: e.route.clone().unwrap_or_else(direct),
                measured: e.seen_start,
            };
            e.done = Some((now, f.clone()));
            return f;
        }
        // The client's own measure, bounded: a request older than the TTL
        // would have expired here, and no request makes a thousand calls.
        Finished {
            tracked: false,
            duplicate: false,
            result,
            duration: client.elapsed.min(self.ttl),
            attempts: client.attempts.min(MAX_CLIENT_ATTEMPTS),
            measured: !client.elapsed.is_zero() || client.attempts > 0,
            route: client.route.and_then(known_route).unwrap_or_else(direct),
        }
    }

    /// Drops ids past their time at `now`: unfinished ones older than the
    /// TTL are returned (to be counted as expired); finished ones are
    /// forgotten after a short retention.
    pub fn sweep(&self, now: Time) -> Vec<Finished> {
        let keep_done = FINISHED_RETENTION.min(self.ttl);
        let mut expired = Vec::new();
        for shard in self.shards.iter() {
            let Ok(mut map) = shard.lock() else { continue };
            map.retain(|_, e| match &e.done {
                Some((at, _)) => now.since(*at) < keep_done,
                None if now.since(e.started) >= self.ttl => {
                    expired.push(Finished {
                        tracked: true,
                        duplicate: false,
                        result: RequestResult::Expired,
                        duration: now.since(e.started),
                        attempts: e.attempts,
                        route: e.route.clone().unwrap_or_else(|| DIRECT.into()),
                        measured: e.seen_start,
                    });
                    false
                }
                None => true,
            });
        }
        expired
    }

    /// Ids held now (open and recently finished).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|m| m.len()).unwrap_or(0))
            .sum()
    }

    /// Whether no id is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> Time {
        Time::from_millis(1_000_000 + ms)
    }

    fn chat(name: &str) -> Option<Arc<str>> {
        (name == "chat").then(|| Arc::from("chat"))
    }

    #[test]
    fn a_request_is_measured_from_its_first_call_to_its_finish() {
        let r = Requests::new(100, Duration::from_secs(600));
        let route: Arc<str> = "chat".into();
        assert_eq!(r.note_call("a", Some(&route), t(0)), Noted::Tracked);
        r.note_outcome("a", t(2_000));
        r.note_call("a", None, t(3_000));
        r.note_outcome("a", t(5_500));
        let f = r.finish(
            "a",
            RequestResult::Completed,
            ClientMeasure::default(),
            t(5_500),
            chat,
        );
        assert!(f.tracked && !f.duplicate);
        assert_eq!(f.duration, Duration::from_millis(5_500));
        assert_eq!(f.attempts, 2);
        assert_eq!(&*f.route, "chat");
    }

    #[test]
    fn a_request_first_heard_of_by_its_outcome_is_counted_but_not_measured() {
        let r = Requests::new(100, Duration::from_secs(600));
        // Started on another replica: this one only sees the last outcome.
        r.note_outcome("elsewhere", t(5_000));
        let f = r.finish(
            "elsewhere",
            RequestResult::Completed,
            ClientMeasure::default(),
            t(5_000),
            chat,
        );
        assert!(f.tracked && !f.measured, "{f:?}");
        r.note_call("here", None, t(0));
        let g = r.finish(
            "here",
            RequestResult::Completed,
            ClientMeasure::default(),
            t(10),
            chat,
        );
        assert!(g.measured);
        let none = r.finish(
            "never",
            RequestResult::Failed,
            ClientMeasure::default(),
            t(0),
            chat,
        );
        assert!(
            !none.tracked && !none.measured,
            "no measure at all: not measured"
        );
    }

    #[test]
    fn finishing_twice_counts_once_and_repeats_the_first_answer() {
        let r = Requests::new(100, Duration::from_secs(600));
        r.note_call("a", None, t(0));
        let first = r.finish(
            "a",
            RequestResult::Failed,
            ClientMeasure::default(),
            t(100),
            chat,
        );
        let again = r.finish(
            "a",
            RequestResult::Completed,
            ClientMeasure::default(),
            t(900),
            chat,
        );
        assert!(!first.duplicate && again.duplicate);
        assert_eq!(again.result, RequestResult::Failed);
        assert_eq!(again.duration, Duration::from_millis(100));
    }

    #[test]
    fn an_unknown_request_is_counted_with_the_clients_measure_and_a_bounded_label() {
        let r = Requests::new(100, Duration::from_secs(600));
        let m = |route| ClientMeasure {
            route: Some(route),
            elapsed: Duration::from_secs(3),
            attempts: 2,
        };
        let f = r.finish("x", RequestResult::Completed, m("chat"), t(0), chat);
        assert!(!f.tracked);
        assert_eq!((f.duration, f.attempts), (Duration::from_secs(3), 2));
        assert_eq!(&*f.route, "chat");
        let g = r.finish("y", RequestResult::Completed, m("made-up"), t(0), chat);
        assert_eq!(
            &*g.route, DIRECT,
            "an unconfigured name never becomes a label"
        );
        let absurd = ClientMeasure {
            route: None,
            elapsed: Duration::MAX,
            attempts: u32::MAX,
        };
        let h = r.finish("z", RequestResult::Failed, absurd, t(0), chat);
        assert_eq!(h.duration, Duration::from_secs(600), "clamped to the TTL");
        assert_eq!(h.attempts, MAX_CLIENT_ATTEMPTS);
    }

    #[test]
    fn the_table_is_bounded_and_a_full_table_tracks_no_new_ids() {
        let r = Requests::new(16, Duration::from_secs(600));
        let mut full = 0;
        for i in 0..1000 {
            if r.note_call(&format!("id-{i}"), None, t(0)) == Noted::Full {
                full += 1;
            }
        }
        assert!(r.len() <= 16 + SHARDS, "held {}", r.len());
        assert!(full >= 1000 - 16 - SHARDS);
        // Known ids keep working while full.
        let held = (0..1000)
            .map(|i| format!("id-{i}"))
            .find(|id| {
                r.finish(
                    id,
                    RequestResult::Completed,
                    ClientMeasure::default(),
                    t(10),
                    chat,
                )
                .tracked
            })
            .is_some();
        assert!(held);
    }

    #[test]
    fn unfinished_requests_expire_after_the_ttl_and_finished_ones_are_forgotten() {
        let r = Requests::new(100, Duration::from_secs(600));
        r.note_call("open", None, t(0));
        r.note_outcome("open", t(1));
        r.note_call("done", None, t(0));
        r.finish(
            "done",
            RequestResult::Completed,
            ClientMeasure::default(),
            t(10),
            chat,
        );
        assert!(r.sweep(t(59_000)).is_empty());
        assert_eq!(r.len(), 2);
        assert!(
            r.sweep(t(70_011)).is_empty(),
            "finished: dropped, not counted"
        );
        assert_eq!(r.len(), 1);
        assert!(r.sweep(t(599_999)).is_empty());
        let gone = r.sweep(t(600_000));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].result, RequestResult::Expired);
        assert_eq!(gone[0].attempts, 1);
        assert!(r.is_empty());
        // Finishing an expired id later counts it with the client's measure.
        let late = r.finish(
            "open",
            RequestResult::Completed,
            ClientMeasure::default(),
            t(600_001),
            chat,
        );
        assert!(!late.tracked);
    }
}
