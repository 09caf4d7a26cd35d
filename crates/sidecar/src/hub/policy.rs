//! The hub's access policy (`backchannel hub --policy FILE`): who is who,
//! which names an identity may announce, which peers and methods an identity
//! may call, and who may use the admin API. Everything not allowed is denied.
//!
//! ```toml
//! [identity.billing]
//! token_sha256 = "<hex sha-256 of the token>"
//! [identity.inventory-agent]
//! cert_uri = "spiffe://example.org/agent/inventory"
//! [identity.ops]
//! cert_dns = "ops.example.org"
//!
//! [[agents]]
//! identity = "inventory-agent"
//! names = ["inventory", "inventory-*"]
//!
//! [[callers]]
//! identity = "billing"
//! peers = ["inventory"]
//! methods = ["/backchannel.testing.v1.Echo/*"]
//! max_concurrent = 64
//!
//! # Tunnels (`backchannel tunnel`): a rule with `tunnels` allows those
//! # services; with `tunnels` and no `methods` it allows no calls.
//! [[callers]]
//! identity = "ops"
//! peers = ["inventory"]
//! tunnels = ["ssh"]
//!
//! [[admins]]
//! identity = "ops"
//! ```

use std::{collections::HashMap, ops::Range, path::Path};

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Deserialize;
use subtle::ConstantTimeEq;
use toml::Spanned;

use crate::hub::identity::{parse_sha256_hex, token_sha256, CertName};

/// The rule identity that stands for every authenticated identity.
pub const ANY: &str = "*";

/// Why a policy file was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read the policy {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid policy.
    #[error("{path} line {line}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// 1-based line of the offending entry.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// A parsed, validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    identities: Vec<IdentityDef>,
    agents: Vec<AgentRule>,
    callers: Vec<CallerRule>,
    admins: Vec<String>,
}

#[derive(Debug, Clone)]
struct IdentityDef {
    name: String,
    tokens: Vec<[u8; 32]>,
    cert_uri: Option<String>,
    cert_dns: Option<String>,
}

#[derive(Debug, Clone)]
struct AgentRule {
    identity: String,
    names: GlobSet,
    /// Globs on `KEY=VALUE` the identity may announce; `None`: any labels.
    labels: Option<GlobSet>,
}

/// One `[[callers]]` rule.
#[derive(Debug, Clone)]
pub struct CallerRule {
    identity: String,
    names: GlobSet,
    labels: Vec<(String, String)>,
    methods: Option<GlobSet>,
    /// Tunnel services (`backchannel tunnel --service`) the rule allows;
    /// `None`: no tunnels.
    tunnels: Option<GlobSet>,
    /// Most routed calls the caller may have in flight under this rule.
    pub max_concurrent: Option<u32>,
}

/// What a caller rule looks at in a peer.
#[derive(Debug, Clone, Copy)]
pub struct PeerView<'a> {
    /// The announced name (empty if none).
    pub name: &'a str,
    /// The announced labels.
    pub labels: &'a HashMap<String, String>,
}

// ------------------------------------------------------------ the file format

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    identity: std::collections::BTreeMap<String, Spanned<RawIdentity>>,
    #[serde(default)]
    agents: Vec<Spanned<RawAgents>>,
    #[serde(default)]
    callers: Vec<Spanned<RawCaller>>,
    #[serde(default)]
    admins: Vec<Spanned<RawAdmin>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    token_sha256: Option<Spanned<OneOrMany>>,
    cert_uri: Option<Spanned<String>>,
    cert_dns: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgents {
    identity: Spanned<String>,
    names: Spanned<Vec<Spanned<String>>>,
    labels: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCaller {
    identity: Spanned<String>,
    peers: Spanned<Vec<Spanned<String>>>,
    methods: Option<Spanned<Vec<Spanned<String>>>>,
    tunnels: Option<Spanned<Vec<Spanned<String>>>>,
    max_concurrent: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    identity: Spanned<String>,
}

struct Ctx<'a> {
    path: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn line(&self, span: Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }
    fn err(&self, span: Range<usize>, message: impl Into<String>) -> PolicyError {
        PolicyError::Invalid {
            path: self.path.to_string(),
            line: self.line(span),
            message: message.into(),
        }
    }
}

