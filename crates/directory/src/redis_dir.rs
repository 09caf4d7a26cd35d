//! The directory of a cluster, on Redis.
//!
//! Keys, under a namespace `NS` (default `backchannel`):
//! - `NS:peer:NAME`: the [`Entry`] as JSON, with a TTL (`PX`).
//! - `NS:gen:NAME`: the name's generation counter (no TTL: a name's
//!   generation only grows, even after its entry expired).
//! - channel `NS:events`: `C<json>` on every claim, `R<json>` on a release.
//!
//! Claims, refreshes and releases are Lua scripts, so each is atomic: the
//! generation is incremented and the entry written in one step, and a hub
//! never overwrites an entry with a higher generation than its own.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use futures::{future::BoxFuture, StreamExt};
use redis::{aio::ConnectionManager, AsyncCommands, Script};
use tokio::sync::broadcast;

use crate::{Directory, DirectoryError, Entry, Event, Refreshed, Registration};

const CLAIM: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, e = pcall(cjson.decode, cur)
  if ok and type(e) == 'table' and e.identity ~= ARGV[2] then return {0, cur} end
end
local gen = redis.call('INCR', KEYS[2])
local e = cjson.decode(ARGV[1])
e.generation = gen
local s = cjson.encode(e)
redis.call('SET', KEYS[1], s, 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], 'C' .. s)
return {1, s}
"#;

const REFRESH: &str = r#"
local mine = tonumber(ARGV[2])
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, e = pcall(cjson.decode, cur)
  if ok and type(e) == 'table' then
    local g = tonumber(e.generation) or 0
    if g == mine and e.hub_id == ARGV[3] then
      redis.call('PEXPIRE', KEYS[1], ARGV[4])
      return {1, ''}
    end
    if g > mine then return {0, cur} end
  end
end
local g = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if g > mine then return {0, ''} end
if g < mine then redis.call('SET', KEYS[2], ARGV[2]) end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
redis.call('PUBLISH', ARGV[5], 'C' .. ARGV[1])
return {2, ''}
"#;

const RELEASE: &str = r#"
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local ok, e = pcall(cjson.decode, cur)
if not ok or type(e) ~= 'table' then return 0 end
if tonumber(e.generation) ~= tonumber(ARGV[1]) or e.hub_id ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[3], 'R' .. cur)
return 1
"#;

/// How a [`RedisDirectory`] is set up.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://HOST:PORT[/DB]`.
    pub url: String,
    /// The ACL user to authenticate as (Redis 6+; `None`: `default`).
    pub username: Option<String>,
    /// The password to authenticate with (`AUTH`), if the server wants
    /// one; not together with one in `url`. Never printed by `Debug`.
    pub password: Option<String>,
    /// For a `rediss://` URL: the CA certificate(s) (PEM) to verify the
    /// server with, instead of the system's trust store.
    pub tls_ca_pem: Option<Vec<u8>>,
    /// For a `rediss://` URL: this client's certificate and private key
    /// (PEM), for servers that check clients (`tls-auth-clients`). The key
    /// is never printed by `Debug`.
    pub tls_client_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// Key prefix: hubs sharing it form one cluster.
    pub namespace: String,
    /// How long an entry lives unless refreshed.
    pub ttl: Duration,
    /// The longest any one Redis call may take.
    pub timeout: Duration,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &store_label(&self.url))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls_ca_pem", &self.tls_ca_pem.as_ref().map(Vec::len))
            .field(
                "tls_client_pem",
                &self.tls_client_pem.as_ref().map(|_| "<redacted>"),
            )
            .field("namespace", &self.namespace)
            .field("ttl", &self.ttl)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl RedisConfig {
    /// Defaults: namespace `backchannel`, TTL 15 s, timeout 1 s.
    ///
    /// ```
    /// let c = backchannel_directory::RedisConfig::new("redis://127.0.0.1:6379");
    /// assert_eq!(c.ttl, std::time::Duration::from_secs(15));
    /// ```
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            username: None,
            password: None,
            tls_ca_pem: None,
            tls_client_pem: None,
            namespace: "backchannel".into(),
            ttl: Duration::from_secs(15),
            timeout: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Default)]
struct Cache {
    /// Bumped by every event: a lookup that started before an event must
    /// not cache what it read.
    epoch: u64,
    names: HashMap<String, (Option<Entry>, Instant)>,
}

#[derive(Debug)]
struct Shared {
    events: broadcast::Sender<Event>,
    connected: AtomicBool,
    cache: Mutex<Cache>,
    ttl: Duration,
    hits: AtomicU64,
}

