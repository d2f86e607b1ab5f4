//! Copies each rank's log file into the store as it grows.
//!
//! Lines are keyed by their byte offset in the file, so the copy resumes exactly where the store
//! ends after a daemon restart, and a line copied twice is stored once. The file on disk stays the
//! full record; the store is what the API and `gantry logs` read.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use gantry_api::LogLine;
use tokio::sync::watch;

use crate::store::{now_ms, Store};

/// Longest line stored as one row; longer ones are cut into pieces of this size.
const MAX_LINE: usize = 16 * 1024;

/// Tails `path` from `offset` until `stop` turns true, then copies what is left and returns.
pub async fn tail(store: Store, job_id: i64, rank: u32, path: PathBuf, mut offset: u64, mut stop: watch::Receiver<bool>) {
    loop {
        let stopping = *stop.borrow();
        loop {
            let (lines, next) = match read_lines(&path, offset, rank) {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!("reading {}: {e}", path.display());
                    break;
                }
            };
            if lines.is_empty() {
                break;
            }
            match store.insert_logs(job_id, &lines).await {
                Ok(()) => offset = next,
                Err(e) => {
                    // The store is away: keep the offset and try again on the next round.
                    tracing::warn!(job_id, rank, "storing log lines: {e}");
                    break;
                }
            }
        }
        if stopping {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Complete lines (or `MAX_LINE` pieces) after `offset`, at most 1,000; the offset after them.
fn read_lines(path: &PathBuf, offset: u64, rank: u32) -> std::io::Result<(Vec<LogLine>, u64)> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    if len <= offset {
        return Ok((Vec::new(), offset));
    }
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; (len - offset).min(4 << 20) as usize];
    f.read_exact(&mut buf)?;
    let at_ms = now_ms();
    let mut lines = Vec::new();
    let mut start = 0;
    while lines.len() < 1000 {
        let rest = &buf[start..];
        let end = match rest.iter().position(|&b| b == b'\n') {
            Some(i) if i <= MAX_LINE => i,
            _ if rest.len() > MAX_LINE => MAX_LINE,
            _ => break,
        };
        let text = String::from_utf8_lossy(&rest[..end]).trim_end_matches('\r').to_string();
        lines.push(LogLine { rank, offset: (offset + start as u64) as i64, at_ms, line: text });
        start += end + usize::from(rest.get(end) == Some(&b'\n'));
    }
    Ok((lines, offset + start as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_complete_lines_are_read_and_offsets_are_byte_positions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rank-0.log");
        std::fs::write(&path, "first\nsecond line\npartial").unwrap();
        let (lines, next) = read_lines(&path, 0, 0).unwrap();
        assert_eq!(lines.iter().map(|l| (l.offset, l.line.as_str())).collect::<Vec<_>>(), [(0, "first"), (6, "second line")]);
        assert_eq!(next, 18);
        std::fs::write(&path, "first\nsecond line\npartial, now complete\n").unwrap();
        let (lines, next) = read_lines(&path, next, 0).unwrap();
        assert_eq!(lines.iter().map(|l| (l.offset, l.line.as_str())).collect::<Vec<_>>(), [(18, "partial, now complete")]);
        assert_eq!(next, 40);
        assert!(read_lines(&path, 40, 0).unwrap().0.is_empty());
    }
}
