//! Resolving a config: TOML text (with every value's span) to settings,
//! collecting every error with its location instead of stopping at the
//! first. One resolver per section, in the files beside this one.

mod auth;
mod breaker;
mod budget;
mod cluster;
mod server;
mod targets;
mod telemetry;

use super::Config;
use super::raw::*;
use serde::Deserialize;
use serde::de::IntoDeserializer;
use std::ops::Range;
use std::sync::Arc;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// Error collection while resolving.
pub(crate) struct Cx {
    pub(crate) errors: Vec<(Range<usize>, String)>,
}

type Table<'i> = DeTable<'i>;

impl Cx {
    fn err(&mut self, span: Range<usize>, msg: impl Into<String>) {
        self.errors.push((span, msg.into()));
    }

    /// Deserializes one value, recording the error (with its span) on failure.
    fn de<'i, T: Deserialize<'i>>(&mut self, v: Spanned<DeValue<'i>>, what: &str) -> Option<T> {
        let outer = v.span();
        match T::deserialize(v.into_deserializer()) {
            Ok(t) => Some(t),
            Err(e) => {
                let span = e.span().unwrap_or(outer);
                self.err(span, format!("{what}: {}", e.message()));
                None
            }
        }
    }

    /// `[defaults]`, one sub-table at a time, so an error in
    /// `[defaults.breaker]` is reported under that name (not `[defaults]`).
    fn defaults(&mut self, v: Spanned<DeValue<'_>>) -> DefaultsToml {
        let mut d = DefaultsToml::default();
        let Some(t) = self.table(v, "[defaults]") else {
            return d;
        };
        for (key, value) in t {
            match key.get_ref().as_ref() {
                "breaker" => d.breaker = self.de(value, "[defaults.breaker]"),
                "retry" => d.retry = self.de(value, "[defaults.retry]"),
                "permit_lease" => d.permit_lease = self.de(value, "[defaults] permit_lease"),
                other => self.err(
                    key.span(),
                    format!(
                        "[defaults]: unknown key `{other}`; expected breaker, retry or permit_lease"
                    ),
                ),
            }
        }
        d
    }

    fn table<'i>(&mut self, v: Spanned<DeValue<'i>>, what: &str) -> Option<Table<'i>> {
        let span = v.span();
        match v.into_inner() {
            DeValue::Table(t) => Some(t),
            _ => {
                self.err(span, format!("{what} must be a table"));
                None
            }
        }
    }

    /// Resolves a whole document: each top-level section goes to its own
    /// resolver; cross-section rules (targets name budget groups, routes name
    /// targets, messages must hold payloads) are checked once all are read.
    pub(crate) fn parse(&mut self, src: &str) -> Config {
        let mut config = Config::default();
        let (doc, syntax) = DeTable::parse_recoverable(src);
        if !syntax.is_empty() {
            for e in syntax {
                self.err(e.span().unwrap_or(0..0), e.message().to_string());
            }
            return config;
        }
        let mut server = None;
        let mut defaults = (DefaultsToml::default(), 0..0);
        let mut targets = Vec::new();
        let mut routes = Vec::new();
        let mut groups = Vec::new();
        let mut auth = None;
        let mut tenants = Vec::new();
        let mut callers = Vec::new();
        for (key, value) in doc.into_inner() {
            let key_span = key.span();
            match key.get_ref().as_ref() {
                "server" => server = self.de::<ServerToml>(value, "[server]").map(|s| (s, key_span)),
                "defaults" => defaults = (self.defaults(value), key_span),
                "targets" => targets = self.named(value, "[targets]", |n| format!("[targets.{n:?}]")),
                "routes" => routes = self.named(value, "[routes]", |n| format!("[routes.{n}]")),
                "budgets" => groups = self.named(value, "[budgets]", |n| format!("[budgets.{n}]")),
                "events" => {
                    if let Some(e) = self.de::<EventsToml>(value, "[events]") {
                        config.events = self.events(e);
                    }
                }
                "telemetry" => {
                    if let Some(t) = self.de::<TelemetryToml>(value, "[telemetry]") {
                        config.telemetry = self.telemetry(t, key_span);
                    }
                }
                "queue" => {
                    if let Some(q) = self.de::<QueueToml>(value, "[queue]") {
                        config.queue = self.queue(q, key_span);
                    }
                }
                "cluster" => {
                    if let Some(c) = self.de::<ClusterToml>(value, "[cluster]") {
                        config.cluster = self.cluster(c, key_span);
                    }
                }
                // Resolved after the loop: principals name tenants, which
                // may come later in the file.
                "auth" => auth = self.de::<AuthToml>(value, "[auth]"),
                "tenants" => tenants = self.named(value, "[tenants]", |n| format!("[tenants.{n}]")),
                "callers" => callers = self.named(value, "[callers]", |n| format!("[callers.{n:?}]")),
                other => self.err(
                    key_span,
                    format!(
                        "unknown section `{other}`; expected one of: server, defaults, targets, routes, budgets, queue, events, telemetry, cluster, auth, tenants, callers"
                    ),
                ),
            }
        }
        if let Some((s, span)) = server {
            config.server = self.server(s, span);
        }
        config.tenants = self.tenants(tenants);
        if let Some(a) = auth {
            config.auth = Some(self.auth(a, &config.tenants));
        }
        if config.server.max_message_bytes < config.queue.max_payload_bytes + 64 * 1024 {
            self.err(
                0..0,
                format!(
                    "[server] max_message_bytes ({}) must exceed [queue] max_payload_bytes ({}) by at least 64 KiB",
                    config.server.max_message_bytes, config.queue.max_payload_bytes
                ),
            );
        }
        let base = self.default_target(&defaults.0, defaults.1);
        config.default_target = Arc::new(base.clone());
        // Budget groups first: targets refer to them by name.
        let group_ix = self.groups(groups, &mut config);
        self.targets(targets, &base, &group_ix, &mut config);
        self.routes(routes, &mut config);
        self.callers(callers, &mut config);
        self.tenant_boundaries(&config);
        self.index_spend_scopes(&mut config);
        config
    }

    /// The `[section.<name>]` tables of one section, each deserialized.
    fn named<'i, T: Deserialize<'i>>(
        &mut self,
        value: Spanned<DeValue<'i>>,
        what: &str,
        each: impl Fn(&str) -> String,
    ) -> Vec<(String, Range<usize>, T)> {
        let mut out = Vec::new();
        if let Some(t) = self.table(value, what) {
            for (name, v) in t {
                let span = name.span();
                let name = name.into_inner().into_owned();
                if let Some(x) = self.de::<T>(v, &each(&name)) {
                    out.push((name, span, x));
                }
            }
        }
        out
    }
}
