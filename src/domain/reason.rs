//! Why a call was admitted or refused.

/// Why a call was admitted or refused (mirrors `backstop.v1.Reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    Allowed,
    CircuitOpen,
    ProbeLimit,
    ForcedOpen,
    RateLimited,
    ConcurrencyLimit,
    RetryBudgetExhausted,
    KeySlotsUnavailable,
    RequestTooLarge,
    Excluded,
    ContextTooSmall,
    PriorityReserved,
    SpendLimit,
}

impl Reason {
    pub const ALL: [Reason; 13] = [
        Reason::Allowed,
        Reason::CircuitOpen,
        Reason::ProbeLimit,
        Reason::ForcedOpen,
        Reason::RateLimited,
        Reason::ConcurrencyLimit,
        Reason::RetryBudgetExhausted,
        Reason::KeySlotsUnavailable,
        Reason::RequestTooLarge,
        Reason::Excluded,
        Reason::ContextTooSmall,
        Reason::PriorityReserved,
        Reason::SpendLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Allowed => "allowed",
            Reason::CircuitOpen => "circuit_open",
            Reason::ProbeLimit => "probe_limit",
            Reason::ForcedOpen => "forced_open",
            Reason::RateLimited => "rate_limited",
            Reason::ConcurrencyLimit => "concurrency_limit",
            Reason::RetryBudgetExhausted => "retry_budget_exhausted",
            Reason::KeySlotsUnavailable => "key_slots_unavailable",
            Reason::RequestTooLarge => "request_too_large",
            Reason::Excluded => "excluded",
            Reason::ContextTooSmall => "context_too_small",
            Reason::PriorityReserved => "priority_reserved",
            Reason::SpendLimit => "spend_limit",
        }
    }
}