/// Identity names become the `backchannel-caller` metadata value: keep them
/// to characters that are safe in a header and in logs.
fn valid_identity_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:@/".contains(&b))
}

fn glob_set(ctx: &Ctx, what: &str, pats: &[Spanned<String>]) -> Result<GlobSet, PolicyError> {
    let mut b = GlobSetBuilder::new();
    for p in pats {
        let g = Glob::new(p.get_ref()).map_err(|e| {
            ctx.err(
                p.span(),
                format!("bad {what} pattern '{}': {e}", p.get_ref()),
            )
        })?;
        b.add(g);
    }
    b.build()
        .map_err(|e| ctx.err(pats[0].span(), format!("bad {what} patterns: {e}")))
}

impl Policy {
    /// Reads and validates the policy in `path`.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Policy::parse(&path.display().to_string(), &text)
    }

    /// Parses policy text; `path` names it in errors.
    ///
    /// ```
    /// use backchannel_sidecar::hub::policy::Policy;
    /// let p = Policy::parse("p.toml", r#"
    /// [identity.ops]
    /// cert_dns = "ops.example.org"
    /// [[admins]]
    /// identity = "ops"
    /// "#).unwrap();
    /// assert!(p.is_admin("ops"));
    /// let err = Policy::parse("p.toml", "[[admins]]\nidentity = \"nobody\"\n").unwrap_err();
    /// assert_eq!(err.to_string(), "p.toml line 2: unknown identity 'nobody'");
    /// ```
    pub fn parse(path: &str, text: &str) -> Result<Policy, PolicyError> {
        let ctx = Ctx { path, text };
        let raw: RawPolicy = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| ctx.line(s)).unwrap_or(1);
            PolicyError::Invalid {
                path: path.to_string(),
                line,
                message: e.message().trim().to_string(),
            }
        })?;

        let mut identities = Vec::new();
        let mut seen_tokens: Vec<[u8; 32]> = Vec::new();
        let mut seen_certs: Vec<CertName> = Vec::new();
        for (name, def) in &raw.identity {
            let span = def.span();
            let def = def.get_ref();
            if !valid_identity_name(name) || name == ANY {
                return Err(ctx.err(
                    span,
                    format!(
                        "identity name '{name}' may only use ASCII letters, digits and ._-:@/ (1 to 128)"
                    ),
                ));
            }
            let mut tokens = Vec::new();
            if let Some(t) = &def.token_sha256 {
                let list = match t.get_ref() {
                    OneOrMany::One(s) => vec![s.clone()],
                    OneOrMany::Many(v) => v.clone(),
                };
                if list.is_empty() {
                    return Err(ctx.err(t.span(), "token_sha256 is an empty list"));
                }
                for h in list {
                    let d = parse_sha256_hex(&h).ok_or_else(|| {
                        ctx.err(
                            t.span(),
                            "token_sha256 must be 64 hex digits (the SHA-256 of the token, e.g. `printf %s \"$TOKEN\" | sha256sum`)",
                        )
                    })?;
                    if seen_tokens.contains(&d) {
                        return Err(
                            ctx.err(t.span(), "the same token hash belongs to two identities")
                        );
                    }
                    seen_tokens.push(d);
                    tokens.push(d);
                }
            }
            let cert = |v: &Option<Spanned<String>>,
                        mk: fn(String) -> CertName,
                        seen: &mut Vec<CertName>|
             -> Result<Option<String>, PolicyError> {
                let Some(v) = v else { return Ok(None) };
                let s = v.get_ref().trim().to_string();
                if s.is_empty() {
                    return Err(ctx.err(v.span(), "an empty certificate name"));
                }
                let c = mk(s.clone());
                if seen.contains(&c) {
                    return Err(ctx.err(
                        v.span(),
                        format!("certificate name '{s}' belongs to two identities"),
                    ));
                }
                seen.push(c);
                Ok(Some(s))
            };
            let cert_uri = cert(&def.cert_uri, CertName::Uri, &mut seen_certs)?;
            let cert_dns = cert(&def.cert_dns, CertName::Dns, &mut seen_certs)?;
            if tokens.is_empty() && cert_uri.is_none() && cert_dns.is_none() {
                return Err(ctx.err(
                    span,
                    format!("identity '{name}' has no token_sha256, cert_uri or cert_dns"),
                ));
            }
            identities.push(IdentityDef {
                name: name.clone(),
                tokens,
                cert_uri,
                cert_dns,
            });
        }

        let known = |id: &Spanned<String>| -> Result<String, PolicyError> {
            let s = id.get_ref();
            if s == ANY || raw.identity.contains_key(s) {
                Ok(s.clone())
            } else {
                Err(ctx.err(id.span(), format!("unknown identity '{s}'")))
            }
        };

        let mut agents = Vec::new();
        for a in &raw.agents {
            let a = a.get_ref();
            if a.names.get_ref().is_empty() {
                return Err(ctx.err(a.names.span(), "names must not be empty"));
            }
            let labels = match &a.labels {
                None => None,
                Some(l) if l.get_ref().is_empty() => Some(GlobSet::empty()),
                Some(l) => {
                    for p in l.get_ref() {
                        if !p.get_ref().contains('=') {
                            return Err(ctx.err(
                                p.span(),
                                format!("label pattern '{}' is not KEY=VALUE", p.get_ref()),
                            ));
                        }
                    }
                    Some(glob_set(&ctx, "label", l.get_ref())?)
                }
            };
            agents.push(AgentRule {
                identity: known(&a.identity)?,
                names: glob_set(&ctx, "name", a.names.get_ref())?,
                labels,
            });
        }

        let mut callers = Vec::new();
        for c in &raw.callers {
            let c = c.get_ref();
            if c.peers.get_ref().is_empty() {
                return Err(ctx.err(c.peers.span(), "peers must not be empty"));
            }
            let mut names = Vec::new();
            let mut labels = Vec::new();
            for p in c.peers.get_ref() {
                match p.get_ref().strip_prefix("label:") {
                    Some(kv) => {
                        let (k, v) = kv
                            .split_once('=')
                            .filter(|(k, _)| !k.is_empty())
                            .ok_or_else(|| {
                                ctx.err(
                                    p.span(),
                                    format!("'{}' is not label:KEY=VALUE", p.get_ref()),
                                )
                            })?;
                        labels.push((k.to_string(), v.to_string()));
                    }
                    None => names.push(p.clone()),
                }
            }
            let tunnels = match &c.tunnels {
                None => None,
                Some(t) if t.get_ref().is_empty() => {
                    return Err(ctx.err(
                        t.span(),
                        "tunnels must not be empty (leave it out to allow no tunnels)",
                    ))
                }
                Some(t) => Some(glob_set(&ctx, "tunnel service", t.get_ref())?),
            };
            let methods = match &c.methods {
                // A rule for tunnels allows calls only where it lists methods.
                None if tunnels.is_some() => Some(GlobSet::empty()),
                None => None,
                Some(m) if m.get_ref().is_empty() => {
                    return Err(ctx.err(
                        m.span(),
                        "methods must not be empty (leave it out to allow every method)",
                    ))
                }
                Some(m) => Some(glob_set(&ctx, "method", m.get_ref())?),
            };
            let max_concurrent = match &c.max_concurrent {
                Some(m) if *m.get_ref() == 0 => {
                    return Err(ctx.err(m.span(), "max_concurrent must be at least 1"))
                }
                m => m.as_ref().map(|m| *m.get_ref()),
            };
            callers.push(CallerRule {
                identity: known(&c.identity)?,
                names: if names.is_empty() {
                    GlobSet::empty()
                } else {
                    glob_set(&ctx, "peer", &names)?
                },
                labels,
                methods,
                tunnels,
                max_concurrent,
            });
        }

        let mut admins = Vec::new();
        for a in &raw.admins {
            admins.push(known(&a.get_ref().identity)?);
        }
        Ok(Policy {
            identities,
            agents,
            callers,
            admins,
        })
    }

    /// The identity whose token hash matches `token`. Every stored hash is
    /// compared, in constant time, whatever matches first.
    pub fn identity_for_token(&self, token: &str) -> Option<&str> {
        let digest = token_sha256(token);
        let mut found = None;
        for id in &self.identities {
            for t in &id.tokens {
                if bool::from(t.ct_eq(&digest)) {
                    found = Some(id.name.as_str());
                }
            }
        }
        found
    }

    /// The identity a certificate name belongs to.
    pub fn identity_for_cert(&self, cert: &CertName) -> Option<&str> {
        self.identities
            .iter()
            .find(|id| match cert {
                CertName::Uri(u) => id.cert_uri.as_deref() == Some(u.as_str()),
                CertName::Dns(d) => id
                    .cert_dns
                    .as_deref()
                    .is_some_and(|x| x.eq_ignore_ascii_case(d)),
            })
            .map(|id| id.name.as_str())
    }

    /// Whether `identity` may announce `name` with `labels`: some rule of
    /// that identity matches the name and (if it lists labels) every label.
    pub fn may_announce(
        &self,
        identity: &str,
        name: &str,
        labels: &HashMap<String, String>,
    ) -> bool {
        self.agents.iter().any(|a| {
            (a.identity == ANY || a.identity == identity)
                && a.names.is_match(name)
                && a.labels.as_ref().is_none_or(|allowed| {
                    labels
                        .iter()
                        .all(|(k, v)| allowed.is_match(format!("{k}={v}")))
                })
        })
    }

    /// The first caller rule letting `identity` call `method` on `peer`.
    pub fn caller_rule(
        &self,
        identity: &str,
        peer: PeerView<'_>,
        method: &str,
    ) -> Option<&CallerRule> {
        self.callers.iter().find(|r| {
            (r.identity == ANY || r.identity == identity)
                && r.selects(peer)
                && r.methods.as_ref().is_none_or(|m| m.is_match(method))
        })
    }

    /// The first caller rule letting `identity` open a tunnel to `service`
    /// on `peer`.
    pub fn tunnel_rule(
        &self,
        identity: &str,
        peer: PeerView<'_>,
        service: &str,
    ) -> Option<&CallerRule> {
        self.callers.iter().find(|r| {
            (r.identity == ANY || r.identity == identity)
                && r.selects(peer)
                && r.tunnels.as_ref().is_some_and(|t| t.is_match(service))
        })
    }

    /// Whether `identity` may call `Peers.List` and `Peers.Watch`.
    pub fn is_admin(&self, identity: &str) -> bool {
        self.admins.iter().any(|a| a == ANY || a == identity)
    }

    /// How many identities the policy defines.
    pub fn identity_count(&self) -> usize {
        self.identities.len()
    }
}

