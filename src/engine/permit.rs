//! Permits: the signed token a client carries from admission to its outcome.
//!
//! A permit says what the outcome report needs to settle the admission
//! correctly without a server-side lookup: which admission it was (`id`,
//! unique per target: a counter in the target's state, so unique across
//! restarts and, in cluster mode, across replicas), the breaker generation
//! it was issued in (late outcomes from older generations are stale), the
//! half-open probe id, whether it holds a concurrency lease, the key slot,
//! the tokens reserved, and when it was issued and expires.
//!
//! # Why it is signed
//! Every field is guessable from one's own permit or from GetTarget, and each
//! one changes what a report does: an edited lease frees another agent's
//! concurrency slot, an edited `reserved_tokens` refunds a budget at will, a
//! rebuilt probe permit closes a half-open breaker. So the text ends with a
//! MAC: HMAC-SHA256 over the target's name and every field, under a server
//! key (`[server] permit_key`, or one generated once and kept in the state
//! store so permits stay valid across restarts), truncated to 128 bits. A
//! permit that does not verify is refused (INVALID_ARGUMENT) and changes
//! nothing. Replays are handled by the settled-permit memory
//! (`settled.rs`): the first report of a permit counts, later ones do not.
//!
//! Format (hex fields): `2.<tag>.<id>.<gen>.<probe>.<flags>.<reserved>.<issued_ms>.<expires_ms>[.<spend>[.<scopes>]].<mac>`,
//! where `flags = slot | leased << 8` and `spend` (money reserved against
//! spend limits, in micro-units) is written only when not zero, so permits
//! of targets without prices keep their length; `scopes` (the route, caller
//! and tenant spend limits the money was also reserved against, as 1 to 3
//! hashes joined by `-`) only when there are any. Clients treat it as opaque.

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub use crate::domain::unit::Permit;

/// Why a permit string was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PermitError {
    /// Not a permit at all.
    Malformed(&'static str),
    /// A permit of another target.
    WrongTarget,
    /// Well-formed but the MAC does not match: altered, or signed with another key.
    Forged,
}

impl std::fmt::Display for PermitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PermitError::Malformed(why) => write!(
                f,
                "permit does not parse ({why}); pass the permit string exactly as CanProceed or Route returned it, or leave it empty"
            ),
            PermitError::WrongTarget => f.write_str(
                "permit was issued for a different target; report the outcome with the target the permit came from",
            ),
            PermitError::Forged => f.write_str(
                "permit does not verify: it was altered, or issued by a server with another permit key; it changed nothing",
            ),
        }
    }
}

const VERSION: &str = "2";
/// MAC bytes kept (HMAC-SHA256 truncated to 128 bits, as RFC 2104 allows).
const MAC_LEN: usize = 16;
/// Longest permit string accepted: 9 u64 fields in hex, the scopes, a tag,
/// the MAC, dots.
pub const MAX_PERMIT_LEN: usize = 1 + 9 * 17 + 1 + SCOPES_LEN + 1 + 2 * MAC_LEN;
/// Longest scopes field: three 32-bit hashes and two dashes.
const SCOPES_LEN: usize = 3 * 8 + 2;

/// Signs and verifies permits with the server's key.
///
/// Cost matters: every admission signs one. The keyed HMAC state (the key's
/// inner and outer pads, already absorbed) is built once and cloned per
/// permit, so a signature is three SHA-256 compressions (hardware SHA on
/// x86-64 where available), and the text is written without `fmt`.
pub struct PermitKey {
    keyed: Hmac<Sha256>,
}

impl std::fmt::Debug for PermitKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PermitKey(..)")
    }
}

impl PermitKey {
    /// A key from secret bytes (the configured key, or the stored one).
    pub fn new(secret: &[u8]) -> PermitKey {
        // HMAC takes a key of any length (longer ones are hashed first).
        let keyed = <Hmac<Sha256> as Mac>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        PermitKey { keyed }
    }

    /// 32 fresh bytes from the OS's secure generator, for a key generated
    /// at first start (None if the OS cannot provide randomness).
    pub fn generate_secret() -> Option<Vec<u8>> {
        let mut b = vec![0u8; 32];
        getrandom::fill(&mut b).ok()?;
        Some(b)
    }

