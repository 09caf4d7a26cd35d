//! The directory of a single process.

use std::{collections::HashMap, sync::Mutex};

use futures::future::BoxFuture;
use tokio::sync::broadcast;

use crate::{Directory, DirectoryError, Entry, Event, Refreshed, Registration};

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    generations: HashMap<String, u64>,
}

/// A [`Directory`] in memory: what one hub on its own needs. Entries do not
/// expire (the process holding them is the process that would refresh them).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use backchannel_directory::{Directory, MemoryDirectory, Registration, Refreshed};
/// let dir = MemoryDirectory::new();
/// let old = dir.claim(Registration::new("db", "a", "a:1", 1, "me")).await.unwrap();
/// let new = dir.claim(Registration::new("db", "b", "b:1", 9, "me")).await.unwrap();
/// assert!(new.generation > old.generation);
/// assert!(matches!(dir.refresh(&old).await.unwrap(), Refreshed::Lost(Some(_))));
/// # }
/// ```
#[derive(Debug)]
pub struct MemoryDirectory {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Event>,
}

impl Default for MemoryDirectory {
    fn default() -> Self {
        MemoryDirectory {
            inner: Mutex::default(),
            events: broadcast::channel(4096).0,
        }
    }
}

impl MemoryDirectory {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Directory for MemoryDirectory {
    fn claim(&self, reg: Registration) -> BoxFuture<'_, Result<Entry, DirectoryError>> {
        let r = (|| {
            let mut t = self.inner();
            if let Some(cur) = t.entries.get(&reg.name) {
                if cur.identity != reg.identity {
                    return Err(DirectoryError::Owned {
                        name: reg.name.clone(),
                        hub_id: cur.hub_id.clone(),
                    });
                }
            }
            let g = t.generations.entry(reg.name.clone()).or_default();
            *g += 1;
            let e = reg.entry(*g);
            t.entries.insert(e.name.clone(), e.clone());
            Ok(e)
        })();
        if let Ok(e) = &r {
            let _ = self.events.send(Event::Claimed(e.clone()));
        }
        Box::pin(async move { r })
    }

    fn refresh<'a>(&'a self, held: &'a Entry) -> BoxFuture<'a, Result<Refreshed, DirectoryError>> {
        let r = {
            let mut t = self.inner();
            match t.entries.get(&held.name) {
                Some(cur) if cur.generation == held.generation && cur.hub_id == held.hub_id => {
                    Refreshed::Kept
                }
                Some(cur) if cur.generation > held.generation => Refreshed::Lost(Some(cur.clone())),
                _ => {
                    let g = t.generations.entry(held.name.clone()).or_default();
                    if *g > held.generation {
                        Refreshed::Lost(None)
                    } else {
                        *g = held.generation;
                        t.entries.insert(held.name.clone(), held.clone());
                        Refreshed::Restored
                    }
                }
            }
        };
        if r == Refreshed::Restored {
            let _ = self.events.send(Event::Claimed(held.clone()));
        }
        Box::pin(async move { Ok(r) })
    }

    fn release<'a>(&'a self, held: &'a Entry) -> BoxFuture<'a, Result<bool, DirectoryError>> {
        let removed = {
            let mut t = self.inner();
            let ours = t
                .entries
                .get(&held.name)
                .is_some_and(|c| c.generation == held.generation && c.hub_id == held.hub_id);
            if ours {
                t.entries.remove(&held.name)
            } else {
                None
            }
        };
        let done = removed.is_some();
        if let Some(e) = removed {
            let _ = self.events.send(Event::Released(e));
        }
        Box::pin(async move { Ok(done) })
    }

    fn lookup<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Entry>, DirectoryError>> {
        let r = self.inner().entries.get(name).cloned();
        Box::pin(async move { Ok(r) })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Entry>, DirectoryError>> {
        let mut v: Vec<Entry> = self.inner().entries.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Box::pin(async move { Ok(v) })
    }

    fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn is_connected(&self) -> bool {
        true
    }
}
