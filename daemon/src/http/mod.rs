//! The REST API (axum): parses requests, calls the job service, maps errors to status codes and
//! the one JSON error shape. Each route is registered together with its operation in the OpenAPI
//! document (utoipa's `OpenApiRouter` and `routes!`), so none is served undocumented; the
//! document, generated from the handlers and the wire types, is served at `/v1/openapi.json`.

mod doc;
mod jobs;
mod logs;
mod origin;

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use utoipa::openapi::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Auth;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::service::JobService;

/// The largest request body any route takes (`POST /v1/jobs`'s spec).
const BODY_LIMIT_BYTES: usize = 2 << 20;

#[derive(Clone)]
pub struct AppState {
    pub service: JobService,
    pub metrics: Metrics,
    pub auth: std::sync::Arc<Auth>,
}

/// The API's routes, each registered with its operation, and the document they make.
struct Api {
    /// The job API: needs a token on a daemon with `--tokens`.
    protected: Router<AppState>,
    /// The probes and the API's own description.
    open: Router<AppState>,
    /// `/metrics`, unless it has a listener of its own (then documented all the same).
    metrics: Router<AppState>,
    document: OpenApi,
}

fn api() -> Api {
    let (protected, protected_doc) = OpenApiRouter::default()
        .routes(routes!(jobs::submit, jobs::list))
        .routes(routes!(jobs::job, jobs::delete))
        .routes(routes!(jobs::cancel))
        .routes(routes!(jobs::metrics))
        .routes(routes!(jobs::events))
        .routes(routes!(logs::logs))
        .routes(routes!(jobs::checkpoints))
        .routes(routes!(jobs::devices))
        .routes(routes!(jobs::whoami))
        .split_for_parts();
    let (open, open_doc) =
        OpenApiRouter::default().routes(routes!(openapi)).routes(routes!(healthz)).routes(routes!(ready)).split_for_parts();
    let (metrics, metrics_doc) = OpenApiRouter::default().routes(routes!(prometheus)).split_for_parts();
    let mut document = doc::frame();
    for part in [protected_doc, open_doc, metrics_doc] {
        document.merge(part);
    }
    Api { protected, open, metrics, document }
}

/// The OpenAPI document of the API that `router` serves.
#[cfg(test)]
fn document() -> OpenApi {
    api().document
}

/// The document as served, made once per router.
#[derive(Clone)]
struct DocumentJson(Bytes);

/// The REST routes; `/metrics` too unless it has a listener of its own.
pub fn router(state: AppState, with_metrics: bool) -> Router {
    let api = api();
    let json = serde_json::to_vec_pretty(&api.document).expect("the OpenAPI document is JSON");
    let mut r = Router::new()
        .merge(
            api.protected
                .layer(axum::middleware::from_fn_with_state(state.clone(), authenticate))
                .layer(axum::middleware::from_fn_with_state(state.clone(), origin::same_origin)),
        )
        .merge(api.open)
        // The dashboard's pages are not part of the API: they are left out of its document.
        .merge(crate::web::router());
    if with_metrics {
        r = r.merge(api.metrics);
    }
    // Every error a client gets has the API's shape, these too (axum's own are plain text).
    r.fallback(move |uri: axum::http::Uri| async move {
        api_error(StatusCode::NOT_FOUND, gantry_api::ErrorCode::NotFound, format!("no such route: {} (see /v1/openapi.json)", uri.path()))
    })
    .method_not_allowed_fallback(move |method: axum::http::Method, uri: axum::http::Uri| async move {
        let message = format!("{method} is not allowed on {} (see /v1/openapi.json)", uri.path());
        api_error(StatusCode::METHOD_NOT_ALLOWED, gantry_api::ErrorCode::BadRequest, message)
    })
    .layer(Extension(DocumentJson(Bytes::from(json))))
    .layer(axum::middleware::from_fn(refuse_large_bodies))
    .layer(axum::middleware::from_fn_with_state(state.clone(), track))
    .with_state(state)
}

/// Who is calling: the token's user, or 401 in the API's shape.
async fn authenticate(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    let header = req.headers().get(header::AUTHORIZATION).map(|v| v.to_str().unwrap_or("?"));
    match s.auth.caller(header) {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => {
            let mut resp = e.into_response();
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            resp
        }
    }
}

/// A body declared larger than any route takes is refused before it is read (413, in the API's
/// shape); the connection's lingering close lets the client read the answer.
async fn refuse_large_bodies(req: Request, next: Next) -> Response {
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > BODY_LIMIT_BYTES as u64 => too_large(),
        _ => next.run(req).await,
    }
}

