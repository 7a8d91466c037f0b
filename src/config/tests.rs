use super::*;
use crate::domain::BreakerConfig;
use crate::domain::breaker::{RateRule, Treatment};
use crate::domain::budget::{Kind, Rate};
use std::net::SocketAddr;
use std::time::Duration;

const EXAMPLE: &str = r#"
[server]
listen = "127.0.0.1:50051"

[defaults.breaker]
failure_threshold = 5
success_threshold = 2
open_duration = "60s"
half_open_max_probes = 1

[targets."anthropic/claude-sonnet"]
max_tokens = 8096
context_window = 200000
cost_per_mtok_input = 3.0
cost_per_mtok_output = 15.0
breaker = { failure_threshold = 5, open_duration = "30s" }

[targets."openai/gpt-4o"]
requests_per_minute = 500
tokens = 10000
window = "10s"
max_concurrency = 8
keys = ["org-a", "org-b"]
budgets = ["openai-org"]
mode = "shadow"

[budgets.openai-org]
tokens_per_minute = 1000000

[routes.chat]
targets = ["anthropic/claude-sonnet", "openai/gpt-4o", "anthropic/claude-haiku"]
"#;

#[test]
fn the_documented_example_resolves() {
    let c = Config::parse(EXAMPLE, "example.toml").expect("valid");
    let sonnet = c.target("anthropic/claude-sonnet");
    assert!(sonnet.configured);
    assert_eq!(sonnet.breaker.open_duration, Duration::from_secs(30));
    assert_eq!(sonnet.breaker.failure_threshold, 5);
    assert_eq!(sonnet.context_window, 200_000);
    assert_eq!(sonnet.cost_per_mtok_output, 15.0);
    let gpt = c.target("openai/gpt-4o");
    assert_eq!(gpt.budget.rate(Kind::Requests), Some(Rate::per_minute(500)));
    assert_eq!(
        gpt.budget.rate(Kind::Tokens),
        Some(Rate {
            amount: 10_000,
            window: Duration::from_secs(10)
        })
    );
    assert_eq!(gpt.budget.max_concurrency, Some(8));
    assert_eq!(gpt.keys.len(), 2);
    assert_eq!(gpt.mode, Enforcement::Shadow);
    assert_eq!(c.groups[gpt.groups[0]].name.as_ref(), "openai-org");
    // Undeclared targets get the defaults.
    let haiku = c.target("anthropic/claude-haiku");
    assert!(!haiku.configured);
    assert_eq!(haiku.breaker.open_duration, Duration::from_secs(60));
    assert_eq!(c.routes["chat"].targets.len(), 3);
}

#[test]
fn empty_config_is_a_working_default() {
    let c = Config::parse("", "empty").expect("valid");
    assert_eq!(c.server.listen, SocketAddr::from(([127, 0, 0, 1], 50051)));
    assert_eq!(c.default_target.breaker, BreakerConfig::default());
}

#[test]
fn every_error_is_reported_with_its_line() {
    let src = r#"
[server]
listen = "nowhere"

[defaults.breaker]
failure_threshold = 0

[targets.a]
open_duration = "30s"
requests_per_minute = -5

[targets.b]
breaker = { open_duration = "soon" }
[targets.c]
budgets = ["missing"]

[routes.chat]
targets = []

[bogus]
x = 1
"#;
    let e = Config::parse(src, "bad.toml").expect_err("invalid");
    let located = e.located();
    let lines: Vec<usize> = located.iter().map(|(l, _, _)| *l).collect();
    let text = e.to_string();
    assert!(lines.contains(&3), "listen on line 3: {text}");
    assert!(lines.contains(&6), "failure_threshold on line 6: {text}");
    assert!(
        lines.contains(&9),
        "unknown key open_duration on line 9: {text}"
    );
    assert!(lines.contains(&13), "bad duration on line 13: {text}");
    assert!(lines.contains(&15), "unknown group on line 15: {text}");
    assert!(lines.contains(&17), "empty route on line 17: {text}");
    assert!(lines.contains(&20), "unknown section on line 20: {text}");
    assert!(text.contains("bad.toml:13:"), "{text}");
    assert!(text.contains("invalid duration \"soon\""), "{text}");
    assert!(text.contains("unknown budget group \"missing\""), "{text}");
    assert!(text.contains("unknown field `open_duration`"), "{text}");
}

