//! Fuzz properties: one function per parser that takes outside input.
//!
//! Each function takes arbitrary bytes and **asserts a property**, not only
//! "does not panic": a permit verifies only if it is exactly one we signed; a
//! header can never ask for a pause past `max_pause`; a duration that parses
//! formats back to itself; a rejected config always says where; a stored
//! record decodes to a state that encodes and decodes to the same state; a
//! request message that decodes passes validation or gets an error, never a
//! panic.
//!
//! They are driven two ways. `fuzz/` holds `cargo fuzz` targets (nightly, see
//! `fuzz/README.md`) that call these functions; `tests/fuzz_corpora.rs` replays
//! every committed corpus file and [`seeds`] through the same functions on
//! the stable toolchain, so CI guards what fuzzing found without nightly.
//! Not part of the API (hidden from the docs).

use crate::config::{Config, TargetSettings};
use crate::domain::Time;
use crate::domain::duration::{format_duration, parse_duration};
use crate::domain::headers::parse_headers;
use crate::domain::unit::codec::{self, TargetRecord};
use crate::domain::unit::{Permit, UnitCx, name_hash, tag};
use crate::engine::permit::{MAX_PERMIT_LEN, PermitKey};
use std::time::Duration;

/// A property over arbitrary bytes (panics when it does not hold).
pub type Property = fn(&[u8]);

/// The fuzz targets, by name (the `fuzz/fuzz_targets/<name>.rs` files and
/// the `fuzz/corpus/<name>/` directories).
pub const TARGETS: &[(&str, Property)] = &[
    ("permit", permit),
    ("headers", headers),
    ("duration", duration),
    ("config", config),
    ("target_record", target_record),
    ("requests", requests),
    ("script_replies", script_replies),
];

const KEY: &[u8] = b"fuzzing-key-fuzzing-key-fuzzing-key!";
const TARGET: &str = "fuzz/target";
const T0: Time = Time::from_secs(1_800_000_000);

