//! The database's identity and the data directories that served it (see `crate::datadir`).

use sqlx::Row;

use super::{now_ms, Store};
use crate::error::Result;

impl Store {
    /// This database's identity, made the first time it is asked for.
    pub async fn database_id(&self) -> Result<String> {
        let made = crate::datadir::new_id()?;
        // Two daemons starting on a new database at once: one insert wins, both read it.
        sqlx::query("INSERT INTO store_identity (id, database_id, created_ms) VALUES (1, $1, $2) ON CONFLICT (id) DO NOTHING")
            .bind(&made)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(sqlx::query("SELECT database_id FROM store_identity WHERE id = 1").fetch_one(&self.pool).await?.try_get("database_id")?)
    }

    /// Records that the data directory `id` (at `host:path`) serves this database; returns the
    /// other data directories that served it before, as (id, host, path).
    pub async fn record_data_dir(&self, id: &str, host: &str, path: &str) -> Result<Vec<(String, String, String)>> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO data_dirs (id, host, path, first_seen_ms, last_seen_ms) VALUES ($1, $2, $3, $4, $4) \
             ON CONFLICT (id) DO UPDATE SET host = $2, path = $3, last_seen_ms = $4",
        )
        .bind(id)
        .bind(host)
        .bind(path)
        .bind(now)
        .execute(&self.pool)
        .await?;
        let rows = sqlx::query("SELECT id, host, path FROM data_dirs WHERE id <> $1 ORDER BY last_seen_ms DESC")
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok((r.try_get("id")?, r.try_get("host")?, r.try_get("path")?))).collect()
    }
}
