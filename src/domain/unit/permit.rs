//! What an admission grants, as the client carries it back with its outcome.
//! Signing and parsing the text form is the engine's (`engine::permit`).

/// What a permit grants, as issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Permit {
    /// The admission number: unique per target, never reused.
    pub id: u64,
    pub generation: u64,
    /// Half-open probe id; 0 = not a probe.
    pub probe: u64,
    /// Holds a concurrency lease (keyed by target and `id`).
    pub leased: bool,
    pub slot: u8,
    pub reserved_tokens: u64,
    /// Money reserved against spend limits, in micro-units (0 = none).
    pub reserved_spend: u64,
    /// The wider spend limits (route, caller, tenant) that `reserved_spend`
    /// was also reserved against, by their 32-bit hash (0 = none): the
    /// engine's, settled beside the target's (see `config::SpendScope`).
    pub scopes: [u32; 3],
    /// Milliseconds since the Unix epoch.
    pub issued_ms: u64,
    /// After this the permit settles nothing (its lease and reservation
    /// have been reclaimed); its outcome counts like one without a permit.
    pub expires_ms: u64,
    /// 16 bits of the target name's hash: tells "wrong target" from "forged".
    pub tag: u16,
}