    fn mac(&self, target: &str, body: &[u8]) -> [u8; MAC_LEN] {
        let mut m = self.keyed.clone();
        m.update(target.as_bytes());
        // The name cannot contain NUL, so name/body boundaries are unambiguous.
        m.update(&[0]);
        m.update(body);
        let tag = m.finalize().into_bytes();
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&tag[..MAC_LEN]);
        out
    }

    /// The permit as text, signed for `target`. Written as ASCII into a
    /// stack buffer (no `fmt`, no per-char checks), then the MAC, then one
    /// allocation for the string.
    pub fn sign(&self, target: &str, p: &Permit) -> String {
        let mut buf = [0u8; MAX_PERMIT_LEN];
        buf[0] = VERSION.as_bytes()[0];
        let mut n = 1;
        let flags = u64::from(p.slot) | (u64::from(p.leased) << 8);
        for v in [
            u64::from(p.tag),
            p.id,
            p.generation,
            p.probe,
            flags,
            p.reserved_tokens,
            p.issued_ms,
            p.expires_ms,
        ] {
            buf[n] = b'.';
            n = write_hex(&mut buf, n + 1, v);
        }
        if p.reserved_spend > 0 || p.scopes[0] != 0 {
            buf[n] = b'.';
            n = write_hex(&mut buf, n + 1, p.reserved_spend);
            let mut first = true;
            for h in p.scopes.into_iter().filter(|&h| h != 0) {
                buf[n] = if first { b'.' } else { b'-' };
                first = false;
                n = write_hex(&mut buf, n + 1, u64::from(h));
            }
        }
        let mac = self.mac(target, &buf[..n]);
        buf[n] = b'.';
        n += 1;
        for x in mac {
            buf[n] = HEX[usize::from(x >> 4)];
            buf[n + 1] = HEX[usize::from(x & 15)];
            n += 2;
        }
        // Only ASCII was written, so this cannot fail.
        String::from_utf8(buf[..n].to_vec()).unwrap_or_default()
    }

    /// Parses and verifies a permit presented with `target` (whose name hash
    /// gives `tag`).
    pub fn verify(&self, target: &str, tag: u16, s: &str) -> Result<Permit, PermitError> {
        if s.len() > MAX_PERMIT_LEN {
            return Err(PermitError::Malformed("too long"));
        }
        let (body, mac_hex) = s
            .rsplit_once('.')
            .ok_or(PermitError::Malformed("no signature"))?;
        let mut parts = body.split('.');
        if parts.next() != Some(VERSION) {
            return Err(PermitError::Malformed(
                "unknown version; permits from before this server version cannot be settled",
            ));
        }
        let mut field = || -> Result<u64, PermitError> {
            let p = parts
                .next()
                .ok_or(PermitError::Malformed("too few fields"))?;
            if p.is_empty() || p.len() > 16 {
                return Err(PermitError::Malformed("malformed field"));
            }
            u64::from_str_radix(p, 16).map_err(|_| PermitError::Malformed("malformed field"))
        };
        let got_tag = field()?;
        let id = field()?;
        let generation = field()?;
        let probe = field()?;
        let flags = field()?;
        let reserved_tokens = field()?;
        let issued_ms = field()?;
        let expires_ms = field()?;
        // Optional: present only when money was reserved, or scopes follow
        // (0 only then: a call without an estimate still settles its scopes).
        let spend_field = parts.next();
        let reserved_spend = match spend_field {
            None => 0,
            Some(p) => {
                if p.is_empty() || p.len() > 16 {
                    return Err(PermitError::Malformed("malformed field"));
                }
                u64::from_str_radix(p, 16).map_err(|_| PermitError::Malformed("malformed field"))?
            }
        };
        // Optional, after the spend: the wider limits it was reserved against.
        let mut scopes = [0u32; 3];
        let scopes_field = parts.next();
        if spend_field == Some("0") && scopes_field.is_none() {
            return Err(PermitError::Malformed("malformed field"));
        }
        if let Some(p) = scopes_field {
            if p.is_empty() {
                return Err(PermitError::Malformed("malformed field"));
            }
            let mut hashes = p.split('-');
            for slot in scopes.iter_mut() {
                let Some(h) = hashes.next() else { break };
                if h.is_empty() || h.len() > 8 {
                    return Err(PermitError::Malformed("malformed field"));
                }
                *slot = u32::from_str_radix(h, 16)
                    .ok()
                    .filter(|&h| h != 0)
                    .ok_or(PermitError::Malformed("malformed field"))?;
            }
            if hashes.next().is_some() {
                return Err(PermitError::Malformed("malformed field"));
            }
        }
        if parts.next().is_some() {
            return Err(PermitError::Malformed("too many fields"));
        }
        let got_tag = u16::try_from(got_tag).map_err(|_| PermitError::Malformed("bad tag"))?;
        if flags > 0x1ff {
            return Err(PermitError::Malformed("bad flags"));
        }
        let mac = decode_mac(mac_hex).ok_or(PermitError::Malformed("bad signature"))?;
        if got_tag != tag {
            return Err(PermitError::WrongTarget);
        }
        let want = self.mac(target, body.as_bytes());
        if !crate::grpc::auth::constant_time_eq(&mac, &want) {
            return Err(PermitError::Forged);
        }
        Ok(Permit {
            id,
            generation,
            probe,
            leased: flags & 0x100 != 0,
            slot: (flags & 0xff) as u8,
            reserved_tokens,
            reserved_spend,
            scopes,
            issued_ms,
            expires_ms,
            tag,
        })
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Writes `v` in lower-case hex without leading zeros (what `{:x}` writes)
/// at `buf[at..]`, without `fmt`; returns the end.
fn write_hex(buf: &mut [u8; MAX_PERMIT_LEN], at: usize, v: u64) -> usize {
    let digits = ((64 - v.leading_zeros()).div_ceil(4)).max(1) as usize;
    for (k, slot) in buf[at..at + digits].iter_mut().enumerate() {
        *slot = HEX[((v >> ((digits - 1 - k) * 4)) & 15) as usize];
    }
    at + digits
}

fn decode_mac(hex: &str) -> Option<[u8; MAC_LEN]> {
    if hex.len() != 2 * MAC_LEN {
        return None;
    }
    let mut out = [0u8; MAC_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Permit {
        Permit {
            id: 42,
            generation: 7,
            probe: 3,
            leased: true,
            slot: 2,
            reserved_tokens: 12_000,
            reserved_spend: 875,
            scopes: [0; 3],
            issued_ms: 1_700_000_000_000,
            expires_ms: 1_700_000_120_000,
            tag: 0xbeef,
        }
    }

    /// Scopes follow the spend: one to three non-zero hashes; a scope
    /// field without money, an empty or zero hash, or a fourth hash is
    /// refused before the MAC is even checked.
    #[test]
    fn scopes_ride_after_the_spend_and_round_trip() {
        let k = PermitKey::new(b"0123456789abcdef0123456789abcdef");
        for scopes in [[7, 0, 0], [1, 0xffff_ffff, 0], [0xdead_beef, 2, 3]] {
            let p = Permit { scopes, ..sample() };
            let s = k.sign("t", &p);
            assert!(s.len() <= MAX_PERMIT_LEN, "{}", s.len());
            assert_eq!(s.split('.').count(), 12, "{s}");
            assert_eq!(k.verify("t", 0xbeef, &s), Ok(p));
        }
        let (body, _) = k
            .sign("t", &sample())
            .rsplit_once('.')
            .map(|(b, m)| (b.to_string(), m.to_string()))
            .unwrap_or_default();
        for bad in ["", "0", "1-", "1-2-3-4", "123456789", "x"] {
            let forged = format!("{body}.{bad}.{}", "00".repeat(MAC_LEN));
            assert_eq!(
                k.verify("t", 0xbeef, &forged),
                Err(PermitError::Malformed("malformed field")),
                "{bad:?}"
            );
        }
        // Scopes without money (a call without an estimate): the spend
        // field is written as 0 so the scopes can follow.
        let free = Permit {
            reserved_spend: 0,
            scopes: [9, 0, 0],
            ..sample()
        };
        let s = k.sign("t", &free);
        assert!(s.contains(".0.9."), "{s}");
        assert_eq!(k.verify("t", 0xbeef, &s), Ok(free));
    }

    /// Money reserved adds a ninth field; without any the permit keeps its
    /// eight, and a ninth field of 0 (never signed) is refused.
    #[test]
    fn the_spend_field_is_written_only_when_money_was_reserved() {
        let k = PermitKey::new(b"0123456789abcdef0123456789abcdef");
        let with = k.sign("t", &sample());
        assert_eq!(with.split('.').count(), 11, "{with}");
        let p = Permit {
            reserved_spend: 0,
            ..sample()
        };
        let without = k.sign("t", &p);
        assert_eq!(without.split('.').count(), 10, "{without}");
        assert_eq!(k.verify("t", 0xbeef, &without), Ok(p));
        let (body, _) = without.rsplit_once('.').unwrap_or_default();
        let zero = format!("{body}.0.{}", "00".repeat(MAC_LEN));
        assert_eq!(
            k.verify("t", 0xbeef, &zero),
            Err(PermitError::Malformed("malformed field"))
        );
    }

    #[test]
    fn a_signed_permit_verifies_for_its_target_only() {
        let k = PermitKey::new(b"test key test key test key test!");
        let p = sample();
        let s = k.sign("t", &p);
        assert!(s.len() <= MAX_PERMIT_LEN, "{}", s.len());
        assert_eq!(k.verify("t", 0xbeef, &s), Ok(p));
        assert_eq!(k.verify("u", 0x1234, &s), Err(PermitError::WrongTarget));
        // Same tag (a hash collision) but another name: the MAC still fails.
        assert_eq!(k.verify("u", 0xbeef, &s), Err(PermitError::Forged));
        // Another server's key.
        let other = PermitKey::new(b"another key entirely, 32 bytes!!");
        assert_eq!(other.verify("t", 0xbeef, &s), Err(PermitError::Forged));
    }

    #[test]
    fn every_edited_field_is_refused() {
        let k = PermitKey::new(b"k");
        let s = k.sign("t", &sample());
        let fields: Vec<&str> = s.split('.').collect();
        // Edit each field (not the version or the MAC) to another valid value.
        for i in 1..fields.len() - 1 {
            let mut f = fields.clone();
            let edited = if f[i] == "ffff" { "fffe" } else { "ffff" };
            f[i] = edited;
            let forged = f.join(".");
            let r = k.verify("t", 0xbeef, &forged);
            assert!(r.is_err(), "field {i} edited to {edited} still verified");
        }
        // Editing the MAC itself.
        let mut f = fields.clone();
        let last = f.len() - 1;
        let flipped = format!("{}0", &f[last][..f[last].len() - 1]);
        let alt = if flipped == f[last] {
            format!("{}1", &f[last][..f[last].len() - 1])
        } else {
            flipped
        };
        f[last] = &alt;
        assert_eq!(
            k.verify("t", 0xbeef, &f.join(".")),
            Err(PermitError::Forged)
        );
    }

    #[test]
    fn hex_matches_fmt() {
        for v in [0u64, 1, 15, 16, 255, 0xbeef, u64::MAX, 1 << 63] {
            let mut b = [0u8; MAX_PERMIT_LEN];
            let n = write_hex(&mut b, 3, v);
            assert_eq!(
                std::str::from_utf8(&b[3..n]).expect("ascii"),
                format!("{v:x}")
            );
        }
    }

    #[test]
    fn rejects_garbage() {
        let k = PermitKey::new(b"k");
        for s in [
            "",
            "x",
            "2",
            "1.1.0.0.0.0.0.0",
            "2.1.1.1.1.1.1.1.1",
            "2.beef.1.1.1.1.1.1.1.zz",
            "2.beef.1.1.1.1.1.1.1.1.00000000000000000000000000000000",
            "2.beef..1.1.1.1.1.1.00000000000000000000000000000000",
            "2.10000.1.1.1.1.1.1.1.00000000000000000000000000000000",
        ] {
            assert!(k.verify("t", 0xbeef, s).is_err(), "{s:?}");
        }
        assert!(k.verify("t", 0xbeef, &"2.".repeat(200)).is_err());
    }
}
