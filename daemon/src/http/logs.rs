//! `GET /v1/jobs/{id}/logs`: the stored lines as JSON, or with `?follow=true` a stream of
//! server-sent events (`event: log`, one line each as JSON) that ends with `event: end` once the
//! job is over and every line has been sent.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{job_id, ApiResult, AppState};
use crate::error::Error;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    rank: Option<u32>,
    /// Only lines after this byte offset (per rank).
    after: Option<i64>,
    limit: Option<u32>,
    #[serde(default)]
    follow: bool,
}

pub async fn logs(
    State(s): State<AppState>,
    id: Result<Path<i64>, axum::extract::rejection::PathRejection>,
    q: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let id = job_id(id)?;
    let Query(q) = q.map_err(|e| Error::BadRequest(e.body_text()))?;
    if !q.follow {
        let lines = s.service.logs(id, q.rank, q.after, q.limit).await?;
        return Ok(Json(json!({ "job_id": id, "lines": lines })).into_response());
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
