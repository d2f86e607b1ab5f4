//! The daemon's one error type. The store turns database errors into `Unavailable` (the server
//! cannot be reached: retry) or `Store` (anything else), so no sqlx type crosses into the service,
//! and HTTP and gRPC map these variants onto the API's small set of error codes.

use gantry_api::{ApiError, ErrorCode, JobState, SpecError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid job spec: {0}")]
    InvalidSpec(#[from] SpecError),
    #[error("{0}")]
    BadRequest(String),
    #[error("job {0} does not exist")]
    JobNotFound(i64),
    #[error("job {id} is {from}; it cannot become {to}")]
    IllegalTransition { id: i64, from: JobState, to: JobState },
    #[error("{0}")]
    Conflict(String),
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// Not now, but soon: retry (a worker registering while its job is still being started).
    #[error("{0}")]
    NotYet(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("database error: {0}")]
    Store(String),
    #[error("{path}: {err}")]
    Io { path: std::path::PathBuf, err: std::io::Error },
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<std::path::PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |err| Error::Io { path, err }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidSpec(e) if e.field.is_empty() => ErrorCode::BadRequest,
            Error::InvalidSpec(_) => ErrorCode::InvalidSpec,
            Error::BadRequest(_) => ErrorCode::BadRequest,
            Error::JobNotFound(_) => ErrorCode::NotFound,
            Error::IllegalTransition { .. } | Error::Conflict(_) => ErrorCode::Conflict,
            Error::Unavailable(_) | Error::NotYet(_) => ErrorCode::Unavailable,
            Error::Unauthorized(_) => ErrorCode::Unauthorized,
            Error::Forbidden(_) => ErrorCode::Forbidden,
            Error::Store(_) | Error::Io { .. } | Error::Internal(_) => ErrorCode::Internal,
        }
    }

    pub fn to_api(&self) -> ApiError {
        match self {
            Error::InvalidSpec(e) => {
                ApiError { code: self.code(), message: e.message.clone(), field: (!e.field.is_empty()).then(|| e.field.clone()) }
            }
            other => ApiError { code: other.code(), message: other.to_string(), field: None },
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) | sqlx::Error::WorkerCrashed => {
                Error::Unavailable(e.to_string())
            }
            // PostgreSQL's "admin shutdown" and "cannot connect now" while it restarts.
            sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("57P") || c.starts_with("08")) => {
                Error::Unavailable(e.to_string())
            }
            // SQLite's BUSY and LOCKED (and their extended codes): another connection held the
            // database past the busy timeout. Worth retrying, as a restarting server is. (SQLite's
            // codes are numbers of up to four digits; PostgreSQL's are five characters.)
            sqlx::Error::Database(db)
                if db.code().is_some_and(|c| c.len() <= 4 && c.parse::<u32>().is_ok_and(|n| matches!(n & 0xff, 5 | 6))) =>
            {
                Error::Unavailable(e.to_string())
            }
            _ => Error::Store(e.to_string()),
        }
    }
}