#[test]
fn syntax_errors_are_located() {
    let e = Config::parse("[server]\nlisten = \n", "x.toml").expect_err("invalid");
    assert_eq!(e.located()[0].0, 2, "{e}");
}

#[test]
fn budget_rules_are_checked() {
    let cases = [
        ("[targets.a]\nrequests = 5\n", "needs a window"),
        (
            "[targets.a]\nrequests = 5\nrequests_per_minute = 5\nwindow = \"1s\"\n",
            "not both",
        ),
        ("[targets.a]\nwindow = \"1s\"\n", "no per-window budget"),
        ("[targets.a]\nmax_concurrency = 0\n", "positive integer"),
        ("[budgets.g]\n", "sets no limit"),
        ("[targets.a]\nkeys = [\"k\", \"k\"]\n", "duplicate key slot"),
        (
            "[targets.a.breaker]\nmax_open_duration = \"1s\"\n",
            "shorter than open_duration",
        ),
        ("[targets.a.breaker]\nbackoff_multiplier = 0.5\n", ">= 1.0"),
        (
            "[targets.a.breaker]\nminimum_calls = 3\n",
            "only applies with failure_rate_threshold",
        ),
        (
            "[targets.a.breaker]\nfailure_rate_threshold = 1.5\n",
            "fraction",
        ),
        (
            "[targets.a.breaker.treat]\nbad_input = \"explode\"\n",
            "unknown variant",
        ),
        ("[routes.r]\ntargets = [\"a\", \"a\"]\n", "twice"),
        ("[server]\nadmin_token = \"short\"\n", "at least 16"),
        (
            "[routes.r]\ntargets = [\"a\"]\nstrategy = \"fastest\"\n",
            "unknown strategy \"fastest\"",
        ),
        (
            "[routes.r]\ntargets = [\"a\", \"b\"]\nstrategy = \"weighted\"\n",
            "needs weights",
        ),
        (
            "[routes.r]\ntargets = [\"a\", \"b\"]\nstrategy = \"weighted\"\nweights = [1]\n",
            "1 weights for 2 targets",
        ),
        (
            "[routes.r]\ntargets = [\"a\", \"b\"]\nstrategy = \"weighted\"\nweights = [0, 0]\n",
            "at least one weight",
        ),
        (
            "[routes.r]\ntargets = [\"a\", \"b\"]\nweights = [1, 2]\n",
            "only apply with strategy",
        ),
        (
            "[routes.r]\ntargets = [\"a\"]\nstrategy = \"lowest_latency\"\nexplore = 0.9\n",
            "0.0..=0.5",
        ),
        (
            "[targets.a]\nrequests_per_minute = 10\nreserve = { interactive = 0.6, default = 0.4 }\n",
            "add up to the whole budget",
        ),
        (
            "[targets.a]\nreserve = { interactive = 0.2 }\n",
            "reserve needs a budget",
        ),
        (
            "[targets.a]\nrequests_per_minute = 10\nreserve = { batch = 0.2 }\n",
            "unknown field",
        ),
    ];
    for (src, want) in cases {
        let e = Config::parse(src, "t").expect_err(src);
        assert!(e.to_string().contains(want), "{src:?}: {e}");
    }
}

#[test]
fn breaker_overrides_merge_over_defaults() {
    let src = r#"
[defaults.breaker]
open_duration = "5s"
failure_rate_threshold = 0.5
minimum_calls = 20
treat = { bad_input = "failure" }

[targets.a.breaker]
failure_threshold = 3
slow_call_duration = "2s"
"#;
    let c = Config::parse(src, "t").expect("valid");
    let a = c.target("a");
    assert_eq!(a.breaker.open_duration, Duration::from_secs(5));
    assert_eq!(a.breaker.failure_threshold, 3);
    assert_eq!(
        a.breaker.rate_rule,
        Some(RateRule {
            threshold: 0.5,
            minimum_calls: 20
        })
    );
    assert_eq!(a.breaker.slow_call_duration, Some(Duration::from_secs(2)));
    assert_eq!(a.breaker.treatments.bad_input, Treatment::Failure);
    assert_eq!(
        c.default_target.breaker.open_duration,
        Duration::from_secs(5)
    );
}

