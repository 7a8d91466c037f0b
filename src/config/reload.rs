//! What a config reload may change in a running server, and what the
//! command line overrides.
//!
//! A reload re-reads the file, applies the same command-line overrides the
//! server started with (`--listen`, `--http`, `--data-dir`, `--ephemeral`,
//! `--redis`), and then splits the difference from the running config in
//! two: what applies live (targets, breakers, budgets, routes, key slots,
//! queue bounds, per-call limits) and what only a restart can change
//! (sockets, the data directory, cluster wiring, the permit key, buffers
//! sized at startup, the trace exporter). The second kind keeps its running
//! value and is named in the answer, so an operator is never left guessing
//! whether an edit took effect.

use super::{ClusterConfig, Config};
use std::path::PathBuf;

/// The command-line settings that override the file, kept so a reload
/// re-applies them (the file alone would otherwise move a server started
/// with `--listen 127.0.0.1:0` back to the file's address).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<std::net::SocketAddr>,
    /// `Some(None)` = `--http off`.
    pub http: Option<Option<std::net::SocketAddr>>,
    pub data_dir: Option<PathBuf>,
    pub ephemeral: bool,
    pub redis: Option<String>,
}

impl Overrides {
    /// Applies the overrides to a config read from the file (or the defaults).
    pub fn apply(&self, config: &mut Config) -> Result<(), String> {
        if let Some(l) = self.listen {
            config.server.listen = l;
            // Asking for a free gRPC port means "don't collide with
            // anything": the HTTP listener follows unless --http says otherwise.
            if l.port() == 0
                && self.http.is_none()
                && let Some(h) = config.server.http.as_mut()
            {
                h.set_port(0);
            }
        }
        if let Some(h) = self.http {
            config.server.http = h;
        }
        if let Some(d) = &self.data_dir {
            config.server.data_dir = d.clone();
        }
        if self.ephemeral {
            config.server.ephemeral = true;
        }
        if let Some(url) = self.redis.as_deref() {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(format!(
                    "--redis {url:?} is not a URL like redis://127.0.0.1:6379/0"
                ));
            }
            match config.cluster.as_mut() {
                Some(c) => c.redis = super::RedisTarget::Url(url.to_string()),
                None => config.cluster = Some(ClusterConfig::for_url(url)),
            }
        }
        if let Some(c) = &config.cluster
            && c.redis == super::RedisTarget::Url(String::new())
        {
            return Err("[cluster] needs redis_url (e.g. \"redis://127.0.0.1:6379/0\") or redis_cluster_nodes, or pass --redis URL".into());
        }
        if let Some(c) = &config.cluster
            && c.tls != super::RedisTls::default()
            && !c.redis.uses_tls()
        {
            return Err("[cluster] redis_ca / redis_client_cert / redis_client_key are for TLS: use a rediss:// URL (or rediss://host:port cluster nodes), or remove them".into());
        }
        Ok(())
    }
}

/// Where the running config came from: the file (None = the embedded
/// defaults) and the command-line overrides.
#[derive(Clone, Debug, Default)]
pub struct Source {
    pub path: Option<PathBuf>,
    pub overrides: Overrides,
}

impl Source {
    /// Reads and validates the file, then applies the overrides. The error
    /// is what an operator needs to fix it: every problem, located.
    pub fn load(&self) -> Result<Config, String> {
        let mut c = match &self.path {
            Some(p) => Config::load(p).map_err(|e| e.to_string())?,
            None => Config::default(),
        };
        self.overrides.apply(&mut c)?;
        Ok(c)
    }
}

/// Keeps, in `new`, the running value of every setting only a restart can
/// change, and names each one that differed (`"server.listen"`, ...).
pub fn keep_restart_only(old: &Config, new: &mut Config) -> Vec<String> {
    let mut names = Vec::new();
    macro_rules! keep {
        ($($path:ident).+) => {
            if old.$($path).+ != new.$($path).+ {
                names.push(stringify!($($path).+).replace(' ', ""));
                new.$($path).+ = old.$($path).+.clone();
            }
        };
    }
    keep!(server.listen);
    keep!(server.http);
    keep!(server.data_dir);
    keep!(server.ephemeral);
    keep!(server.max_connections);
    keep!(server.handshake_timeout);
    keep!(server.idle_timeout);
    keep!(server.http2_keepalive_interval);
    keep!(server.http2_keepalive_timeout);
    keep!(server.max_message_bytes);
    keep!(server.shutdown_grace);
    keep!(server.permit_key);
    keep!(server.tls);
    keep!(cluster);
    keep!(events);
    keep!(telemetry.otlp_endpoint);
    keep!(telemetry.service_name);
    keep!(telemetry.latency_buckets);
    names
}

/// Target names whose settings differ between two configs, and those only
/// in one of them (configured targets only; first-use targets follow
/// `default_target`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TargetDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