fn too_large() -> Response {
    let message = format!("the request body is larger than the {} MiB the API takes", BODY_LIMIT_BYTES >> 20);
    let mut resp = api_error(StatusCode::PAYLOAD_TOO_LARGE, gantry_api::ErrorCode::BadRequest, message);
    resp.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    resp
}

/// An error in the API's shape with a status of its own (for the statuses `Error` has no code
/// for: 405, 413).
fn api_error(status: StatusCode, code: gantry_api::ErrorCode, message: String) -> Response {
    (status, Json(gantry_api::ApiError { code, message, field: None })).into_response()
}

/// Just `/metrics`, for a separate listener.
pub fn metrics_router(state: AppState) -> Router {
    Router::new().route("/metrics", get(prometheus)).with_state(state)
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        use gantry_api::ErrorCode::*;
        let status = match self.code() {
            BadRequest => StatusCode::BAD_REQUEST,
            InvalidSpec => StatusCode::UNPROCESSABLE_ENTITY,
            NotFound => StatusCode::NOT_FOUND,
            Conflict => StatusCode::CONFLICT,
            Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Unauthorized => StatusCode::UNAUTHORIZED,
            Forbidden => StatusCode::FORBIDDEN,
        };
        if status.is_server_error() {
            tracing::warn!("{self}");
        }
        (status, Json(self.to_api())).into_response()
    }
}

type ApiResult<T> = Result<T, Error>;

/// Counts requests and their latency by route template (never by raw path, so ids do not
/// multiply the series).
async fn track(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().to_string();
    let route = req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    s.metrics.http_requests.with_label_values(&[&method, &route, resp.status().as_str()]).inc();
    s.metrics.http_latency.with_label_values(&[&method, &route]).observe(start.elapsed().as_secs_f64());
    resp
}

/// The request body if it is at most `limit` bytes; `None` as soon as it is larger (the rest is
/// left to the connection's lingering close). A body that takes longer than `timeout` to arrive
/// (`--read-timeout`) is refused: a client that opens a request and trickles its body would
/// otherwise hold a connection forever.
async fn read_limited(body: axum::body::Body, limit: usize, timeout: std::time::Duration) -> ApiResult<Option<Bytes>> {
    use futures::StreamExt;
    let read = async {
        let mut stream = body.into_data_stream();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| Error::BadRequest(format!("reading the body: {e}")))?;
            if buf.len() + chunk.len() > limit {
                return Ok(None);
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Some(Bytes::from(buf)))
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| Error::BadRequest(format!("the request body did not arrive within {}s", timeout.as_secs())))?
}

/// This API description
///
/// This OpenAPI 3.1 document, generated from the daemon's handlers and wire types as it was
/// built.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "operations",
    operation_id = "getOpenApi",
    responses((status = 200, description = "The OpenAPI document.", body = Object, content_type = "application/json")),
)]
async fn openapi(Extension(DocumentJson(json)): Extension<DocumentJson>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], json)
}

/// Liveness
///
/// Answers `ok` while the daemon's HTTP server runs; checks nothing else.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    operation_id = "healthz",
    responses((status = 200, description = "Alive.", body = String, content_type = "text/plain; charset=utf-8", example = "ok\n")),
)]
async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness
///
/// Answers `ready` when the database answers a query, else 503 with the error.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    operation_id = "readyz",
    responses(
        (status = 200, description = "Ready: the database is reachable.", body = String, content_type = "text/plain; charset=utf-8",
            example = "ready\n"),
        (status = 503, description = "Not ready: the database query failed.", body = String, content_type = "text/plain; charset=utf-8",
            example = "not ready: the database is unavailable: pool timed out while waiting for an open connection\n"),
    ),
)]
async fn ready(State(s): State<AppState>) -> Response {
    match s.service.store.ping().await {
        Ok(()) => "ready\n".into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response(),
    }
}

/// Prometheus metrics
///
/// The daemon's Prometheus series (all `gantry_`-prefixed: jobs by state, queue length, busy
/// devices, per-rank step, step time, loss, throughput and memory of running jobs, worker
/// restarts, REST requests and their latency, gRPC requests) in the Prometheus text format.
/// Served on this listener unless the daemon runs with `--metrics ADDR`; then it is served only
/// at that address, and this path answers 404 here.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    operation_id = "getMetrics",
    responses((status = 200, description = "The metrics.", body = String, content_type = "text/plain; version=0.0.4",
        example = "# HELP gantry_queue_length Jobs waiting for devices (queued or restarting)\n# TYPE gantry_queue_length gauge\n\
                   gantry_queue_length 0\n")),
)]
async fn prometheus(State(s): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render())
}

#[cfg(test)]
mod tests;
