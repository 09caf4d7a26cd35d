//! Retry safety: every routing failure the hub answers itself says whether
//! the request reached the target service, in the trailer
//! `backchannel-fate`: `not-sent` (the hub refused or could not reach the
//! target before sending anything: a retry is safe) or `sent` (the request
//! was on its way or being answered when the call failed: a retry may run
//! it twice).

use http::HeaderValue;
use tonic::{body::Body, Status};

/// The trailer naming a routing failure's fate.
pub const FATE_HEADER: &str = "backchannel-fate";

/// Whether a failed routed call reached its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Nothing was sent to the target: retrying is safe.
    NotSent,
    /// The request may have reached the target.
    Sent,
}

impl Fate {
    /// The trailer's value.
    ///
    /// ```
    /// use backchannel_sidecar::hub::fate::Fate;
    /// assert_eq!(Fate::NotSent.as_str(), "not-sent");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Fate::NotSent => "not-sent",
            Fate::Sent => "sent",
        }
    }

    /// Adds the trailer to `headers` (replacing any the target set).
    pub fn mark(self, headers: &mut http::HeaderMap) {
        headers.insert(FATE_HEADER, HeaderValue::from_static(self.as_str()));
    }
}

/// A trailers-only response carrying `status` and `fate`.
///
/// ```
/// use backchannel_sidecar::hub::fate::{respond, Fate, FATE_HEADER};
/// let r = respond(tonic::Status::not_found("no such peer"), Fate::NotSent);
/// assert_eq!(r.headers()[FATE_HEADER], "not-sent");
/// ```
pub fn respond(status: Status, fate: Fate) -> http::Response<Body> {
    let mut r = status.into_http();
    fate.mark(r.headers_mut());
    r
}

/// The fate of a transport error before the target answered: `not-sent`
/// when the connection to the target could not be made at all.
pub fn of_transport_error(err: &(dyn std::error::Error + 'static)) -> Fate {
    let mut e = Some(err);
    while let Some(x) = e {
        let s = x.to_string().to_ascii_lowercase();
        if s.contains("connect error")
            || s.contains("connection refused")
            || s.contains("not connected")
            || s.contains("no backchannel")
        {
            return Fate::NotSent;
        }
        e = x.source();
    }
    Fate::Sent
}
