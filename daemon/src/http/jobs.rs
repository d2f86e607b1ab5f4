//! The job routes (`/v1/jobs…`), `/v1/devices` and `/v1/whoami`: each handler carries its part of
//! the OpenAPI document (`#[utoipa::path]`), and is registered with it (see `super::router`).
//! The doc comments of the handlers are the operations' summaries (first paragraph) and
//! descriptions (the rest).

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use gantry_api::{ApiError, Checkpoints, DeviceList, Job, JobEvents, JobMetrics, JobPage, JobSpec, WhoAmI};
use serde::Deserialize;
use utoipa::IntoParams;

use super::doc::{BadRequest, Conflict, Forbidden, Internal, NotFound, PayloadTooLarge, Unauthorized, Unavailable};
use super::{read_limited, too_large, ApiResult, AppState, BODY_LIMIT_BYTES};
use crate::auth::Caller;
use crate::error::Error;

/// A job id in the path.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // read by the handlers as `Path<i64>`, so that a bad id gets the API's 400
pub struct JobId {
    /// The job id. A value that is not an integer is refused with 400 `bad_request`.
    id: i64,
}

pub(super) type IdPath = Result<Path<i64>, axum::extract::rejection::PathRejection>;
pub(super) type QueryOf<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

pub(super) fn job_id(p: IdPath) -> ApiResult<i64> {
    p.map(|Path(id)| id).map_err(|_| Error::BadRequest("the job id must be an integer".into()))
}

pub(super) fn query<T>(q: QueryOf<T>) -> ApiResult<T> {
    q.map(|Query(q)| q).map_err(|e| Error::BadRequest(e.body_text()))
}

/// Submit a job
///
/// Parses the body as a job spec: JSON, or TOML with `Content-Type: application/toml` (any other
/// or no Content-Type is read as JSON), validates it and queues the job (state `queued`, reason
/// `waiting for the scheduler`, with a `submitted` event), owned by the caller's user; nothing is
/// stored when the spec is refused. The body must be UTF-8; text after the JSON document is
/// refused (400). Besides the schema's rules, submit refuses what could never run, answering 422
/// with the field at fault: every file the job names (`model.path` with its `config.json`,
/// weights and tokenizer, `data.train`, `data.tokenizer`) must exist on the daemon's machine and,
/// symlinks followed, lie under the daemon's read roots (`--read-roots`); the model's config must
/// be one Gantry trains and allow `data.seq_len`; `data.train` must be `.bin`, `.u32`, `.txt` or
/// `.jsonl`; text needs a tokenizer (`data.tokenizer`, or a `tokenizer.json` in the model
/// directory); `model.init = "pretrained"` needs weights; `resources.devices` must fit the node's
/// slots and the layout must be one this build runs; and the memory each rank is estimated to
/// need (`memory_estimate`), times the ranks sharing the node, must fit the node's memory.
/// Messages about a file's contents quote none of its text. Relative paths are taken from the
/// daemon's working directory and stored absolute. Answers 201 with the job and its path in
/// `Location`.
#[utoipa::path(
    post,
    path = "/v1/jobs",
    tag = "jobs",
    operation_id = "submitJob",
    request_body(
        description = "The job spec, as JSON or as TOML (the same schema as the spec files of `gantry train`).",
        content(
            (JobSpec = "application/json"),
            (JobSpec = "application/toml", example = json!(gantry_api::spec::EXAMPLE_TOML)),
        ),
    ),
    responses(
        (status = 201, description = "The job is queued.", body = Job,
            headers(("Location" = String, description = "The new job's path, `/v1/jobs/{id}` (e.g. `/v1/jobs/42`)."))),
        (status = 400, description = "`bad_request`: the body is not UTF-8, not valid JSON or TOML, or its top-level value is not \
            a job spec (these carry no `field`).", body = ApiError,
            example = json!({"code": "bad_request", "message": "not valid JSON: key must be a string at line 1 column 2"})),
        (status = 401, response = Unauthorized),
        (status = 413, response = PayloadTooLarge),
        (status = 422, description = "`invalid_spec`: an unknown key, a missing required key, a value of the wrong type or out of \
            range, or a check of the files, devices or parallel layout failed; `field` names the dotted key.", body = ApiError,
            example = json!({"code": "invalid_spec", "message": "must be a positive number, got -1", "field": "train.lr"})),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = []), ()),
)]
pub async fn submit(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Response> {
    // The dashboard's submit form sends TOML as it was pasted.
    let toml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/toml"));
    let Some(body) = read_limited(body, BODY_LIMIT_BYTES, s.service.config.read_timeout).await? else { return Ok(too_large()) };
    let format = if toml { "TOML" } else { "JSON" };
    let text = std::str::from_utf8(&body).map_err(|_| Error::BadRequest(format!("the body is not UTF-8 {format}")))?;
    let spec = if toml { JobSpec::from_toml(text, &[])? } else { JobSpec::from_json(text)? };
    let job = s.service.submit(&caller, spec).await?;
    Ok((StatusCode::CREATED, [(header::LOCATION, format!("/v1/jobs/{}", job.id))], Json(job)).into_response())
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only jobs in this state; an empty value means every state. Any other value is refused
    /// with 400.
    #[param(value_type = Option<StateFilter>, inline)]
    state: Option<String>,
    /// Only jobs with an id below this one: the id of the last job of the previous page.
    after: Option<i64>,
    /// Jobs per page: 50 by default, 1 to 1000 (another value answers 400). A page also ends
    /// after about 1 MiB of JSON; `next_after` then continues it.
    #[param(minimum = 1, maximum = 1000, default = 50)]
    limit: Option<u32>,
}

/// What `state` takes: a job state, or empty for every state.
struct StateFilter;

impl utoipa::PartialSchema for StateFilter {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, Schema, Type};
        use utoipa::ToSchema;
        let any_of = AnyOfBuilder::new()
            .item(utoipa::openapi::Ref::from_schema_name(gantry_api::JobState::name()))
            .item(ObjectBuilder::new().schema_type(Type::String).enum_values(Some([""])));
        Schema::AnyOf(any_of.build()).into()
    }
}