pub fn diff_targets(old: &Config, new: &Config) -> TargetDiff {
    let mut d = TargetDiff::default();
    for (name, s) in &new.targets {
        match old.targets.get(name) {
            None => d.added.push(name.clone()),
            Some(o) if **o != **s || groups_of(old, o) != groups_of(new, s) => {
                d.changed.push(name.clone())
            }
            Some(_) => {}
        }
    }
    d.removed = old
        .targets
        .keys()
        .filter(|n| !new.targets.contains_key(*n))
        .cloned()
        .collect();
    d
}

/// A target's budget groups by name and budget (indexes differ between
/// configs, so two equal settings may still point at different groups).
pub(crate) fn groups_of<'a>(
    c: &'a Config,
    s: &super::TargetSettings,
) -> Vec<(&'a str, &'a crate::domain::budget::BudgetConfig)> {
    s.groups
        .iter()
        .filter_map(|&g| c.groups.get(g))
        .map(|g| (g.name.as_ref(), &g.budget))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Config {
        Config::parse(s, "test.toml").expect("valid")
    }

    #[test]
    fn restart_only_settings_keep_their_running_value_and_are_named() {
        let old = parse("[server]\nlisten = \"127.0.0.1:7000\"\nmax_targets = 10\n");
        let mut new = parse(
            "[server]\nlisten = \"127.0.0.1:7001\"\nmax_targets = 20\n[events]\nring_size = 50\n",
        );
        let names = keep_restart_only(&old, &mut new);
        assert_eq!(names, vec!["server.listen", "events"]);
        assert_eq!(new.server.listen, old.server.listen);
        assert_eq!(new.events, old.events);
        // Live settings keep the new value.
        assert_eq!(new.server.max_targets, 20);
        let mut same = old.clone();
        assert!(keep_restart_only(&old, &mut same).is_empty());
    }

    #[test]
    fn target_diff_sees_settings_and_group_changes() {
        let old = parse(
            r#"
[budgets.shared]
requests_per_minute = 100
[targets.a]
breaker = { failure_threshold = 3 }
[targets.b]
budgets = ["shared"]
[targets.c]
"#,
        );
        let new = parse(
            r#"
[budgets.shared]
requests_per_minute = 50
[targets.a]
breaker = { failure_threshold = 4 }
[targets.b]
budgets = ["shared"]
[targets.d]
"#,
        );
        let d = diff_targets(&old, &new);
        assert_eq!(d.added, vec!["d"]);
        assert_eq!(d.removed, vec!["c"]);
        assert_eq!(d.changed, vec!["a", "b"], "b's group budget changed");
        assert_eq!(diff_targets(&old, &old), TargetDiff::default());
    }

    #[test]
    fn overrides_apply_on_every_load() {
        let o = Overrides {
            listen: Some("127.0.0.1:0".parse().expect("addr")),
            ephemeral: true,
            ..Default::default()
        };
        let mut c = Config::default();
        o.apply(&mut c).expect("applies");
        assert_eq!(c.server.listen.port(), 0);
        assert_eq!(
            c.server.http.map(|h| h.port()),
            Some(0),
            "http follows port 0"
        );
        assert!(c.server.ephemeral);
        let bad = Overrides {
            redis: Some("http://x".into()),
            ..Default::default()
        };
        assert!(bad.apply(&mut c).unwrap_err().contains("not a URL"));
    }

    #[test]
    fn redis_tls_files_need_a_tls_address() {
        let toml = "[cluster]\nredis_ca = \"/etc/ca.pem\"\n";
        let with = |url: &str| {
            let mut c = Config::parse(toml, "t.toml").expect("parses");
            Overrides {
                redis: Some(url.into()),
                ..Default::default()
            }
            .apply(&mut c)
            .map(|()| c)
        };
        let c = with("rediss://cache.internal:6380/0").expect("TLS address");
        let cl = c.cluster.as_ref().expect("cluster");
        assert!(cl.redis.uses_tls());
        assert_eq!(
            cl.tls.ca.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        let e = with("redis://127.0.0.1:6379/0").unwrap_err();
        assert!(e.contains("rediss://") && e.contains("redis_ca"), "{e}");
        // Half a client identity, an empty path, a mixed node list: located errors.
        for (bad, says) in [
            (
                "[cluster]\nredis_url = \"rediss://h:1/0\"\nredis_client_cert = \"c.pem\"\n",
                "go together",
            ),
            (
                "[cluster]\nredis_url = \"rediss://h:1/0\"\nredis_ca = \" \"\n",
                "redis_ca is empty",
            ),
            (
                "[cluster]\nredis_cluster_nodes = [\"rediss://a:1\", \"b:2\"]\n",
                "every node as rediss://",
            ),
        ] {
            let e = Config::parse(bad, "t.toml").unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("t.toml"), "{bad}: {e}");
        }
        let c = Config::parse(
            "[cluster]\nredis_cluster_nodes = [\"rediss://a:1\", \"rediss://b:2\"]\n",
            "t.toml",
        )
        .expect("TLS cluster nodes");
        assert!(c.cluster.as_ref().is_some_and(|c| c.redis.uses_tls()));
    }
}