impl Shared {
    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn invalidate(&self, name: Option<&str>) {
        let mut c = self.cache();
        c.epoch += 1;
        match name {
            Some(n) => {
                c.names.remove(n);
            }
            None => c.names.clear(),
        }
    }
}

/// A [`Directory`] shared by the hubs of a cluster on one Redis server.
///
/// Never blocks on Redis: the connection is made lazily and re-made by
/// redis's `ConnectionManager`, every call is bounded by
/// [`RedisConfig::timeout`], and lookups are cached (invalidated by the
/// event feed, and only used while it is connected).
///
/// ```no_run
/// # #[tokio::main] async fn main() -> Result<(), backchannel_directory::DirectoryError> {
/// use backchannel_directory::{Directory, RedisConfig, RedisDirectory};
/// let dir = RedisDirectory::start(RedisConfig::new("redis://127.0.0.1:6379"))?;
/// if let Some(e) = dir.lookup("db").await? {
///     println!("'db' is on hub {} at {}", e.hub_id, e.addr);
/// }
/// # Ok(()) }
/// ```
pub struct RedisDirectory {
    cfg: RedisConfig,
    store: String,
    conn: ConnectionManager,
    shared: Arc<Shared>,
    feed: tokio::task::JoinHandle<()>,
    claim: Script,
    refresh: Script,
    release: Script,
}

impl std::fmt::Debug for RedisDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDirectory")
            .field("store", &self.store)
            .field("namespace", &self.cfg.namespace)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl Drop for RedisDirectory {
    fn drop(&mut self) {
        self.feed.abort();
    }
}

/// `redis://host:port/db` without credentials, for messages.
///
/// ```
/// assert_eq!(backchannel_directory::store_label("redis://u:pw@h:1/2"), "redis://h:1/2");
/// ```
pub fn store_label(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
            format!("{scheme}://{rest}")
        }
        None => url.to_string(),
    }
}

/// Whether a Redis URL carries a password (`redis://[user]:PASSWORD@...`).
///
/// ```
/// assert!(backchannel_directory::url_has_password("redis://:pw@h:1"));
/// assert!(!backchannel_directory::url_has_password("redis://h:1"));
/// ```
pub fn url_has_password(url: &str) -> bool {
    redis::IntoConnectionInfo::into_connection_info(url)
        .is_ok_and(|i| i.redis_settings().password().is_some())
}

/// Whether a Redis address is this machine's (loopback or a Unix socket).
fn is_local(addr: &redis::ConnectionAddr) -> bool {
    let host = match addr {
        redis::ConnectionAddr::Tcp(host, _) | redis::ConnectionAddr::TcpTls { host, .. } => host,
        _ => return true,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl RedisDirectory {
    /// Connects lazily (returns at once, even if Redis is down) and starts
    /// following the event feed, on the current tokio runtime.
    pub fn start(cfg: RedisConfig) -> Result<Arc<Self>, DirectoryError> {
        let store = store_label(&cfg.url);
        if cfg.namespace.is_empty() || cfg.namespace.contains(char::is_whitespace) {
            return Err(DirectoryError::Config(
                "the namespace must be non-empty, without spaces".into(),
            ));
        }
        let bad = |e: redis::RedisError| DirectoryError::Config(format!("'{store}': {e}"));
        let info =
            redis::IntoConnectionInfo::into_connection_info(cfg.url.as_str()).map_err(bad)?;
        let mut auth = info.redis_settings().clone();
        if cfg.password.is_some() && auth.password().is_some() {
            return Err(DirectoryError::Config(format!(
                "'{store}': a password in the URL and one given apart: give one, not both"
            )));
        }
        let tls = cfg.url.starts_with("rediss://");
        if (cfg.password.is_some() || auth.password().is_some()) && !tls && !is_local(info.addr()) {
            tracing::warn!(
                "the Redis password travels in plaintext to {store}: use rediss:// (TLS)"
            );
        }
        if let Some(u) = &cfg.username {
            auth = auth.set_username(u);
        }
        if let Some(p) = &cfg.password {
            auth = auth.set_password(p);
        }
        let info = info.set_redis_settings(auth);
        if !tls && (cfg.tls_ca_pem.is_some() || cfg.tls_client_pem.is_some()) {
            return Err(DirectoryError::Config(format!(
                "'{store}': TLS certificates are given, but the URL is not rediss://"
            )));
        }
        let client = if tls {
            redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: cfg.tls_client_pem.as_ref().map(|(cert, key)| {
                        redis::ClientTlsConfig {
                            client_cert: cert.clone(),
                            client_key: key.clone(),
                        }
                    }),
                    root_cert: cfg.tls_ca_pem.clone(),
                },
            )
        } else {
            redis::Client::open(info)
        }
        .map_err(bad)?;
        let mc = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), mc)
            .map_err(|e| DirectoryError::Config(format!("'{store}': {e}")))?;
        let shared = Arc::new(Shared {
            events: broadcast::channel(8192).0,
            connected: AtomicBool::new(false),
            cache: Mutex::default(),
            ttl: cfg.ttl,
            hits: AtomicU64::new(0),
        });
        let channel = format!("{}:events", cfg.namespace);
        let feed = tokio::spawn(follow(client, channel, shared.clone(), cfg.timeout));
        Ok(Arc::new(RedisDirectory {
            cfg,
            store,
            conn,
            shared,
            feed,
            claim: Script::new(CLAIM),
            refresh: Script::new(REFRESH),
            release: Script::new(RELEASE),
        }))
    }

    /// Lookups answered from the cache so far.
    pub fn cache_hits(&self) -> u64 {
        self.shared.hits.load(Ordering::Relaxed)
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}:{kind}:{name}", self.cfg.namespace)
    }

    fn channel(&self) -> String {
        format!("{}:events", self.cfg.namespace)
    }

    fn ttl_ms(&self) -> u64 {
        self.cfg.ttl.as_millis().clamp(1, u128::from(u64::MAX)) as u64
    }

    async fn bounded<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, DirectoryError> {
        match tokio::time::timeout(self.cfg.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(DirectoryError::Unreachable {
                store: self.store.clone(),
                reason: e.to_string(),
            }),
            Err(_) => Err(DirectoryError::Timeout {
                store: self.store.clone(),
                after: self.cfg.timeout,
            }),
        }
    }
}

