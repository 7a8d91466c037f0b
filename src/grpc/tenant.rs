//! Tenant confinement at the wire: a principal that belongs to a tenant
//! (`[[auth.principals]] tenant = "..."`) may only name that tenant's
//! targets, routes and queues (names starting with its prefix), and what it
//! lists or watches is filtered to them.
//!
//! A name outside the tenant answers NOT_FOUND with the same message
//! whether or not the name exists elsewhere, so a tenant cannot probe for
//! another's names. The check is a prefix comparison on names the call
//! already carries: no lookup, no lock.

use crate::config::{Principal, Tenant};
use std::sync::Arc;
use tonic::{Request, Status};

/// The tenant a call is confined to (None: the whole server).
pub fn of<T>(req: &Request<T>) -> Option<Arc<Tenant>> {
    req.extensions()
        .get::<Principal>()
        .and_then(|p| p.tenant.clone())
}

/// Checks that `name` (a `what`: "target", "route", "queue") belongs to the
/// call's tenant, if it has one.
pub fn check(tenant: Option<&Tenant>, what: &str, name: &str) -> Result<(), Status> {
    match tenant {
        Some(t) if !t.owns(name) => Err(not_found(t, what, name)),
        _ => Ok(()),
    }
}

/// The NOT_FOUND a tenant gets for a name outside it.
pub fn not_found(t: &Tenant, what: &str, name: &str) -> Status {
    Status::not_found(format!(
        "{what} {name:?} not found in tenant {:?} (its names start with {:?})",
        t.name.as_ref(),
        t.prefix.as_ref()
    ))
}

/// A list prefix confined to the tenant: None when the request's prefix
/// cannot match any of the tenant's names.
pub fn confine_prefix<'a>(tenant: Option<&'a Tenant>, asked: &'a str) -> Option<&'a str> {
    match tenant {
        None => Some(asked),
        Some(t) if asked.starts_with(t.prefix.as_ref()) => Some(asked),
        Some(t) if t.prefix.starts_with(asked) => Some(t.prefix.as_ref()),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Tenant {
        Tenant {
            name: "a".into(),
            prefix: "a/".into(),
            spend: None,
            max_targets: None,
            max_queue_bytes: None,
            max_watchers: None,
        }
    }

    #[test]
    fn names_outside_the_tenant_are_not_found_whatever_they_are() {
        let t = t();
        assert!(check(Some(&t), "target", "a/x").is_ok());
        assert!(check(None, "target", "b/x").is_ok());
        let e = check(Some(&t), "target", "b/x").expect_err("outside");
        assert_eq!(e.code(), tonic::Code::NotFound);
        let f = check(Some(&t), "target", "b/does-not-exist").expect_err("outside");
        assert_eq!(
            e.message().replace("b/x", "NAME"),
            f.message().replace("b/does-not-exist", "NAME"),
            "the same answer for a name that exists elsewhere and one that exists nowhere"
        );
    }

    #[test]
    fn list_prefixes_are_confined() {
        let t = t();
        assert_eq!(confine_prefix(Some(&t), ""), Some("a/"));
        assert_eq!(confine_prefix(Some(&t), "a"), Some("a/"));
        assert_eq!(confine_prefix(Some(&t), "a/m"), Some("a/m"));
        assert_eq!(confine_prefix(Some(&t), "b/"), None);
        assert_eq!(confine_prefix(None, "b/"), Some("b/"));
    }
}
