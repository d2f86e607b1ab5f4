//! The web dashboard: one page (HTML, JavaScript, CSS, and uPlot 1.6.32 vendored from npm)
//! embedded in the binary and served at `/` and its client-side routes (`/jobs/{id}`, `/queue`,
//! `/devices`, `/submit`). The page reads the `/v1` API with the user's token, so these routes
//! need none themselves; nothing comes from a CDN, and the dashboard works offline.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// An embedded file and its media type.
struct Asset {
    body: &'static [u8],
    media_type: &'static str,
}

const INDEX: Asset = Asset { body: include_bytes!("../../web/index.html"), media_type: "text/html; charset=utf-8" };

/// The files under `/ui/`, by name.
const ASSETS: [(&str, Asset); 5] = [
    ("app.js", Asset { body: include_bytes!("../../web/app.js"), media_type: "text/javascript; charset=utf-8" }),
    ("app.css", Asset { body: include_bytes!("../../web/app.css"), media_type: "text/css; charset=utf-8" }),
    (
        "uPlot.iife.min.js",
        Asset { body: include_bytes!("../../web/vendor/uPlot.iife.min.js"), media_type: "text/javascript; charset=utf-8" },
    ),
    ("favicon.svg", Asset { body: include_bytes!("../../web/favicon.svg"), media_type: "image/svg+xml" }),
    ("uPlot.min.css", Asset { body: include_bytes!("../../web/vendor/uPlot.min.css"), media_type: "text/css; charset=utf-8" }),
];

/// The paths the page answers at: its own, and those of its client-side routes.
pub const PAGES: [&str; 5] = ["/", "/jobs/{id}", "/queue", "/devices", "/submit"];

/// Where the page's files are served.
pub const ASSETS_PATH: &str = "/ui/{file}";

/// The dashboard's routes, for any router state. They are not part of the REST API (the page is
/// a client of it), so the API's OpenAPI document leaves them out.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    PAGES.into_iter().fold(Router::new(), |r, path| r.route(path, get(page))).route(ASSETS_PATH, get(asset))
}

async fn page() -> Response {
    serve(&INDEX)
}

async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _)| *name == file) {
        Some((_, a)) => serve(a),
        None => (StatusCode::NOT_FOUND, "no such file\n").into_response(),
    }
}

fn serve(a: &Asset) -> Response {
    let mut resp = a.body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(a.media_type));
    // The files change with the binary: a browser asks again each time (cheap on loopback and a
    // LAN) rather than run an old script against a new API.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Only the page's own files run; the API is same-origin. uPlot sizes its elements through
    // style attributes, hence the inline styles.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; \
             base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    resp
}

#[cfg(test)]
mod tests {
    /// The page loads exactly the embedded files, from the daemon (no CDN); its links lead to
    /// its own routes.
    #[test]
    fn the_page_loads_only_embedded_files() {
        let index = std::str::from_utf8(super::INDEX.body).unwrap();
        let (mut loaded, mut links) = (Vec::new(), Vec::new());
        for tag in index.split('<').skip(1) {
            let name = tag.split([' ', '>']).next().unwrap();
            for attr in ["src=\"", "href=\""] {
                if let Some((_, rest)) = tag.split_once(attr) {
                    let url = rest.split('"').next().unwrap().to_string();
                    if name == "a" {
                        links.push(url)
                    } else {
                        loaded.push(url)
                    }
                }
            }
        }
        assert!(!loaded.is_empty() && !links.is_empty());
        for url in &loaded {
            let name = url.strip_prefix("/ui/").unwrap_or_else(|| panic!("{url} is not an embedded file"));
            assert!(super::ASSETS.iter().any(|(n, _)| *n == name), "{url} is not embedded");
        }
        for (name, _) in super::ASSETS {
            assert!(loaded.iter().any(|u| u == &format!("/ui/{name}")), "{name} is embedded but not loaded");
        }
        for url in &links {
            assert!(super::PAGES.contains(&url.as_str()), "{url} is not one of the page's routes");
        }
    }
}
