//! Addresses given on the command line and in configs: one parser for every
//! flag that names a place to connect to or listen on.

use std::{fmt, path::PathBuf, str::FromStr};

/// Where to connect or listen: a TCP `host:port` or a Unix socket path.
///
/// Accepted forms: `host:port`, `[v6]:port`, `tcp://host:port`,
/// `http://host:port` (TCP), and `unix:PATH` or `unix://PATH` (Unix socket).
///
/// ```
/// use backchannel_sidecar::addr::Target;
///
/// let t: Target = "tcp://hub.example.org:7443".parse()?;
/// assert_eq!(t.host(), Some("hub.example.org"));
/// assert_eq!(t.to_string(), "hub.example.org:7443");
/// assert!("unix:/run/hub.sock".parse::<Target>()?.is_unix());
/// assert!("hub.example.org".parse::<Target>().is_err()); // no port
/// # Ok::<(), backchannel_sidecar::addr::AddrError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A TCP address; `host` is a name or an IP literal (without brackets).
    Tcp {
        /// Host name or IP address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix domain socket.
    Unix(PathBuf),
}

/// Why an address did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// Nothing was given.
    #[error("empty address")]
    Empty,
    /// A scheme other than `tcp`, `http` or `unix`.
    #[error("unsupported scheme '{0}://' (use host:port, tcp://host:port, http://host:port or unix:PATH)")]
    Scheme(String),
    /// No `:port`.
    #[error("'{0}' has no port (expected HOST:PORT)")]
    NoPort(String),
    /// The port is not a number from 1 to 65535.
    #[error("'{0}' is not a port number from 1 to 65535")]
    BadPort(String),
    /// An empty host, or one with characters no host name has.
    #[error("'{0}' is not a host name or IP address")]
    BadHost(String),
    /// A path after the address (`http://host:port/path`).
    #[error("'{0}': a path after host:port is not supported")]
    Path(String),
    /// `unix:` with no path.
    #[error("unix: needs a socket path")]
    NoUnixPath,
}

impl Target {
    /// Whether this is a Unix socket.
    pub fn is_unix(&self) -> bool {
        matches!(self, Target::Unix(_))
    }

    /// The host of a TCP address (for TLS server names); `None` for Unix.
    pub fn host(&self) -> Option<&str> {
        match self {
            Target::Tcp { host, .. } => Some(host),
            Target::Unix(_) => None,
        }
    }

    /// The address as `http://host:port` (for a tonic `Endpoint`); Unix
    /// sockets give a placeholder authority, `http://localhost`.
    pub fn http_uri(&self) -> String {
        match self {
            Target::Tcp { .. } => format!("http://{self}"),
            Target::Unix(_) => "http://localhost".to_string(),
        }
    }
}

impl Target {
    /// Parses a place to listen on: like [`FromStr`], but a TCP port may be
    /// 0 (any free port).
    ///
    /// ```
    /// use backchannel_sidecar::addr::Target;
    /// assert!(Target::parse_listen("127.0.0.1:0").is_ok());
    /// assert!("127.0.0.1:0".parse::<Target>().is_err());
    /// ```
    pub fn parse_listen(s: &str) -> Result<Self, AddrError> {
        parse(s, true)
    }
}

impl FromStr for Target {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, AddrError> {
        parse(s, false)
    }
}

fn parse(s: &str, any_port: bool) -> Result<Target, AddrError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(AddrError::Empty);
    }
    if let Some(path) = s
        .strip_prefix("unix://")
        .or_else(|| s.strip_prefix("unix:"))
    {
        if path.is_empty() {
            return Err(AddrError::NoUnixPath);
        }
        return Ok(Target::Unix(PathBuf::from(path)));
    }
    let rest = match s.split_once("://") {
        Some(("tcp" | "http", rest)) => rest,
        Some((scheme, _)) => return Err(AddrError::Scheme(scheme.to_string())),
        None => s,
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') {
        return Err(AddrError::Path(s.to_string()));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| AddrError::BadHost(rest.to_string()))?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(AddrError::BadHost(host.to_string()));
        }
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| AddrError::NoPort(s.to_string()))?;
        (host, port)
    } else {
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| AddrError::NoPort(s.to_string()))?;
        let valid = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !valid {
            return Err(AddrError::BadHost(host.to_string()));
        }
        (host, port)
    };
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 || any_port => p,
        _ => return Err(AddrError::BadPort(port.to_string())),
    };
    Ok(Target::Tcp {
        host: host.to_string(),
        port,
    })
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Target::Tcp { host, port } => write!(f, "{host}:{port}"),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms() {
        let tcp = |h: &str, p| Target::Tcp {
            host: h.into(),
            port: p,
        };
        for (s, want) in [
            ("localhost:7443", tcp("localhost", 7443)),
            ("tcp://10.0.0.1:1", tcp("10.0.0.1", 1)),
            ("http://svc.internal:50051/", tcp("svc.internal", 50051)),
            ("[::1]:80", tcp("::1", 80)),
            ("unix:/tmp/a.sock", Target::Unix("/tmp/a.sock".into())),
            ("unix:///tmp/a.sock", Target::Unix("/tmp/a.sock".into())),
        ] {
            assert_eq!(s.parse::<Target>().as_ref(), Ok(&want), "{s}");
            // Display parses back to the same target.
            assert_eq!(want.to_string().parse::<Target>(), Ok(want.clone()));
        }
    }

    #[test]
    fn rejected_forms() {
        for (s, want) in [
            ("", AddrError::Empty),
            ("notahostport", AddrError::NoPort("notahostport".into())),
            ("host:0", AddrError::BadPort("0".into())),
            ("host:99999", AddrError::BadPort("99999".into())),
            ("host:http", AddrError::BadPort("http".into())),
            (":80", AddrError::BadHost("".into())),
            ("a b:80", AddrError::BadHost("a b".into())),
            ("[zz]:80", AddrError::BadHost("zz".into())),
            ("https://h:1", AddrError::Scheme("https".into())),
            ("http://h:1/x", AddrError::Path("http://h:1/x".into())),
            ("unix:", AddrError::NoUnixPath),
        ] {
            assert_eq!(s.parse::<Target>(), Err(want), "{s}");
        }
    }
}
