//! The job service's gate: a call's token is checked on its headers, before tonic reads and
//! decodes its message (up to `JOB_MESSAGE_LIMIT`), so callers without a token make the daemon
//! hold nothing; and a call that takes longer than its limit (a client that never finishes its
//! message) is answered `DEADLINE_EXCEEDED` rather than held.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::Status;

use super::status;
use crate::auth::Auth;
use crate::metrics::Metrics;

/// `inner` (the job service's routes) behind the token check and a time limit.
#[derive(Clone)]
pub struct Gate<S> {
    pub inner: S,
    pub auth: Arc<Auth>,
    pub metrics: Metrics,
    pub limit: Duration,
}

type Answer = http::Response<tonic::body::Body>;

impl<S, B> tower::Service<http::Request<B>> for Gate<S>
where
    S: tower::Service<http::Request<B>, Response = Answer, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Answer;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Answer, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let header = req.headers().get(http::header::AUTHORIZATION).map(|v| v.to_str().unwrap_or("?"));
        match self.auth.caller(header) {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                // The ready service answers this call; a clone waits for the next (tower's rule).
                let clone = self.inner.clone();
                let mut ready = std::mem::replace(&mut self.inner, clone);
                let limit = self.limit;
                Box::pin(async move {
                    match tokio::time::timeout(limit, ready.call(req)).await {
                        Ok(answer) => answer,
                        Err(_) => Ok(Status::deadline_exceeded(format!("the call took longer than {}s", limit.as_secs())).into_http()),
                    }
                })
            }
            Err(e) => {
                let method = req.uri().path().rsplit('/').next().unwrap_or("").to_string();
                self.metrics.grpc_requests.with_label_values(&[&method, "unauthorized"]).inc();
                let answer = status(e).into_http();
                Box::pin(async move { Ok(answer) })
            }
        }
    }
}
