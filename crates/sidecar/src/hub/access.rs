//! The hub's access decisions: who a call or an agent is, and whether the
//! policy in force lets it do what it asks. Without a policy the hub is open
//! (only allowed on loopback, a Unix socket, or with `--allow-anyone`).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex, RwLock,
    },
};

use http::HeaderMap;
use listenmux::ConnInfo;
use tonic::Status;

use crate::hub::{
    identity::{bearer_token, conn_cert_name, TokenError},
    policy::{PeerView, Policy, PolicyError},
};

/// The identity of callers on an open hub that present no certificate.
pub const ANONYMOUS: &str = "anonymous";

/// A refusal: the status for the client and a reason for metrics and audit.
#[derive(Debug, Clone)]
pub struct Denial {
    /// What the client gets.
    pub status: Status,
    /// A short machine-readable reason (`backchannel_hub_denied_total{reason}`).
    pub reason: &'static str,
}

impl Denial {
    fn new(reason: &'static str, status: Status) -> Self {
        Denial { status, reason }
    }
}

/// Holds one of the caller's in-flight slots; released on drop.
#[derive(Debug)]
pub struct Permit(Arc<AtomicU32>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The policy in force (if any), reloadable, and per-identity call counts.
#[derive(Debug)]
pub struct Access {
    path: Option<PathBuf>,
    policy: RwLock<Option<Arc<Policy>>>,
    in_flight: Mutex<HashMap<String, Arc<AtomicU32>>>,
}

impl Access {
    /// No policy: everyone may do everything.
    ///
    /// ```
    /// let a = backchannel_sidecar::hub::access::Access::open();
    /// assert!(!a.enforcing());
    /// ```
    pub fn open() -> Arc<Access> {
        Arc::new(Access {
            path: None,
            policy: RwLock::new(None),
            in_flight: Mutex::default(),
        })
    }

    /// Enforces the policy in `path` (reloadable with [`reload`](Self::reload)).
    pub fn load(path: &Path) -> Result<Arc<Access>, PolicyError> {
        let policy = Policy::load(path)?;
        Ok(Arc::new(Access {
            path: Some(path.to_path_buf()),
            policy: RwLock::new(Some(Arc::new(policy))),
            in_flight: Mutex::default(),
        }))
    }

    /// Whether a policy is in force.
    pub fn enforcing(&self) -> bool {
        self.path.is_some()
    }

    /// The policy file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn current(&self) -> Option<Arc<Policy>> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the policy file. On error the policy in force stays.
    /// Sessions and calls are untouched: the new policy applies to the next
    /// announce and the next call.
    pub fn reload(&self) -> Result<(), PolicyError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let p = Policy::load(path)?;
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(p));
        Ok(())
    }

    /// Who is calling: the bearer token of the call, else the connection's
    /// client certificate. On an open hub every caller has an identity (its
    /// certificate's name, else `anonymous`); with a policy, credentials the
    /// policy does not know are `UNAUTHENTICATED`.
    pub fn identify(&self, info: Option<&ConnInfo>, headers: &HeaderMap) -> Result<String, Denial> {
        let token = bearer_token(headers, info).map_err(|e| match e {
            TokenError::Plaintext => {
                Denial::new("token_plaintext", Status::unauthenticated(e.to_string()))
            }
            TokenError::Malformed => {
                Denial::new("unauthenticated", Status::unauthenticated(e.to_string()))
            }
        })?;
        let cert = conn_cert_name(info);
        let Some(policy) = self.current() else {
            return Ok(cert
                .map(|c| c.to_string())
                .unwrap_or_else(|| ANONYMOUS.into()));
        };
        if let Some(t) = token {
            return policy
                .identity_for_token(&t)
                .map(str::to_string)
                .ok_or_else(|| {
                    Denial::new(
                        "unauthenticated",
                        Status::unauthenticated("unknown bearer token"),
                    )
                });
        }
        match cert {
            Some(c) => policy
                .identity_for_cert(&c)
                .map(str::to_string)
                .ok_or_else(|| {
                    Denial::new(
                        "unauthenticated",
                        Status::unauthenticated(format!(
                            "the client certificate '{c}' is not an identity of this hub's policy"
                        )),
                    )
                }),
            None => Err(Denial::new(
                "unauthenticated",
                Status::unauthenticated(
                    "this hub requires credentials: a bearer token or a client certificate",
                ),
            )),
        }
    }

    /// May `identity` call `method` on `peer` (`None`: no such peer)?
    /// A forbidden peer and an unknown one get the same answer, built from
    /// what the caller asked for (`target`) only. On success the returned
    /// permit holds one of the caller's in-flight slots.
    pub fn authorize_call(
        &self,
        identity: &str,
        target: &str,
        peer: Option<PeerView<'_>>,
        method: &str,
    ) -> Result<Option<Permit>, Denial> {
        let Some(policy) = self.current() else {
            return Ok(None);
        };
        let rule = peer.and_then(|p| policy.caller_rule(identity, p, method));
        let Some(rule) = rule else {
            return Err(Denial::new(
                "permission_denied",
                Status::permission_denied(format!(
                    "'{identity}' may not call {method} on '{target}'"
                )),
            ));
        };
        let counter = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(identity.to_string())
            .or_default()
            .clone();
        let n = counter.fetch_add(1, Ordering::AcqRel) + 1;
        let permit = Permit(counter);
        if let Some(max) = rule.max_concurrent {
            if n > max {
                return Err(Denial::new(
                    "max_concurrent",
                    Status::resource_exhausted(format!(
                        "'{identity}' already has {max} calls in flight (max_concurrent)"
                    )),
                ));
            }
        }
        Ok(Some(permit))
    }

    /// May `identity` open a tunnel to `service` on `peer` (`None`: no such
    /// peer)? Like [`authorize_call`](Self::authorize_call): a forbidden peer
    /// and an unknown one get the same answer, and the permit holds one of
    /// the caller's in-flight slots (calls and tunnels together).
    pub fn authorize_tunnel(
        &self,
        identity: &str,
        target: &str,
        peer: Option<PeerView<'_>>,
        service: &str,
    ) -> Result<Option<Permit>, Denial> {
        let Some(policy) = self.current() else {
            return Ok(None);
        };
        let Some(rule) = peer.and_then(|p| policy.tunnel_rule(identity, p, service)) else {
            return Err(Denial::new(
                "permission_denied",
                Status::permission_denied(format!(
                    "'{identity}' may not open tunnel '{service}' on '{target}'"
                )),
            ));
        };
        let counter = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(identity.to_string())
            .or_default()
            .clone();
        let n = counter.fetch_add(1, Ordering::AcqRel) + 1;
        let permit = Permit(counter);
        if let Some(max) = rule.max_concurrent {
            if n > max {
                return Err(Denial::new(
                    "max_concurrent",
                    Status::resource_exhausted(format!(
                        "'{identity}' already has {max} calls and tunnels in flight (max_concurrent)"
                    )),
                ));
            }
        }
        Ok(Some(permit))
    }

    /// May `identity` use the admin API (`Peers.List`, `Peers.Watch`)?
    pub fn authorize_admin(&self, identity: &str) -> Result<(), Denial> {
        match self.current() {
            Some(p) if !p.is_admin(identity) => Err(Denial::new(
                "not_admin",
                Status::permission_denied(format!("'{identity}' is not an admin of this hub")),
            )),
            _ => Ok(()),
        }
    }

    /// May `identity` announce `name` with `labels`?
    pub fn authorize_announce(
        &self,
        identity: &str,
        name: &str,
        labels: &HashMap<String, String>,
    ) -> Result<(), Denial> {
        match self.current() {
            Some(p) if !p.may_announce(identity, name, labels) => Err(Denial::new(
                "announce_denied",
                Status::permission_denied(format!(
                    "'{identity}' may not announce '{name}' with these labels"
                )),
            )),
            _ => Ok(()),
        }
    }
}
