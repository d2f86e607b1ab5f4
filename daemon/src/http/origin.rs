//! Requests a web page on another site makes the browser send. A browser attaches no token by
//! itself, so on a daemon with `--tokens` such a request fails anyway; on a daemon without tokens
//! (loopback only, for one trusted user) any page the user visits could otherwise submit, cancel or
//! delete jobs through the user's browser (cross-site requests), or read the API after pointing
//! its own host name at 127.0.0.1 (DNS rebinding). The job API refuses both, before anything else.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::auth::Auth;
use crate::error::Error;

/// Refuses (403) a request a browser marks as cross-site, one whose `Origin` is not the host it
/// was sent to, and, on a daemon without tokens, one sent to a host name that is not loopback.
pub async fn same_origin(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    match check(req.headers(), host.as_deref(), matches!(*s.auth, Auth::Open)) {
        Ok(()) => next.run(req).await,
        Err(message) => Error::Forbidden(message).into_response(),
    }
}

fn check(headers: &HeaderMap, host: Option<&str>, open: bool) -> Result<(), String> {
    let value = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("?"));
    if value("sec-fetch-site") == Some("cross-site") {
        return Err("a page on another site may not call this API (the browser marked the request cross-site)".into());
    }
    if let Some(origin) = value("origin") {
        let same = match (origin.split_once("://"), host) {
            (Some((_, authority)), Some(host)) => authority.eq_ignore_ascii_case(host),
            _ => false,
        };
        if !same {
            return Err(format!("a page from {origin} may not call this API: only the daemon's own pages may"));
        }
    }
    if let (true, Some(host)) = (open, host) {
        if !is_loopback(host) {
            return Err(format!(
                "this daemon has no tokens and answers only on a loopback address, not as `{host}` \
                 (a page may be reaching it through DNS rebinding): use 127.0.0.1 or localhost"
            ));
        }
    }
    Ok(())
}

/// Whether a `Host` value (`name[:port]`) names this machine's loopback interface.
fn is_loopback(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(n, port)| if port.chars().all(|c| c.is_ascii_digit()) { n } else { host }),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn cross_site_requests_and_foreign_hosts_are_refused() {
        let host = Some("127.0.0.1:8080");
        // The CLI, curl, and the daemon's own pages.
        assert!(check(&headers(&[]), host, true).is_ok());
        assert!(check(&headers(&[("origin", "http://127.0.0.1:8080"), ("sec-fetch-site", "same-origin")]), host, true).is_ok());
        assert!(check(&headers(&[]), Some("localhost:8080"), true).is_ok());
        assert!(check(&headers(&[]), Some("[::1]:8080"), true).is_ok());
        assert!(check(&headers(&[]), None, true).is_ok());
        // Another site's page.
        let e = check(&headers(&[("origin", "http://evil.example")]), host, true).unwrap_err();
        assert!(e.contains("evil.example"), "{e}");
        assert!(check(&headers(&[("sec-fetch-site", "cross-site")]), host, false).is_err());
        assert!(check(&headers(&[("origin", "null")]), host, true).is_err());
        // DNS rebinding: refused without tokens; with tokens the host may be any name.
        let e = check(&headers(&[]), Some("attacker.example:8080"), true).unwrap_err();
        assert!(e.contains("attacker.example"), "{e}");
        assert!(check(&headers(&[]), Some("gantry.internal:8080"), false).is_ok());
    }
}
