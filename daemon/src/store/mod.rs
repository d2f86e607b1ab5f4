//! All of the daemon's SQL, for PostgreSQL and SQLite.
//!
//! One implementation serves both: queries go through sqlx's `Any` driver with `$N` placeholders,
//! which both servers accept, and the schema uses only types both share (BIGINT, TEXT, floats;
//! times as Unix milliseconds). So the shared test suite runs the very same code against each
//! backend, and only the migrations (`migrations/postgres`, `migrations/sqlite`) differ.
//!
//! State changes are conditional updates (`WHERE state = <the state we read>`) in a transaction
//! with their event, so two writers racing on a job cannot both win and no transition goes
//! unrecorded.

mod identity;
pub mod jobs;
mod lease;
mod records;
#[cfg(test)]
mod tests;

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::AnyPool;

use crate::error::{Error, Result};

pub use lease::LeaseHolder;
pub use records::WorkerRecord;

/// Which server a store talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

impl Store {
    /// Connects to `postgres://…` or `sqlite://…` (the SQLite file is created if missing) and
    /// brings the schema up to date.
    pub async fn connect(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(Error::BadRequest(format!("database URL `{url}` is neither postgres://… nor sqlite://…")));
        };
        let url = match backend {
            // Create the file on first use; WAL lets the API read while the supervisor writes.
            Backend::Sqlite if !url.contains('?') => format!("{url}?mode=rwc"),
            _ => url.to_string(),
        };
        let options = AnyConnectOptions::from_str(&url).map_err(|e| Error::BadRequest(format!("database URL: {e}")))?;
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 16 })
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        use sqlx::Executor;
                        conn.execute("PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;").await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        let migrated = match backend {
            Backend::Postgres => sqlx::migrate!("../migrations/postgres").run(&pool).await,
            Backend::Sqlite => sqlx::migrate!("../migrations/sqlite").run(&pool).await,
        };
        migrated.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => Error::from(e),
            other => Error::Store(format!("migrating the schema: {other}")),
        })?;
        Ok(Store { pool, backend })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Cheap round trip, for `/readyz`.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
