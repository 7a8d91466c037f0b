//! Permits: the token a client carries from admission to its outcome report.
//!
//! A permit is a short opaque string (`1.<fields in hex>`). It carries what the
//! outcome needs to be applied correctly without a server-side lookup on the
//! common path: the breaker generation it was issued in (late outcomes from
//! older generations are stale), the probe id (half-open), the concurrency
//! lease (to release the slot), the key slot, and the tokens reserved (to
//! settle). A 16-bit tag of the target's name catches a permit sent with the
//! wrong target, and a 16-bit epoch (random per server start) tells a permit
//! from before a restart, whose lease and reservation no longer exist.

use std::fmt::Write as _;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Permit {
    pub generation: u64,
    /// Half-open probe id; 0 = not a probe.
    pub probe: u64,
    /// Admission number holding a concurrency lease; 0 = none.
    pub lease: u64,
    pub slot: u8,
    pub reserved_tokens: u64,
    pub tag: u16,
    /// The server start that issued it.
    pub epoch: u16,
}

/// Why a permit string was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PermitError(pub &'static str);

impl std::fmt::Display for PermitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "permit does not parse ({}); pass the permit string exactly as CanProceed or Route returned it, or leave it empty",
            self.0
        )
    }
}

const VERSION: &str = "1";
/// Longest permit string accepted (seven u64 fields in hex plus separators).
pub const MAX_PERMIT_LEN: usize = 2 + 7 * 17;

impl Permit {
    pub fn encode(&self) -> String {
        let mut s = String::with_capacity(40);
        let _ = write!(
            s,
            "{VERSION}.{:x}.{:x}.{:x}.{:x}.{:x}.{:x}.{:x}",
            self.generation,
            self.probe,
            self.lease,
            self.slot,
            self.reserved_tokens,
            self.tag,
            self.epoch
        );
        s
    }

    pub fn parse(s: &str) -> Result<Permit, PermitError> {
        if s.len() > MAX_PERMIT_LEN {
            return Err(PermitError("too long"));
        }
        let mut parts = s.split('.');
        if parts.next() != Some(VERSION) {
            return Err(PermitError("unknown version"));
        }
        let mut field = || -> Result<u64, PermitError> {
            let p = parts.next().ok_or(PermitError("too few fields"))?;
            if p.is_empty() || p.len() > 16 {
                return Err(PermitError("malformed field"));
            }
            u64::from_str_radix(p, 16).map_err(|_| PermitError("malformed field"))
        };
        let generation = field()?;
        let probe = field()?;
        let lease = field()?;
        let slot = u8::try_from(field()?).map_err(|_| PermitError("bad key slot"))?;
        let reserved_tokens = field()?;
        let tag = u16::try_from(field()?).map_err(|_| PermitError("bad tag"))?;
        let epoch = u16::try_from(field()?).map_err(|_| PermitError("bad epoch"))?;
        if parts.next().is_some() {
            return Err(PermitError("too many fields"));
        }
        Ok(Permit {
            generation,
            probe,
            lease,
            slot,
            reserved_tokens,
            tag,
            epoch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let p = Permit {
            generation: 7,
            probe: 3,
            lease: u64::MAX,
            slot: 2,
            reserved_tokens: 12_000,
            tag: 0xbeef,
            epoch: 7,
        };
        assert_eq!(Permit::parse(&p.encode()), Ok(p));
        assert_eq!(
            Permit::parse(&Permit::default().encode()),
            Ok(Permit::default())
        );
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "x",
            "1",
            "2.1.0.0.0.0.0.0",
            "1.1.0.0.0.0.0",
            "1.1.0.0.0.0.0.0.0",
            "1.g.0.0.0.0.0.0",
            "1.1.0.0.100.0.0.0",
            "1..0.0.0.0.0.0",
            "1.11111111111111111.0.0.0.0.0.0",
            "1.1.0.0.0.0.0.10000",
        ] {
            assert!(Permit::parse(s).is_err(), "{s:?}");
        }
        assert!(Permit::parse(&"1.".repeat(200)).is_err());
    }
}
