//! Configuration: the TOML file, validated and resolved into the settings the
//! engine uses.
//!
//! Loading collects *every* error with its line and column instead of stopping
//! at the first, so `backstop check-config` can show an operator everything to
//! fix in one go. With no file at all, [`Config::default`] is a working
//! service: gRPC on 127.0.0.1:50051, the seed's breaker defaults, no budgets.

mod errors;
pub(crate) mod raw;
pub mod reload;
mod resolve;
mod settings;

use resolve::Cx;
use std::sync::Arc;

pub use errors::ConfigErrors;
pub use settings::*;

impl Config {
    /// Settings for `target`: its own if declared, else the defaults.
    pub fn target(&self, name: &str) -> &Arc<TargetSettings> {
        self.targets.get(name).unwrap_or(&self.default_target)
    }

    /// A short digest of the settings that must agree across replicas
    /// (everything but this replica's own addresses, data directory and id):
    /// replicas with different digests decide differently.
    pub fn digest(&self) -> String {
        use sha2::Digest as _;
        let mut c = self.clone();
        c.server.listen = ServerConfig::default().listen;
        c.server.http = None;
        c.server.data_dir = Default::default();
        c.server.permit_key = None;
        c.server.admin_token = None;
        if let Some(cl) = c.cluster.as_mut() {
            cl.replica_id = None;
        }
        // HashMap order is arbitrary: the routes go in sorted.
        let routes: std::collections::BTreeMap<_, _> = c.routes.drain().collect();
        let text = format!("{c:?}{routes:?}");
        let d = sha2::Sha256::digest(text.as_bytes());
        d.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    /// Reads and validates a config file.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigErrors> {
        let origin = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| ConfigErrors {
            origin: origin.clone(),
            src: String::new(),
            errors: vec![(0..0, format!("cannot read the config file: {e}"))],
        })?;
        let src = match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => {
                // Located at the first bad byte: the text before it is valid,
                // so it is kept for the line/column and the quoted line.
                let good = e.utf8_error().valid_up_to();
                let bytes = e.into_bytes();
                let src = String::from_utf8_lossy(&bytes).into_owned();
                let prefix = String::from_utf8_lossy(&bytes[..good]).len();
                return Err(ConfigErrors {
                    origin,
                    src,
                    errors: vec![(
                        prefix..prefix,
                        format!(
                            "the file is not valid UTF-8 (byte 0x{:02x} at offset {good}); save it as UTF-8",
                            bytes.get(good).copied().unwrap_or(0)
                        ),
                    )],
                });
            }
        };
        Config::parse(&src, &origin)
    }

    /// Validates config text; `origin` names it in error messages.
    pub fn parse(src: &str, origin: &str) -> Result<Config, ConfigErrors> {
        let mut cx = Cx { errors: Vec::new() };
        let config = cx.parse(src);
        if cx.errors.is_empty() {
            Ok(config)
        } else {
            cx.errors.sort_by_key(|(span, _)| span.start);
            Err(ConfigErrors {
                origin: origin.to_string(),
                src: src.to_string(),
                errors: cx.errors,
            })
        }
    }
}

#[cfg(test)]
mod tests;
