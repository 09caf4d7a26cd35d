//! The routing directory of a cluster of backchannel hubs: which hub holds
//! which peer name, with fenced ownership.
//!
//! Every hub records, for each named peer it holds, an [`Entry`]
//! (`name -> {hub id, hub address, peer id, generation, identity, labels}`)
//! and looks up the names it does not hold. A name's **generation** grows
//! with every handover ([`Directory::claim`]): the newest claim wins, and a
//! hub never overwrites an entry with a higher generation than its own
//! ([`Directory::refresh`] answers [`Refreshed::Lost`] instead), so a hub
//! that lost a name learns it and stops routing to its stale session.
//!
//! Two implementations:
//! - [`MemoryDirectory`]: one process (a single hub, or tests).
//! - [`RedisDirectory`]: shared by every hub of a cluster on one Redis
//!   server. Entries expire after a TTL unless refreshed; claims and
//!   releases are published (Redis pub/sub) so every hub invalidates its
//!   cache without polling. Every Redis call has a timeout: a hub never
//!   blocks on an unreachable Redis.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use backchannel_directory::{Directory, MemoryDirectory, Registration};
//! let dir = MemoryDirectory::new();
//! let e = dir
//!     .claim(Registration::new("db", "hub-a", "10.0.0.1:7443", 7, "team-db"))
//!     .await
//!     .unwrap();
//! assert_eq!(e.generation, 1);
//! assert_eq!(dir.lookup("db").await.unwrap().unwrap().hub_id, "hub-a");
//! # }
//! ```

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

mod memory;
mod redis_dir;

pub use memory::MemoryDirectory;
pub use redis_dir::{store_label, url_has_password, RedisConfig, RedisDirectory};

/// Who holds a name, as the directory records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The peer's announced name.
    pub name: String,
    /// The hub holding the peer's session.
    pub hub_id: String,
    /// Where other hubs reach that hub (`host:port`).
    pub addr: String,
    /// The peer's ID on that hub.
    #[serde(with = "u64_string")]
    pub peer_id: u64,
    /// The name's generation when that hub took it.
    pub generation: u64,
    /// The identity that announced the name: only it may take the name over
    /// on another hub while the entry lives.
    pub identity: String,
    /// The peer's announced labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// What a hub records when one of its peers announces a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// The name.
    pub name: String,
    /// The hub registering it.
    pub hub_id: String,
    /// That hub's address for other hubs.
    pub addr: String,
    /// The peer's ID on that hub.
    pub peer_id: u64,
    /// Who announced it.
    pub identity: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

impl Registration {
    /// A registration without labels.
    ///
    /// ```
    /// let r = backchannel_directory::Registration::new("db", "hub-a", "h:1", 3, "anonymous");
    /// assert!(r.labels.is_empty());
    /// ```
    pub fn new(
        name: impl Into<String>,
        hub_id: impl Into<String>,
        addr: impl Into<String>,
        peer_id: u64,
        identity: impl Into<String>,
    ) -> Self {
        Registration {
            name: name.into(),
            hub_id: hub_id.into(),
            addr: addr.into(),
            peer_id,
            identity: identity.into(),
            labels: BTreeMap::new(),
        }
    }

    /// With these labels.
    pub fn with_labels(mut self, labels: BTreeMap<String, String>) -> Self {
        self.labels = labels;
        self
    }

    fn entry(&self, generation: u64) -> Entry {
        Entry {
            name: self.name.clone(),
            hub_id: self.hub_id.clone(),
            addr: self.addr.clone(),
            peer_id: self.peer_id,
            generation,
            identity: self.identity.clone(),
            labels: self.labels.clone(),
        }
    }
}

/// What [`Directory::refresh`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refreshed {
    /// The entry was ours; its TTL starts over.
    Kept,
    /// The entry was gone (expired, or the store lost it) and no newer
    /// generation exists: it is recorded again.
    Restored,
    /// A newer generation of the name exists (shown when it is still
    /// recorded): the name is no longer ours.
    Lost(Option<Entry>),
}

/// A change in the directory, as every hub hears it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A hub took (or re-recorded) a name.
    Claimed(Entry),
    /// A hub let a name go.
    Released(Entry),
    /// The event feed is (again) connected: events may have been missed,
    /// caches were dropped, and what a hub holds should be recorded again.
    Connected,
    /// The event feed was lost (the store is unreachable).
    Disconnected(String),
}

/// Why a directory operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DirectoryError {
    /// The store could not be reached or answered with an error.
    #[error("the cluster directory ({store}) is unreachable: {reason}")]
    Unreachable {
        /// Which store (`redis://host:port`).
        store: String,
        /// What failed.
        reason: String,
    },
    /// The store did not answer in time.
    #[error("the cluster directory ({store}) did not answer within {after:?}")]
    Timeout {
        /// Which store.
        store: String,
        /// The timeout.
        after: std::time::Duration,
    },
    /// The name is held by another identity.
    #[error("name '{name}' belongs to another identity (held on hub '{hub_id}')")]
    Owned {
        /// The name.
        name: String,
        /// The hub holding it.
        hub_id: String,
    },
    /// An entry in the store does not parse.
    #[error("the cluster directory holds a malformed entry: {0}")]
    Malformed(String),
    /// A bad configuration (URL, namespace).
    #[error("cluster directory configuration: {0}")]
    Config(String),
}

/// The routing directory: a trait so that a single hub (in memory) and a
/// cluster (on Redis) route the same way.
pub trait Directory: Send + Sync + std::fmt::Debug + 'static {
    /// Takes `name` for this registration with a new, larger generation,
    /// unless a live entry belongs to another identity
    /// ([`DirectoryError::Owned`]). Every hub hears [`Event::Claimed`].
    fn claim(&self, reg: Registration) -> BoxFuture<'_, Result<Entry, DirectoryError>>;

    /// Keeps `held` alive (its TTL starts over), records it again if it
    /// vanished and no newer generation exists, or says it was lost.
    fn refresh<'a>(&'a self, held: &'a Entry) -> BoxFuture<'a, Result<Refreshed, DirectoryError>>;

    /// Removes `held` if it is still the recorded generation (returns
    /// whether it was); every hub hears [`Event::Released`].
    fn release<'a>(&'a self, held: &'a Entry) -> BoxFuture<'a, Result<bool, DirectoryError>>;

    /// Who holds `name` now.
    fn lookup<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Entry>, DirectoryError>>;

    /// Every recorded entry, in name order.
    fn list(&self) -> BoxFuture<'_, Result<Vec<Entry>, DirectoryError>>;

    /// Changes from now on.
    fn events(&self) -> broadcast::Receiver<Event>;

    /// Whether the event feed is connected now (lookups may be cached only
    /// while it is).
    fn is_connected(&self) -> bool;
}

mod u64_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