fn u64_at(data: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    for (k, x) in b.iter_mut().enumerate() {
        *x = data.get(i * 8 + k).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

/// A permit built from the bytes (for the round trip).
fn permit_from(data: &[u8]) -> Permit {
    Permit {
        id: u64_at(data, 0),
        generation: u64_at(data, 1),
        probe: u64_at(data, 2),
        leased: u64_at(data, 3) & 1 == 1,
        slot: (u64_at(data, 3) >> 8) as u8,
        reserved_tokens: u64_at(data, 4),
        reserved_spend: u64_at(data, 7) & 0xffff_ffff,
        // Scopes are written only with money reserved.
        scopes: if u64_at(data, 7) & 0xffff_ffff == 0 {
            [0; 3]
        } else {
            let s = u64_at(data, 8);
            [(s as u32).max(1), (s >> 32) as u32, 0]
        },
        issued_ms: u64_at(data, 5),
        expires_ms: u64_at(data, 6),
        tag: tag(name_hash(TARGET)),
    }
}

/// Permits: (1) any text verifies only if it is byte for byte what we would
/// sign for the permit it parses to (so no edit of a signed permit, and no
/// made-up one, verifies); (2) every permit we sign verifies to itself, and
/// not for another target.
pub fn permit(data: &[u8]) {
    let key = PermitKey::new(KEY);
    let t = tag(name_hash(TARGET));
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(p) = key.verify(TARGET, t, s)
    {
        assert_eq!(key.sign(TARGET, &p), s, "a permit we did not sign verified");
    }
    let p = permit_from(data);
    let signed = key.sign(TARGET, &p);
    assert!(signed.len() <= MAX_PERMIT_LEN);
    assert_eq!(key.verify(TARGET, t, &signed), Ok(p), "round trip");
    let other = "fuzz/other";
    assert!(
        key.verify(other, tag(name_hash(other)), &signed).is_err(),
        "verified for another target"
    );
}

/// Provider headers: lines of `name: value`. Whatever they say, no delay
/// exceeds `max_pause`, and parsing is order-independent for the pause.
pub fn headers(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let pairs: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    let max_pause = Duration::from_secs(300);
    let s = parse_headers(pairs.iter().copied(), T0, max_pause);
    assert!(s.retry_after.is_none_or(|d| d <= max_pause), "{s:?}");
    for l in &s.limits {
        assert!(l.reset_after.is_none_or(|d| d <= max_pause), "{s:?}");
    }
    assert!(s.pause().is_none_or(|d| d <= max_pause));
    let reversed = parse_headers(pairs.iter().rev().copied(), T0, max_pause);
    assert_eq!(
        s.pause(),
        reversed.pause(),
        "the order of headers changed the pause"
    );
}

/// Durations: one that parses formats back to text that parses to itself.
pub fn duration(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = parse_duration(text) {
        let again = format_duration(d);
        assert_eq!(parse_duration(&again), Ok(d), "{text:?} -> {again:?}");
    }
}

/// Config text: valid, or rejected with at least one error located inside
/// the text (line and column within it).
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Err(e) = Config::parse(&text, "fuzz.toml") {
        let located = e.located();
        assert!(!located.is_empty(), "rejected without a located error");
        let lines = text.split('\n').count();
        for (line, col, msg) in located {
            assert!(
                line >= 1 && line <= lines.max(1),
                "line {line} of {lines}: {msg}"
            );
            assert!(col >= 1, "column {col}: {msg}");
            assert!(!msg.is_empty());
        }
    }
}

/// A stored target record (the store file is outside input too: disks get
/// damaged): it decodes to a state whose encoding is stable.
pub fn target_record(data: &[u8]) {
    use prost::Message as _;
    let Ok(rec) = TargetRecord::decode(data) else {
        return;
    };
    let settings = TargetSettings::default();
    let cx = UnitCx {
        settings: &settings,
        seed: name_hash(TARGET),
    };
    let st = codec::decode(&cx, &rec, 1);
    let once = codec::encode(&cx, &st);
    let twice = codec::encode(&cx, &codec::decode(&cx, &once, 1));
    assert_eq!(once, twice, "decode/encode is not stable");
}

/// Request messages as they arrive on the wire: the first byte picks the
/// message type; decoding and the engine's validation never panic, and a
/// message that decodes re-encodes to something that decodes to itself.
pub fn requests(data: &[u8]) {
    use crate::proto;
    use prost::Message;
    fn check<M: Message + Default + PartialEq + std::fmt::Debug>(b: &[u8]) -> Option<M> {
        let m = M::decode(b).ok()?;
        let again = M::decode(m.encode_to_vec().as_slice()).expect("re-encoded message decodes");
        assert_eq!(m, again);
        Some(m)
    }
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 6 {
        0 => {
            if let Some(m) = check::<proto::CanProceedRequest>(body) {
                let _ = crate::engine::validate_target(&m.target);
            }
        }
        1 => {
            if let Some(m) = check::<proto::RecordOutcomeRequest>(body) {
                let _ = crate::engine::validate_target(&m.target);
                let _ = crate::wire::from_proto_duration(m.latency, "latency");
                let _ = crate::wire::from_proto_duration(m.retry_after, "retry_after");
            }
        }
        2 => {
            let _ = check::<proto::RouteRequest>(body);
        }
        3 => {
            let _ = check::<proto::DeferRequest>(body);
        }
        4 => {
            if let Some(m) = check::<proto::DecideRequest>(body) {
                let _ = crate::wire::from_proto_duration(m.deadline, "deadline");
            }
        }
        _ => {
            let _ = check::<proto::ClaimRequest>(body);
        }
    }
}

/// Replies of the cluster backend's Lua scripts (Redis is outside input
/// too: a Redis-compatible server or a proxy may answer differently): the
/// first bytes choose the script and how many keys it was sent, the rest
/// are the reply's values. A reply is accepted only in the shape its
/// callers index by (so a malformed one is an error, never a panic later);
/// a settled answer and a spend cell that decode re-encode to themselves.
pub fn script_replies(data: &[u8]) {
    use crate::engine::backend::cluster::{
        Committed, decode_answer, decode_spend, encode_answer, encode_spend, parse_commit,
        parse_read,
    };
    use redis::Value;
    let [which, n, m, rest @ ..] = data else {
        return;
    };
    let (n, m) = (usize::from(*n % 8), usize::from(*m % 8));
    // The reply: a tag byte per value, then its payload.
    let mut vals = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        let tag = rest[i];
        i += 1;
        let take = |i: &mut usize, len: usize| {
            let s = &rest[(*i).min(rest.len())..(*i + len).min(rest.len())];
            *i += len;
            s.to_vec()
        };
        vals.push(match tag % 5 {
            0 => Value::Int(u64_at(&take(&mut i, 8), 0) as i64),
            1 => {
                let len = usize::from(rest.get(i).copied().unwrap_or(0) % 32);
                i += 1;
                Value::BulkString(take(&mut i, len))
            }
            2 => {
                let len = usize::from(rest.get(i).copied().unwrap_or(0) % 16);
                i += 1;
                Value::SimpleString(String::from_utf8_lossy(&take(&mut i, len)).into_owned())
            }
            3 => Value::Nil,
            _ => Value::Okay,
        });
    }
    match which % 4 {
        0 => match parse_commit(&vals, n, m) {
            Ok(Committed::Ok(v)) => assert_eq!(v.len(), n, "versions for every key"),
            Ok(Committed::Conflict(c)) => assert_eq!(c.len(), n, "a record for every key"),
            Ok(Committed::Duplicates(d)) => {
                assert!(
                    !d.is_empty() && d.iter().all(|(j, _)| *j < m),
                    "{d:?} of {m}"
                )
            }
            Err(e) => assert!(e.contains("commit script"), "{e}"),
        },
        1 => {
            if let Ok(v) = parse_read(&vals, n) {
                assert_eq!(v.len(), n);
            }
        }
        2 => {
            if let Some(a) = decode_answer(rest) {
                assert_eq!(decode_answer(&encode_answer(&a)), Some(a));
            }
        }
        _ => {
            let cell = decode_spend(rest);
            assert_eq!(decode_spend(&encode_spend(&cell)), cell);
        }
    }
}

