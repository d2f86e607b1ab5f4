//! The REST API (axum): parses requests, calls the job service, maps errors to status codes and
//! the one JSON error shape. Documented by `openapi.json`, served at `/v1/openapi.json`.

mod logs;

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::auth::{Auth, Caller};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::service::JobService;

pub const OPENAPI: &str = include_str!("openapi.json");

/// The largest request body any route takes (`POST /v1/jobs`'s spec).
const BODY_LIMIT_BYTES: usize = 2 << 20;

#[derive(Clone)]
pub struct AppState {
    pub service: JobService,
    pub metrics: Metrics,
    pub auth: std::sync::Arc<Auth>,
}

/// The REST routes; `/metrics` too unless it has a listener of its own.
pub fn router(state: AppState, with_metrics: bool) -> Router {
    // The job API needs a token (on a daemon with `--tokens`); the probes, /metrics and the API's
    // own description stay open.
    let api = Router::new()
        .route("/v1/jobs", post(submit).get(list))
        .route("/v1/jobs/{id}", get(job).delete(delete))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/jobs/{id}/metrics", get(metrics))
        .route("/v1/jobs/{id}/events", get(events))
        .route("/v1/jobs/{id}/logs", get(logs::logs))
        .route("/v1/jobs/{id}/checkpoints", get(checkpoints))
        .route("/v1/devices", get(devices))
        .route("/v1/whoami", get(whoami))
        .layer(axum::middleware::from_fn_with_state(state.clone(), authenticate));
    let mut r = Router::new()
        .merge(api)
        .merge(crate::web::router())
        .route("/v1/openapi.json", get(openapi))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready));
    if with_metrics {
        r = r.route("/metrics", get(prometheus));
    }
    // Every error a client gets has the API's shape, these too (axum's own are plain text).
    r.fallback(move |uri: axum::http::Uri| async move {
        api_error(StatusCode::NOT_FOUND, gantry_api::ErrorCode::NotFound, format!("no such route: {} (see /v1/openapi.json)", uri.path()))
    })
    .method_not_allowed_fallback(move |method: axum::http::Method, uri: axum::http::Uri| async move {
        let message = format!("{method} is not allowed on {} (see /v1/openapi.json)", uri.path());
        api_error(StatusCode::METHOD_NOT_ALLOWED, gantry_api::ErrorCode::BadRequest, message)
    })
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

/// `POST /v1/jobs`: the spec as JSON, or as TOML with `Content-Type: application/toml` (the
/// dashboard's submit form sends what was pasted).
async fn submit(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Response> {
    let toml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/toml"));
    let Some(body) = read_limited(body, BODY_LIMIT_BYTES, s.service.config.read_timeout).await? else { return Ok(too_large()) };
    let format = if toml { "TOML" } else { "JSON" };
    let text = std::str::from_utf8(&body).map_err(|_| Error::BadRequest(format!("the body is not UTF-8 {format}")))?;
    let spec = if toml { gantry_api::JobSpec::from_toml(text, &[])? } else { gantry_api::JobSpec::from_json(text)? };
    let job = s.service.submit(&caller, spec).await?;
    Ok((StatusCode::CREATED, [(header::LOCATION, format!("/v1/jobs/{}", job.id))], Json(job)).into_response())
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    after: Option<i64>,
    limit: Option<u32>,
}

async fn list(
    State(s): State<AppState>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(q) = q.map_err(|e| Error::BadRequest(e.body_text()))?;
    Ok(Json(s.service.list(q.state.as_deref(), q.after, q.limit).await?))
}

fn job_id(p: Result<Path<i64>, axum::extract::rejection::PathRejection>) -> ApiResult<i64> {
    p.map(|Path(id)| id).map_err(|_| Error::BadRequest("the job id must be an integer".into()))
}

async fn job(State(s): State<AppState>, id: Result<Path<i64>, axum::extract::rejection::PathRejection>) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.service.get(job_id(id)?).await?))
}

async fn cancel(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<i64>, axum::extract::rejection::PathRejection>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.service.cancel(&caller, job_id(id)?).await?))
}