impl utoipa::ToSchema for StateFilter {}

/// List jobs
///
/// Jobs from newest to oldest (by id), optionally only those in one state, a page at a time. To
/// get the next page pass the previous page's `next_after` as `after`; `next_after` is present
/// only when there is another page. Unknown query parameters are refused with 400 `bad_request`.
#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    operation_id = "listJobs",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of jobs.", body = JobPage),
        (status = 400, description = "`bad_request`: an unknown state, or an unknown, repeated or malformed query parameter.",
            body = ApiError, example = json!({"code": "bad_request", "message": "`done` is not a job state: expected one of queued, \
            scheduled, running, restarting, succeeded, failed, cancelled"})),
        (status = 401, response = Unauthorized),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = []), ()),
)]
pub async fn list(State(s): State<AppState>, q: QueryOf<ListQuery>) -> ApiResult<Json<JobPage>> {
    let q = query(q)?;
    Ok(Json(s.service.list(q.state.as_deref(), q.after, q.limit).await?))
}

/// Get a job
///
/// The job with this id: its state and why, its stored spec, placement, restarts, run directory
/// and progress.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    operation_id = "getJob",
    params(JobId),
    responses(
        (status = 200, description = "The job.", body = Job),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = []), ()),
)]
pub async fn job(State(s): State<AppState>, id: IdPath) -> ApiResult<Json<Job>> {
    Ok(Json(s.service.get(job_id(id)?).await?))
}

/// Cancel a job
///
/// Cancels a job in any non-final state (queued, scheduled, running, restarting): the state
/// `cancelled` (reason `cancelled by request`, and `by USER` on a daemon with tokens) is
/// recorded first, then every rank is stopped and the devices are freed. Answers the job as it is
/// now. A job already succeeded, failed or cancelled answers 409. No request body is read. A
/// `user` may cancel only its own jobs (403 otherwise).
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/cancel",
    tag = "jobs",
    operation_id = "cancelJob",
    params(JobId),
    responses(
        (status = 200, description = "The job, now `cancelled`.", body = Job),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = []), ()),
)]
pub async fn cancel(State(s): State<AppState>, Extension(caller): Extension<Caller>, id: IdPath) -> ApiResult<Json<Job>> {
    Ok(Json(s.service.cancel(&caller, job_id(id)?).await?))
}

