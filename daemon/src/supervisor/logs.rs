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
///
/// A dropped sender counts as `true`: `changed()` then returns at once on every call, and the
/// task would spin.
pub async fn tail(store: Store, job_id: i64, rank: u32, path: PathBuf, mut offset: u64, mut stop: watch::Receiver<bool>) {
    let mut sender_gone = false;
    loop {
        let stopping = sender_gone || *stop.borrow();
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
            changed = stop.changed() => sender_gone = changed.is_err(),
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
            _ if rest.len() > MAX_LINE => char_boundary(rest, MAX_LINE),
            _ => break,
        };
        let text = line_text(&rest[..end]);
        lines.push(LogLine { rank, offset: (offset + start as u64) as i64, at_ms, line: text });
        start += end + usize::from(rest.get(end) == Some(&b'\n'));
    }
    Ok((lines, offset + start as u64))
}

/// Where to cut `bytes` at or just below `at` without splitting a UTF-8 character (continuation
/// bytes are `10xxxxxx`; a character has at most three of them).
fn char_boundary(bytes: &[u8], at: usize) -> usize {
    let mut end = at;
    while end > at.saturating_sub(3) && bytes.get(end).is_some_and(|b| b & 0xC0 == 0x80) {
        end -= 1;
    }
    if end == 0 {
        at
    } else {
        end
    }
}

/// A line as stored: UTF-8 (invalid bytes, as in a program's stray binary output, become
/// U+FFFD; the store replaces NUL too), without the `\r` of a CRLF ending.
fn line_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim_end_matches('\r').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The supervisor dropped the stop sender without sending (a start that failed halfway): the
    /// task ends instead of spinning on `changed()`. (Several threads: a spinning task must not
    /// keep the test's own timeout from firing.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tail_whose_stop_sender_is_dropped_ends() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&format!("sqlite://{}", dir.path().join("s.db").display())).await.unwrap();
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(tail(store, 1, 0, dir.path().join("rank-0.log"), 0, rx));
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(tx);
        tokio::time::timeout(Duration::from_secs(2), task).await.expect("the tail ended").unwrap();
    }

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

    #[test]
    fn long_lines_are_cut_between_characters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rank-0.log");
        // 'x' then two-byte characters: a cut at MAX_LINE would fall inside one.
        let long: String = std::iter::once('x').chain(std::iter::repeat_n('é', MAX_LINE)).collect();
        std::fs::write(&path, format!("{long}\nnul\0here\r\n")).unwrap();
        let (lines, next) = read_lines(&path, 0, 0).unwrap();
        assert_eq!(next, (long.len() + "nul\0here\r\n".len() + 1) as u64);
        let pieces: Vec<&str> = lines[..lines.len() - 1].iter().map(|l| l.line.as_str()).collect();
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}') && p.len() <= MAX_LINE), "no character was split");
        assert_eq!(pieces.concat(), long, "the pieces are the line");
        assert_eq!(lines.last().unwrap().line, "nul\0here");
        assert_eq!(line_text(b"bad \xff byte"), "bad \u{FFFD} byte");
    }
}
