//! Test helpers: a store on a fresh SQLite file or a fresh PostgreSQL database.

use std::sync::atomic::{AtomicUsize, Ordering};

use sqlx::Connection;

use crate::store::Store;

/// Keeps a test's database alive; drops the PostgreSQL database (best effort) at the end.
pub enum Guard {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres { admin_url: String, name: String },
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Guard::Postgres { admin_url, name } = self {
            let (admin_url, name) = (admin_url.clone(), name.clone());
            // The test's runtime is shutting down: drop the database from a thread of our own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
                rt.block_on(async {
                    let mut c = sqlx::PgConnection::connect(&admin_url).await.ok()?;
                    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut c).await.ok()
                })
            })
            .join();
        }
    }
}

pub async fn sqlite_store() -> (Store, Guard) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("gantry.db").display());
    (Store::connect(&url).await.unwrap(), Guard::Sqlite(dir))
}

/// The server under test: `GANTRY_TEST_DATABASE_URL` (`scripts/test` sets it to the local
/// server). Missing, the PostgreSQL half of the suite fails rather than passing unseen.
pub fn postgres_admin_url() -> String {
    std::env::var("GANTRY_TEST_DATABASE_URL")
        .expect("GANTRY_TEST_DATABASE_URL must name a PostgreSQL server for the store tests (scripts/test sets it)")
}

/// Creates a database of its own for one test, so tests run in parallel without sharing rows.
pub async fn fresh_postgres_database() -> (String, Guard) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let admin_url = postgres_admin_url();
    let name = format!("gantry_test_{}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed), crate::store::now_ms() % 100_000);
    let mut c = sqlx::PgConnection::connect(&admin_url).await.unwrap_or_else(|e| panic!("connecting to {admin_url}: {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut c).await.unwrap();
    let (base, query) = match admin_url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (admin_url.as_str(), String::new()),
    };
    let url = format!("{}/{name}{query}", base.rsplit_once('/').map(|(h, _)| h).unwrap_or(base));
    (url, Guard::Postgres { admin_url: admin_url.clone(), name })
}

pub async fn postgres_store() -> (Store, Guard) {
    let (url, guard) = fresh_postgres_database().await;
    (Store::connect(&url).await.unwrap(), guard)
}
