//! `GET /v1/jobs/{id}/logs`: the stored lines as JSON, or with `?follow=true` a stream of
//! server-sent events (`event: log`, one line each as JSON) that ends with `event: end` once the
//! job is over and every line has been sent.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use gantry_api::JobLogs;
use serde::Deserialize;
use utoipa::IntoParams;

use super::doc::{BadRequest, Internal, NotFound, Unauthorized, Unavailable};
use super::jobs::{job_id, query, IdPath, JobId, QueryOf};
use super::{ApiResult, AppState};
use crate::error::Error;

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Only this rank's lines; every rank's by default.
    rank: Option<u32>,
    /// Only lines after this byte offset (compared with each rank's own offsets); every line by
    /// default. To resume one rank, pass its last `offset` with `rank`.
    after: Option<i64>,
    /// Lines per page: 10,000 by default, 1 to 100,000 (another value answers 400). A page also
    /// ends after about 1 MiB of text: page on, passing the last line's `offset` as `after`, until
    /// a page is empty. Not used with `follow`.
    #[param(minimum = 1, maximum = 100000, default = 10000)]
    limit: Option<u32>,
    /// `true`: stream the lines as server-sent events until the job is over.
    #[serde(default)]
    #[param(default = false)]
    follow: bool,
}

/// The example stream of the document.
const SSE_EXAMPLE: &str = "event: log\ndata: {\"rank\":0,\"offset\":0,\"at_ms\":1718000001234,\"line\":\"step 1/300 loss 10.9\"}\n\n\
                           event: log\ndata: {\"rank\":0,\"offset\":21,\"at_ms\":1718000001734,\"line\":\"step 2/300 loss 10.7\"}\n\n\
                           event: end\ndata: 42\n\n";

/// Get or follow a job's worker logs
///
/// Without `follow` (or with `follow=false`): the stored lines the job's workers wrote to stdout
/// and stderr, as JSON, ordered by rank and then by byte offset. With `follow=true`: a stream of
/// server-sent events (`text/event-stream`). Each line is one `event: log` whose `data` is the
/// LogLine as JSON; the stream starts after `after` (per rank) and sends new lines as the workers
/// write them (polling every 500 ms), for the given `rank` or for ranks 0 to `devices - 1`. Once
/// the job is in a final state and every line has been sent, it sends `event: end` whose `data`
/// is the job id, and closes. Comment lines keep the connection alive while nothing is sent.
/// `limit` does not apply to the stream. The choice of JSON or stream follows `follow`, not the
/// Accept header. A job that does not exist answers 404 before any stream starts. Unknown query
/// parameters are refused with 400 `bad_request`.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/logs",
    tag = "jobs",
    operation_id = "getJobLogs",
    params(JobId, LogsQuery),
    responses(
        (status = 200, description = "The stored lines as JSON, or with `follow=true` the event stream.", content(
            (JobLogs = "application/json"),
            (String = "text/event-stream", example = json!(SSE_EXAMPLE)),
        )),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = []), ()),
)]
pub async fn logs(State(s): State<AppState>, id: IdPath, q: QueryOf<LogsQuery>) -> ApiResult<Response> {
    let id = job_id(id)?;
    let q = query(q)?;
    if !q.follow {
        let lines = s.service.logs(id, q.rank, q.after, q.limit).await?;
        return Ok(Json(JobLogs { job_id: id, lines }).into_response());
    }
    s.service.get(id).await?;
    let service = s.service.clone();
    let rank = q.rank;
    // Per-rank resume points: lines are ordered by (rank, offset).
    let start = q.after.unwrap_or(-1);
    let stream = async_stream(move |tx| async move {
        let mut after: std::collections::BTreeMap<u32, i64> = Default::default();
        loop {
            // Read the state before the lines: a job seen over here has had all its lines stored
            // (a cancelled one only once its workers are gone and their logs copied).
            let over = match service.get(id).await {
                Ok(j) => service.logs_complete(&j),
                // Deleted while followed: nothing more will come.
                Err(Error::JobNotFound(_)) => {
                    let _ = tx.send(Ok(Event::default().event("end").data(id.to_string()))).await;
                    return;
                }
                Err(_) => false,
            };
            let ranks: Vec<u32> = match rank {
                Some(r) => vec![r],
                None => (0..service.get(id).await.map(|j| j.devices).unwrap_or(1)).collect(),
            };
            let mut more = false;
            for r in ranks {
                let from = *after.get(&r).unwrap_or(&start);
                if let Ok(lines) = service.logs(id, Some(r), Some(from), Some(1000)).await {
                    more |= lines.len() == 1000;
                    for l in lines {
                        after.insert(r, l.offset);
                        let ev = Event::default().event("log").json_data(&l).unwrap_or_default();
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                }
            }
            if over && !more {
                let _ = tx.send(Ok(Event::default().event("end").data(id.to_string()))).await;
                return;
            }
            if !more {
                // A follower that went away stops the polling now, not at its next line.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = tx.closed() => return,
                }
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

/// A stream fed by a task through a small channel (the task stops when the client goes away).
fn async_stream<F, Fut>(f: F) -> tokio_stream::wrappers::ReceiverStream<Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Event, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