/// Hand-written starting points per target, replayed with the corpora.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    let text = |v: &[&str]| v.iter().map(|s| s.as_bytes().to_vec()).collect();
    match target {
        "permit" => {
            let key = PermitKey::new(KEY);
            let p = permit_from(b"seed-permit-bytes-seed-permit-bytes-seed-permit-bytes");
            let signed = key.sign(TARGET, &p);
            let mut forged = signed.clone().into_bytes();
            if let Some(b) = forged.get_mut(3) {
                *b = if *b == b'0' { b'1' } else { b'0' };
            }
            vec![signed.into_bytes(), forged, b"2.0.0".to_vec(), Vec::new()]
        }
        "headers" => text(&[
            "retry-after: 30",
            "retry-after: Fri, 31 Dec 9999 23:59:59 GMT",
            "retry-after: 99999999999",
            "retry-after-ms: 1500\nretry-after: 1",
            "x-ratelimit-remaining-requests: 0\nx-ratelimit-reset-requests: 6m0s",
            "x-ratelimit-reset-tokens: 1h2m3.5s\nx-ratelimit-remaining-tokens: 0",
            "anthropic-ratelimit-requests-remaining: 0\nanthropic-ratelimit-requests-reset: 9999-12-31T23:59:59Z",
            "anthropic-ratelimit-tokens-limit: -1\nanthropic-ratelimit-tokens-remaining: 0",
        ]),
        "duration" => text(&[
            "0s",
            "1.5s",
            "6m0s",
            "20ms",
            "1h2m3s",
            "100us",
            "999999999999h",
            "-1s",
            "1e3s",
        ]),
        "config" => text(&[
            "",
            "[targets.a]\nrequests_per_minute = 60\n",
            "[targets.\"a\\u0000b\"]\n",
            "[defaults.breaker]\nwindow = \"0s\"\n",
            "[routes.chat]\ntargets = [\"a\", \"b\"]\nstrategy = 3\n",
            "[server]\nmax_pause = \"10m\"\n[queue]\nmax_items = 0\n",
            "[[[",
            "\u{feff}[targets.x]\nbreaker = { failure_threshold = 0 }\n",
        ]),
        "target_record" => {
            use prost::Message as _;
            let settings = TargetSettings::default();
            let cx = UnitCx {
                settings: &settings,
                seed: name_hash(TARGET),
            };
            let st = crate::domain::unit::TargetState::new(cx.seed, 0, 1);
            vec![codec::encode(&cx, &st).encode_to_vec(), vec![0xff; 16]]
        }
        "requests" => {
            use crate::proto;
            use prost::Message as _;
            let mut cp = vec![0u8];
            cp.extend(
                proto::CanProceedRequest {
                    target: "openai/gpt-4o".into(),
                    estimated_tokens: u64::MAX,
                    ..Default::default()
                }
                .encode_to_vec(),
            );
            let mut ro = vec![1u8];
            ro.extend(
                proto::RecordOutcomeRequest {
                    target: "a\0b".into(),
                    http_status: -1,
                    latency: Some(prost_types::Duration {
                        seconds: -5,
                        nanos: 0,
                    }),
                    ..Default::default()
                }
                .encode_to_vec(),
            );
            vec![cp, ro, vec![4, 0x2a, 0x02, 0x08, 0xff]]
        }
        "script_replies" => {
            let int = |v: u64| {
                let mut b = vec![0u8];
                b.extend(v.to_le_bytes());
                b
            };
            let bulk = |s: &[u8]| {
                let mut b = vec![1u8, s.len() as u8];
                b.extend_from_slice(s);
                b
            };
            let reply = |which: u8, n: u8, m: u8, vals: &[Vec<u8>]| {
                let mut b = vec![which, n, m];
                for v in vals {
                    b.extend(v);
                }
                b
            };
            vec![
                // Committed with versions for two keys; with one too few.
                reply(0, 2, 0, &[int(1), int(7), int(9)]),
                reply(0, 2, 0, &[int(1), int(7)]),
                // A conflict with one pair too many; a duplicate beyond the permits sent.
                reply(0, 1, 0, &[int(0), int(3), bulk(b"rec"), int(4), bulk(b"x")]),
                reply(0, 1, 1, &[int(2), int(2), bulk(b"answer")]),
                // Read: two pairs for one key.
                reply(1, 1, 0, &[int(1), bulk(b"r"), int(2), bulk(b"s")]),
                // A settled answer and a spend cell.
                vec![2, 0, 0, 1, 1, 7, 0, 0, 0, 0, 0, 0, 0, 0],
                [&[3u8, 0, 0][..], b"18446744073709551615 99 1"].concat(),
            ]
        }
        _ => Vec::new(),
    }
}