/// Delete a job
///
/// Removes a job that has ended (succeeded, failed or cancelled): its row, events, metrics, logs
/// and checkpoint records, and its run directory (moved aside first, then removed, so a failure
/// leaves the job whole). A job that has not ended answers 409 (cancel it first), as does a
/// cancelled job whose workers are still stopping. A `user` may delete only its own jobs (403
/// otherwise). Answers 204 with no body.
#[utoipa::path(
    delete,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    operation_id = "deleteJob",
    params(JobId),
    responses(
        (status = 204, description = "The job and its run directory are gone."),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = []), ()),
)]
pub async fn delete(State(s): State<AppState>, Extension(caller): Extension<Caller>, id: IdPath) -> ApiResult<StatusCode> {
    s.service.delete(&caller, job_id(id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct MetricsQuery {
    /// Only this rank's steps; every rank's by default.
    rank: Option<u32>,
    /// Only steps after this one (0 by default: every step).
    #[param(default = 0)]
    after_step: Option<i64>,
    /// Rows per page: 10,000 by default, 1 to 100,000 (another value answers 400).
    #[param(minimum = 1, maximum = 100000, default = 10000)]
    limit: Option<u32>,
}

/// Get a job's step metrics
///
/// The recorded metrics of the job's optimizer steps (loss, learning rate, gradient norm,
/// throughput, memory, step time), ordered by step and, across ranks, by rank within a step.
/// Pages hold whole steps (a page never ends inside a step: a full page drops its last step, a
/// page of one step holds all its ranks), so to page, pass the last step received as
/// `after_step` (a page may hold fewer rows than `limit` before the end; an empty page is the
/// end). Unknown query parameters are refused with 400 `bad_request`.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/metrics",
    tag = "jobs",
    operation_id = "getJobMetrics",
    params(JobId, MetricsQuery),
    responses(
        (status = 200, description = "The job's step metrics.", body = JobMetrics),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = []), ()),
)]
pub async fn metrics(State(s): State<AppState>, id: IdPath, q: QueryOf<MetricsQuery>) -> ApiResult<Json<JobMetrics>> {
    let job_id = job_id(id)?;
    let q = query(q)?;
    let steps = s.service.metrics(job_id, q.rank, q.after_step, q.limit).await?;
    Ok(Json(JobMetrics { job_id, steps }))
}

/// Get a job's state transitions
///
/// Every state transition of the job, oldest first, starting with the event that created it
/// (`from` null, `to` `queued`).
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/events",
    tag = "jobs",
    operation_id = "getJobEvents",
    params(JobId),
    responses(
        (status = 200, description = "The job's events.", body = JobEvents),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = []), ()),
)]
pub async fn events(State(s): State<AppState>, id: IdPath) -> ApiResult<Json<JobEvents>> {
    let job_id = job_id(id)?;
    Ok(Json(JobEvents { job_id, events: s.service.events(job_id).await? }))
}

/// List a job's checkpoints
///
/// The committed checkpoints of the job's run (`RUN_DIR/checkpoints/step_N`, read from its run
/// directory), oldest first, with their sizes, and the final model's directory once the job has
/// succeeded. A checkpoint is listed once its manifest is written (not while it is being
/// written).
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/checkpoints",
    tag = "jobs",
    operation_id = "getJobCheckpoints",
    params(JobId),
    responses(
        (status = 200, description = "The job's checkpoints and final model.", body = Checkpoints),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = []), ()),
)]
pub async fn checkpoints(State(s): State<AppState>, id: IdPath) -> ApiResult<Json<Checkpoints>> {
    Ok(Json(s.service.checkpoints(job_id(id)?).await?))
}

/// Who am I
///
/// Who the token stands for and what it may do (so the dashboard shows only what its user may
/// do), and the daemon's node and version. On a daemon without tokens every caller is an
/// anonymous `admin`. Does not touch the database.
#[utoipa::path(
    get,
    path = "/v1/whoami",
    tag = "auth",
    operation_id = "whoAmI",
    responses(
        (status = 200, description = "The caller.", body = WhoAmI),
        (status = 401, response = Unauthorized),
    ),
    security(("bearer" = []), ()),
)]
pub async fn whoami(State(s): State<AppState>, Extension(caller): Extension<Caller>) -> Json<WhoAmI> {
    Json(WhoAmI {
        user: caller.user.clone(),
        role: caller.role.to_string(),
        tokens: matches!(*s.auth, crate::auth::Auth::Tokens(_)),
        node: crate::supervisor::lease::host_name(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    })
}

/// List the node's devices
///
/// Every device slot of the daemon's node (from its `--devices`), with the job that holds it, if
/// any.
#[utoipa::path(
    get,
    path = "/v1/devices",
    tag = "devices",
    operation_id = "listDevices",
    responses(
        (status = 200, description = "The device slots.", body = DeviceList),
        (status = 401, response = Unauthorized),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = []), ()),
)]
pub async fn devices(State(s): State<AppState>) -> ApiResult<Json<DeviceList>> {
    Ok(Json(DeviceList { devices: s.service.devices().await? }))
}