#[test]
fn adaptive_concurrency_resolves_with_defaults_and_checked_bounds() {
    let c = Config::parse(
        "[targets.a]\nmax_concurrency = \"adaptive\"\nadaptive = { min = 2, max = 64, initial = 8 }\n\
         reserve = { interactive = 0.25 }\n[targets.b]\nmax_concurrency = \"adaptive\"\n\
         [targets.c]\nmax_concurrency = \"adaptive\"\nadaptive = { max = 4 }\n",
        "t",
    )
    .expect("valid");
    let a = c.target("a").budget.clone();
    let bounds = a.adaptive.expect("adaptive");
    assert_eq!((bounds.min, bounds.max, bounds.initial), (2, 64, 8));
    assert_eq!(
        a.max_concurrency,
        Some(8),
        "the limit before anything is learned"
    );
    assert_eq!(a.reserve, [250, 0], "reserves apply to the learned limit");
    let b = c.target("b").budget.adaptive.expect("defaults");
    assert_eq!((b.min, b.max, b.initial), (1, 256, 8));
    let cc = c.target("c").budget.adaptive.expect("initial fitted");
    assert_eq!((cc.min, cc.max, cc.initial), (1, 4, 4));

    let adaptive = "[targets.a]\nmax_concurrency = \"adaptive\"\n";
    for (extra, message) in [
        (
            "adaptive = { min = 0 }\n",
            "adaptive.min = 0 must be at least 1",
        ),
        ("adaptive = { max = 100001 }\n", "at most 100000"),
        (
            "adaptive = { min = 9, max = 8 }\n",
            "must not be above adaptive.max",
        ),
        (
            "adaptive = { min = 2, max = 8, initial = 9 }\n",
            "adaptive.initial = 9 must be between",
        ),
        ("adaptive = { minimum = 2 }\n", "unknown field"),
    ] {
        let err = Config::parse(&format!("{adaptive}{extra}"), "t").expect_err(extra);
        assert!(err.to_string().contains(message), "{extra}: {err}");
    }
    for (toml, message) in [
        (
            "[targets.a]\nmax_concurrency = \"auto\"\n",
            "positive integer or \"adaptive\"",
        ),
        (
            "[targets.a]\nmax_concurrency = 4\nadaptive = { max = 8 }\n",
            "need max_concurrency = \"adaptive\"",
        ),
        (
            "[targets.a]\nadaptive = { max = 8 }\n",
            "need max_concurrency = \"adaptive\"",
        ),
        (
            "[budgets.g]\nmax_concurrency = \"adaptive\"\n",
            "learned per target",
        ),
    ] {
        let err = Config::parse(toml, "t").expect_err(toml);
        assert!(err.to_string().contains(message), "{toml}: {err}");
    }
}

#[test]
fn decision_rates_default_from_auth_and_bad_ones_are_located() {
    let sha = "a".repeat(64);
    let b = "b".repeat(64);
    let c = Config::parse(
        &format!(
            "[auth]\ndecision_rate = 100\n[[auth.principals]]\nname = \"a\"\nroles = [\"agent\"]\ntoken_sha256 = \"{sha}\"\n\
             [[auth.principals]]\nname = \"b\"\nroles = [\"agent\"]\ntoken_sha256 = \"{b}\"\ndecision_rate = 2.5\ndecision_burst = 7\n"
        ),
        "rates.toml",
    )
    .expect("valid");
    let p = &c.auth.as_ref().expect("auth").principals;
    assert_eq!(
        p[0].decision_rate,
        Some(DecisionRate {
            per_second: 100.0,
            burst: 100
        })
    );
    assert_eq!(
        p[1].decision_rate,
        Some(DecisionRate {
            per_second: 2.5,
            burst: 7
        })
    );
    for bad in ["0", "-1", "nan", "inf", "2e9"] {
        let e = Config::parse(
            &format!("[[auth.principals]]\nname = \"a\"\nroles = [\"agent\"]\ntoken_sha256 = \"{sha}\"\ndecision_rate = {bad}\n"),
            "bad.toml",
        )
        .expect_err(bad)
        .to_string();
        assert!(
            e.contains("decision_rate") && e.contains("bad.toml:5"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn history_targets_defaults_to_2000_and_must_be_positive() {
    let c = Config::parse("", "t").expect("valid");
    assert_eq!(c.events.history_targets, 2000);
    let c = Config::parse("[events]\nhistory_targets = 50\n", "t").expect("valid");
    assert_eq!(c.events.history_targets, 50);
    let e = Config::parse("[events]\nhistory_targets = 0\n", "t").expect_err("zero");
    assert!(e.to_string().contains("positive"), "{e}");
}