fn parse(s: &str) -> Result<Entry, DirectoryError> {
    serde_json::from_str(s).map_err(|e| DirectoryError::Malformed(e.to_string()))
}

fn to_json(e: &Entry) -> String {
    serde_json::to_string(e).unwrap_or_default()
}

impl Directory for RedisDirectory {
    fn claim(&self, reg: Registration) -> BoxFuture<'_, Result<Entry, DirectoryError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let json = to_json(&reg.entry(0));
            let mut inv = self.claim.key(self.key("peer", &reg.name));
            inv.key(self.key("gen", &reg.name))
                .arg(json)
                .arg(&reg.identity)
                .arg(self.ttl_ms())
                .arg(self.channel());
            let (won, s): (i64, String) = self.bounded(inv.invoke_async(&mut conn)).await?;
            let e = parse(&s)?;
            if won == 0 {
                return Err(DirectoryError::Owned {
                    name: reg.name,
                    hub_id: e.hub_id,
                });
            }
            self.shared.invalidate(Some(&e.name));
            Ok(e)
        })
    }

    fn refresh<'a>(&'a self, held: &'a Entry) -> BoxFuture<'a, Result<Refreshed, DirectoryError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut inv = self.refresh.key(self.key("peer", &held.name));
            inv.key(self.key("gen", &held.name))
                .arg(to_json(held))
                .arg(held.generation)
                .arg(&held.hub_id)
                .arg(self.ttl_ms())
                .arg(self.channel());
            let (r, s): (i64, String) = self.bounded(inv.invoke_async(&mut conn)).await?;
            Ok(match r {
                1 => Refreshed::Kept,
                2 => Refreshed::Restored,
                _ => Refreshed::Lost(parse(&s).ok()),
            })
        })
    }

    fn release<'a>(&'a self, held: &'a Entry) -> BoxFuture<'a, Result<bool, DirectoryError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut inv = self.release.key(self.key("peer", &held.name));
            inv.arg(held.generation)
                .arg(&held.hub_id)
                .arg(self.channel());
            let r: i64 = self.bounded(inv.invoke_async(&mut conn)).await?;
            self.shared.invalidate(Some(&held.name));
            Ok(r == 1)
        })
    }

    fn lookup<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Entry>, DirectoryError>> {
        Box::pin(async move {
            let connected = self.is_connected();
            let epoch = {
                let c = self.shared.cache();
                if connected {
                    if let Some((e, at)) = c.names.get(name) {
                        if at.elapsed() < self.shared.ttl {
                            self.shared.hits.fetch_add(1, Ordering::Relaxed);
                            return Ok(e.clone());
                        }
                    }
                }
                c.epoch
            };
            let mut conn = self.conn.clone();
            let key = self.key("peer", name);
            let v: Option<String> = self.bounded(conn.get(key)).await?;
            let e = v.as_deref().map(parse).transpose()?;
            if connected && self.is_connected() {
                let mut c = self.shared.cache();
                if c.epoch == epoch {
                    if c.names.len() > 100_000 {
                        c.names.clear();
                    }
                    c.names
                        .insert(name.to_string(), (e.clone(), Instant::now()));
                }
            }
            Ok(e)
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Entry>, DirectoryError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let pattern = format!("{}:peer:*", self.cfg.namespace);
            let mut cursor: u64 = 0;
            let mut out = Vec::new();
            loop {
                let (next, keys): (u64, Vec<String>) = self
                    .bounded(
                        redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(&pattern)
                            .arg("COUNT")
                            .arg(1000)
                            .query_async(&mut conn),
                    )
                    .await?;
                if !keys.is_empty() {
                    let vals: Vec<Option<String>> = self
                        .bounded(redis::cmd("MGET").arg(&keys).query_async(&mut conn))
                        .await?;
                    out.extend(vals.iter().flatten().filter_map(|s| parse(s).ok()));
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            out.dedup_by(|a, b| a.name == b.name);
            Ok(out)
        })
    }

    fn events(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }
}

/// Follows the event feed for ever, reconnecting (0.2 s to 2 s apart).
async fn follow(client: redis::Client, channel: String, shared: Arc<Shared>, timeout: Duration) {
    let mut delay = Duration::from_millis(200);
    // Each new reason for not reaching Redis is logged once (a wrong
    // password must not fail silently, nor flood the log while it lasts).
    let mut last_failure: Option<String> = None;
    let failed = |why: String, last: &mut Option<String>| {
        if last.as_deref() != Some(why.as_str()) {
            tracing::warn!(reason = %why, "cluster directory: cannot subscribe to Redis; retrying");
            *last = Some(why);
        }
    };
    loop {
        let sub = async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(ps)
        };
        match tokio::time::timeout(timeout, sub).await {
            Ok(Ok(ps)) => {
                delay = Duration::from_millis(200);
                last_failure = None;
                shared.invalidate(None);
                shared.connected.store(true, Ordering::SeqCst);
                tracing::info!("cluster directory: event feed connected");
                let _ = shared.events.send(Event::Connected);
                let mut msgs = ps.into_on_message();
                while let Some(m) = msgs.next().await {
                    let payload: String = match m.get_payload() {
                        Ok(p) => p,
                        Err(_) => continue,
                    };
                    let (kind, body) = payload.split_at(payload.len().min(1));
                    let Ok(e) = parse(body) else {
                        tracing::warn!("cluster directory: malformed event ignored");
                        continue;
                    };
                    shared.invalidate(Some(&e.name));
                    let ev = match kind {
                        "C" => Event::Claimed(e),
                        "R" => Event::Released(e),
                        _ => continue,
                    };
                    let _ = shared.events.send(ev);
                }
                shared.connected.store(false, Ordering::SeqCst);
                shared.invalidate(None);
                tracing::warn!("cluster directory: event feed lost; reconnecting");
                let _ = shared
                    .events
                    .send(Event::Disconnected("the Redis connection closed".into()));
            }
            Ok(Err(e)) => {
                if shared.connected.swap(false, Ordering::SeqCst) {
                    let _ = shared.events.send(Event::Disconnected(e.to_string()));
                }
                failed(e.to_string(), &mut last_failure);
            }
            Err(_) => {
                failed(format!("no answer within {timeout:?}"), &mut last_failure);
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_addresses() {
        let addr = |u: &str| {
            redis::IntoConnectionInfo::into_connection_info(u)
                .unwrap()
                .addr()
                .clone()
        };
        for u in [
            "redis://127.0.0.1:6379",
            "redis://localhost:1/2",
            "redis://:pw@127.0.0.2:1",
            "redis://[::1]:6379",
        ] {
            assert!(is_local(&addr(u)), "{u}");
        }
        for u in [
            "redis://10.0.0.1:6379",
            "redis://redis.internal:1",
            "redis://[2001:db8::1]:1",
        ] {
            assert!(!is_local(&addr(u)), "{u}");
        }
    }

    #[test]
    fn store_label_hides_credentials() {
        assert_eq!(
            store_label("redis://user:secret@10.0.0.1:6379/2"),
            "redis://10.0.0.1:6379/2"
        );
        assert_eq!(store_label("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn entries_round_trip_through_json() {
        let e = Registration::new("db", "a", "h:1", u64::MAX, "me").entry(7);
        assert_eq!(parse(&to_json(&e)).unwrap(), e);
    }
}
