//! Audit events, under the `tracing` target `audit`: one per routed call,
//! announce, handover, refusal and policy reload. Select them with
//! `RUST_LOG=audit=info` (the `backchannel` command shows them by default).
//! Secrets (tokens) never appear; identities are policy names or
//! certificate names.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use tonic::Code;

use crate::{
    hub::{access::Denial, access::Permit, metrics::code_name, metrics::Metrics},
    router::CallObserver,
};

/// Records a refusal: an audit event and `backchannel_hub_denied_total`.
pub fn refused(metrics: &Metrics, denial: &Denial, caller: Option<&str>, what: &str, target: &str) {
    metrics.denied(denial.reason);
    tracing::info!(
        target: "audit",
        event = "refused",
        reason = denial.reason,
        caller = caller.unwrap_or(""),
        what,
        target_peer = target,
        code = code_name(denial.status.code()),
        message = denial.status.message(),
    );
}

/// Records an accepted announce (and a handover when it replaced a session).
pub fn announced(identity: &str, name: &str, peer_id: u64, generation: u64, replaced: Option<u64>) {
    tracing::info!(
        target: "audit",
        event = "announce",
        identity,
        peer = name,
        peer_id,
        generation,
    );
    if let Some(old) = replaced {
        tracing::info!(
            target: "audit",
            event = "handover",
            identity,
            peer = name,
            from_peer_id = old,
            to_peer_id = peer_id,
            generation,
        );
    }
}

/// Records a policy load (at start) or reload attempt.
pub fn policy_reloaded(path: &std::path::Path, result: &Result<(), String>) {
    match result {
        Ok(()) => {
            tracing::info!(target: "audit", event = "policy_reload", path = %path.display(), ok = true)
        }
        Err(e) => {
            tracing::error!(target: "audit", event = "policy_reload", path = %path.display(), ok = false, error = %e)
        }
    }
}

/// Wraps a routed call's observer: holds the caller's in-flight permit and
/// emits the call's audit event when it ends.
pub struct CallAudit {
    inner: Arc<dyn CallObserver>,
    caller: String,
    peer: String,
    peer_id: u64,
    method: String,
    start: Instant,
    to_peer: AtomicU64,
    from_peer: AtomicU64,
    done: AtomicBool,
    permit: Mutex<Option<Permit>>,
}

impl CallAudit {
    /// Audits one call by `caller` of `method` on peer `peer` (`peer_id`).
    pub fn new(
        inner: Arc<dyn CallObserver>,
        caller: String,
        peer: String,
        peer_id: u64,
        method: String,
        permit: Option<Permit>,
    ) -> Self {
        CallAudit {
            inner,
            caller,
            peer,
            peer_id,
            method,
            start: Instant::now(),
            to_peer: AtomicU64::new(0),
            from_peer: AtomicU64::new(0),
            done: AtomicBool::new(false),
            permit: Mutex::new(permit),
        }
    }

    fn emit(&self, code: Option<Code>) {
        if self.done.swap(true, Ordering::AcqRel) {
            return;
        }
        self.permit.lock().unwrap_or_else(|e| e.into_inner()).take();
        tracing::info!(
            target: "audit",
            event = "call",
            caller = %self.caller,
            peer = %self.peer,
            peer_id = self.peer_id,
            method = %self.method,
            status = code.map(code_name).unwrap_or("UNKNOWN"),
            duration_ms = %format_args!("{:.3}", self.start.elapsed().as_secs_f64() * 1000.0),
            bytes_to_peer = self.to_peer.load(Ordering::Relaxed),
            bytes_from_peer = self.from_peer.load(Ordering::Relaxed),
        );
    }
}

impl std::fmt::Debug for CallAudit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallAudit")
            .field("caller", &self.caller)
            .field("peer", &self.peer)
            .field("peer_id", &self.peer_id)
            .field("method", &self.method)
            .finish_non_exhaustive()
    }
}

impl CallObserver for CallAudit {
    fn bytes_to_target(&self, n: u64) {
        self.to_peer.fetch_add(n, Ordering::Relaxed);
        self.inner.bytes_to_target(n);
    }
    fn bytes_from_target(&self, n: u64) {
        self.from_peer.fetch_add(n, Ordering::Relaxed);
        self.inner.bytes_from_target(n);
    }
    fn finished(&self, code: Option<Code>) {
        self.inner.finished(code);
        self.emit(code);
    }
}

impl Drop for CallAudit {
    fn drop(&mut self) {
        self.emit(None);
    }
}