impl CallerRule {
    fn selects(&self, peer: PeerView<'_>) -> bool {
        if peer.name.is_empty() {
            // Unnamed peers are only reachable through a label they
            // cannot have announced: never.
            return false;
        }
        self.names.is_match(peer.name)
            || self
                .labels
                .iter()
                .any(|(k, v)| peer.labels.get(k).is_some_and(|x| x == v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::identity::hex;

    fn example() -> String {
        format!(
            r#"
[identity.billing]
token_sha256 = "{}"
[identity.inventory-agent]
cert_uri = "spiffe://example.org/agent/inventory"
[identity.ops]
cert_dns = "ops.example.org"

[[agents]]                      # which names an identity may announce
identity = "inventory-agent"
names = ["inventory", "inventory-*"]
[[agents]]
identity = "ops"
names = ["ops-*"]
labels = ["env=test", "region=*"]

[[callers]]
identity = "billing"
peers = ["inventory", "label:env=prod"]
methods = ["/backchannel.testing.v1.Echo/*"]
max_concurrent = 64

[[callers]]
identity = "*"
peers = ["public-*"]

[[admins]]
identity = "ops"
"#,
            hex(&token_sha256("billing-token"))
        )
    }

    fn view<'a>(name: &'a str, labels: &'a HashMap<String, String>) -> PeerView<'a> {
        PeerView { name, labels }
    }

    #[test]
    fn the_example_policy() {
        let p = Policy::parse("p.toml", &example()).unwrap();
        assert_eq!(p.identity_for_token("billing-token"), Some("billing"));
        assert_eq!(p.identity_for_token("billing-token2"), None);
        assert_eq!(
            p.identity_for_cert(&CertName::Uri(
                "spiffe://example.org/agent/inventory".into()
            )),
            Some("inventory-agent")
        );
        assert_eq!(
            p.identity_for_cert(&CertName::Dns("OPS.example.org".into())),
            Some("ops")
        );
        assert_eq!(p.identity_for_cert(&CertName::Dns("x".into())), None);

        assert!(p.may_announce("inventory-agent", "inventory", &HashMap::new()));
        assert!(p.may_announce("inventory-agent", "inventory-eu", &HashMap::new()));
        assert!(!p.may_announce("inventory-agent", "billing", &HashMap::new()));
        assert!(!p.may_announce("billing", "inventory", &HashMap::new()));
        // Labels: any without a `labels` list; only the listed ones with it.
        let l = |kv: &[(&str, &str)]| -> HashMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(p.may_announce("inventory-agent", "inventory", &l(&[("env", "prod")])));
        assert!(p.may_announce("ops", "ops-1", &l(&[("env", "test"), ("region", "eu")])));
        assert!(!p.may_announce("ops", "ops-1", &l(&[("env", "prod")])));

        let none = HashMap::new();
        let prod: HashMap<_, _> = [("env".to_string(), "prod".to_string())].into();
        let m = "/backchannel.testing.v1.Echo/Unary";
        let r = p
            .caller_rule("billing", view("inventory", &none), m)
            .unwrap();
        assert_eq!(r.max_concurrent, Some(64));
        assert!(p.caller_rule("billing", view("db", &prod), m).is_some());
        assert!(p.caller_rule("billing", view("db", &none), m).is_none());
        assert!(p
            .caller_rule("billing", view("inventory", &none), "/other.Svc/X")
            .is_none());
        assert!(p.caller_rule("ops", view("inventory", &none), m).is_none());
        // "*": any identity, every method (no methods given).
        assert!(p
            .caller_rule("ops", view("public-x", &none), "/a.B/C")
            .is_some());
        assert!(p.caller_rule("ops", view("", &none), "/a.B/C").is_none());

        assert!(p.is_admin("ops"));
        assert!(!p.is_admin("billing"));
    }

    fn line_of(text: &str) -> (usize, String) {
        match Policy::parse("p.toml", text).unwrap_err() {
            PolicyError::Invalid { line, message, .. } => (line, message),
            e => panic!("{e}"),
        }
    }

    #[test]
    fn errors_name_the_line() {
        let (l, m) = line_of(
            "[identity.a]\ncert_dns = \"a\"\n\n[[callers]]\nidentity = \"b\"\npeers = [\"x\"]\n",
        );
        assert_eq!((l, m.as_str()), (5, "unknown identity 'b'"));
        let (l, m) = line_of("[identity.a]\ncert_dns = \"a\"\nbogus = 1\n");
        assert_eq!(l, 3, "{m}");
        assert!(m.contains("bogus"), "{m}");
        let (l, m) = line_of("[identity.a]\ntoken_sha256 = \"abc\"\n");
        assert_eq!(l, 2, "{m}");
        assert!(m.contains("64 hex digits"), "{m}");
        let (l, _) = line_of(
            "[identity.a]\ncert_dns = \"a\"\n[[agents]]\nidentity = \"a\"\nnames = [\"[\"]\n",
        );
        assert_eq!(l, 5);
        let (l, m) = line_of("x = \n");
        assert_eq!(l, 1, "{m}");
        let (l, m) = line_of("[identity.a]\n");
        assert_eq!(l, 1, "{m}");
        assert!(m.contains("no token_sha256"), "{m}");
        let (l, _) = line_of("[identity.a]\ncert_dns = \"a\"\n[[callers]]\nidentity = \"a\"\npeers = [\"label:env\"]\n");
        assert_eq!(l, 5);
        let (l, _) = line_of("[identity.a]\ncert_dns = \"a\"\n[identity.b]\ncert_dns = \"a\"\n");
        assert_eq!(l, 4);
        let (l, _) = line_of("[identity.a]\ncert_dns = \"a\"\n[[callers]]\nidentity = \"a\"\npeers = [\"x\"]\nmax_concurrent = 0\n");
        assert_eq!(l, 6);
    }

    #[test]
    fn an_empty_policy_denies_everything() {
        let p = Policy::parse("p.toml", "").unwrap();
        assert_eq!(p.identity_for_token("x"), None);
        assert!(!p.may_announce("a", "b", &HashMap::new()));
        assert!(!p.is_admin("a"));
    }
}