async fn delete(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<i64>, axum::extract::rejection::PathRejection>,
) -> ApiResult<Response> {
    s.service.delete(&caller, job_id(id)?).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsQuery {
    rank: Option<u32>,
    after_step: Option<i64>,
    limit: Option<u32>,
}

async fn metrics(
    State(s): State<AppState>,
    id: Result<Path<i64>, axum::extract::rejection::PathRejection>,
    q: Result<Query<MetricsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let id = job_id(id)?;
    let Query(q) = q.map_err(|e| Error::BadRequest(e.body_text()))?;
    let steps = s.service.metrics(id, q.rank, q.after_step, q.limit).await?;
    Ok(Json(json!({ "job_id": id, "steps": steps })))
}

async fn events(State(s): State<AppState>, id: Result<Path<i64>, axum::extract::rejection::PathRejection>) -> ApiResult<impl IntoResponse> {
    let id = job_id(id)?;
    Ok(Json(json!({ "job_id": id, "events": s.service.events(id).await? })))
}

async fn checkpoints(
    State(s): State<AppState>,
    id: Result<Path<i64>, axum::extract::rejection::PathRejection>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.service.checkpoints(job_id(id)?).await?))
}

/// Who the token stands for, so the dashboard shows only what its user may do.
async fn whoami(State(s): State<AppState>, Extension(caller): Extension<Caller>) -> Json<gantry_api::WhoAmI> {
    Json(gantry_api::WhoAmI {
        user: caller.user.clone(),
        role: caller.role.to_string(),
        tokens: matches!(*s.auth, crate::auth::Auth::Tokens(_)),
        node: crate::supervisor::lease::host_name(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    })
}

async fn devices(State(s): State<AppState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(json!({ "devices": s.service.devices().await? })))
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn ready(State(s): State<AppState>) -> Response {
    match s.service.store.ping().await {
        Ok(()) => "ready\n".into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response(),
    }
}

async fn prometheus(State(s): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// The routes `router` serves, as (method, path); the document must describe exactly these.
    const ROUTES: [(&str, &str); 13] = [
        ("post", "/v1/jobs"),
        ("get", "/v1/jobs"),
        ("get", "/v1/jobs/{id}"),
        ("delete", "/v1/jobs/{id}"),
        ("post", "/v1/jobs/{id}/cancel"),
        ("get", "/v1/jobs/{id}/metrics"),
        ("get", "/v1/jobs/{id}/events"),
        ("get", "/v1/jobs/{id}/logs"),
        ("get", "/v1/devices"),
        ("get", "/v1/openapi.json"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
    ];

    #[test]
    fn the_openapi_document_describes_every_route_and_no_other() {
        let doc: serde_json::Value = serde_json::from_str(super::OPENAPI).expect("openapi.json is JSON");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let mut documented = BTreeSet::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for method in ops.as_object().unwrap().keys().filter(|k| ["get", "post", "put", "delete", "patch"].contains(&k.as_str())) {
                documented.insert((method.clone(), path.clone()));
            }
        }
        let served: BTreeSet<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
        assert_eq!(documented, served);
        let job = &doc["components"]["schemas"]["Job"]["properties"];
        for field in ["id", "state", "reason", "spec", "placement", "restarts", "step", "checkpoint_step", "owner", "memory_estimate"] {
            assert!(job.get(field).is_some(), "Job.{field} is documented");
        }
        // Every error code the API can answer is documented.
        let codes: BTreeSet<String> =
            doc["components"]["schemas"]["ErrorCode"]["enum"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()).collect();
        use gantry_api::ErrorCode::*;
        for code in [BadRequest, InvalidSpec, NotFound, Conflict, Unavailable, Internal, Unauthorized, Forbidden] {
            let name = serde_json::to_value(code).unwrap().as_str().unwrap().to_string();
            assert!(codes.contains(&name), "ErrorCode {name} is documented");
        }
        assert!(!doc["info"]["description"].as_str().unwrap().contains("empty body"), "errors have the API's shape everywhere");
        let spec = serde_json::to_string(&doc["components"]["schemas"]).unwrap();
        for key in ["max_restarts", "global_batch_size", "micro_batch_size", "devices", "every"] {
            assert!(spec.contains(&format!("\"{key}\"")), "spec key {key} is documented");
        }
    }
}
