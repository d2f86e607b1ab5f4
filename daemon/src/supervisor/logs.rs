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
use crate::text::{clean_line, cut_line, MAX_LINE};

/// Tails `path` from `offset` until `stop` turns true, then copies what is left and returns.
///
/// A dropped sender counts as `true`: `changed()` then returns at once on every call, and the
/// task would spin.
pub async fn tail(store: Store, job_id: i64, rank: u32, path: PathBuf, mut offset: u64, mut stop: watch::Receiver<bool>) {
    let mut sender_gone = false;
    // Inside a line too long to store, whose first `MAX_LINE` bytes were stored: the rest is
    // passed over up to its end.
    let mut skipping = false;
    loop {
        let stopping = sender_gone || *stop.borrow();
        loop {
            let mut skip = skipping;
            let (lines, next) = match read_lines(&path, offset, rank, &mut skip) {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!("reading {}: {e}", path.display());
                    break;
                }
            };
            if next == offset {
                break;
            }
            match store.insert_logs(job_id, &lines).await {
                Ok(()) => {
                    offset = next;
                    skipping = skip;
                }
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

/// Complete lines after `offset`, at most 1,000; the offset after them. A line longer than
/// `MAX_LINE` is stored once, cut and marked, and the rest of it passed over (`skipping` says a
/// read ended inside such a line).
fn read_lines(path: &PathBuf, offset: u64, rank: u32, skipping: &mut bool) -> std::io::Result<(Vec<LogLine>, u64)> {
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
    while lines.len() < 1000 && start < buf.len() {
        let rest = &buf[start..];
        let newline = rest.iter().position(|&b| b == b'\n');
        if *skipping {
            match newline {
                Some(i) => {
                    start += i + 1;
                    *skipping = false;
                    continue;
                }
                None => {
                    start = buf.len();
                    break;
                }
            }
        }
        let at = (offset + start as u64) as i64;
        match newline {
            Some(i) if i <= MAX_LINE => {
                lines.push(LogLine { rank, offset: at, at_ms, line: line_text(&rest[..i]) });
                start += i + 1;
            }
            Some(i) => {
                // (A few bytes past the cut, so the character it falls in comes whole.)
                lines.push(LogLine { rank, offset: at, at_ms, line: cut_line(&line_text(&rest[..i.min(MAX_LINE + 4)]), i) });
                start += i + 1;
            }
            None if rest.len() > MAX_LINE => {
                let line = format!("{} (the line goes on)", cut_line(&line_text(&rest[..rest.len().min(MAX_LINE + 4)]), rest.len()));
                lines.push(LogLine { rank, offset: at, at_ms, line });
                *skipping = true;
                start = buf.len();
            }
            None => break,
        }
    }
    Ok((lines, offset + start as u64))
}

/// A line as stored: UTF-8 (invalid bytes, as in a program's stray binary output, become
/// U+FFFD), without the `\r` of a CRLF ending, escape sequences and other control characters
/// made harmless (see `text::clean_line`).
fn line_text(bytes: &[u8]) -> String {
    clean_line(&String::from_utf8_lossy(bytes))
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
        let mut skip = false;
        std::fs::write(&path, "first\nsecond line\npartial").unwrap();
        let (lines, next) = read_lines(&path, 0, 0, &mut skip).unwrap();
        assert_eq!(lines.iter().map(|l| (l.offset, l.line.as_str())).collect::<Vec<_>>(), [(0, "first"), (6, "second line")]);
        assert_eq!(next, 18);
        std::fs::write(&path, "first\nsecond line\npartial, now complete\n").unwrap();
        let (lines, next) = read_lines(&path, next, 0, &mut skip).unwrap();
        assert_eq!(lines.iter().map(|l| (l.offset, l.line.as_str())).collect::<Vec<_>>(), [(18, "partial, now complete")]);
        assert_eq!(next, 40);
        assert!(read_lines(&path, 40, 0, &mut skip).unwrap().0.is_empty());
    }

    /// A line longer than 16 KiB is stored once, cut between characters and marked; the rest of it
    /// is passed over even when it is still being written; escape sequences do not reach the store.
    #[test]
    fn long_lines_are_cut_once_and_marked_and_escapes_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rank-0.log");
        // 'x' then two-byte characters: a cut at MAX_LINE would fall inside one.
        let long: String = std::iter::once('x').chain(std::iter::repeat_n('é', MAX_LINE)).collect();
        std::fs::write(&path, format!("{long}\nnul\0here\r\n\u{1b}[31mred\u{1b}[0m\n")).unwrap();
        let mut skip = false;
        let (lines, next) = read_lines(&path, 0, 0, &mut skip).unwrap();
        assert_eq!(next, (long.len() + "nul\0here\r\n".len() + "\u{1b}[31mred\u{1b}[0m\n".len() + 1) as u64);
        assert_eq!(lines.len(), 3);
        let (kept, mark) = lines[0].line.split_once('…').unwrap();
        assert!(long.starts_with(kept) && kept.len() <= MAX_LINE && kept.len() > MAX_LINE - 4, "cut between characters");
        assert!(mark.contains(&format!("the line has {} bytes", long.len())), "{mark}");
        assert_eq!(lines[1].line, "nul\\x00here");
        assert_eq!(lines[2].line, "red");

        // A line still being written: its first 16 KiB are stored, what follows is passed over.
        std::fs::write(&path, "x".repeat(MAX_LINE + 100)).unwrap();
        let mut skip = false;
        let (lines, next) = read_lines(&path, 0, 0, &mut skip).unwrap();
        assert!(skip && lines.len() == 1 && lines[0].line.ends_with("(the line goes on)"), "{:?}", lines[0].line.len());
        std::fs::write(&path, format!("{}\nnext\n", "x".repeat(MAX_LINE + 5000))).unwrap();
        let (lines, _) = read_lines(&path, next, 0, &mut skip).unwrap();
        assert!(!skip);
        assert_eq!(lines.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(), ["next"]);
    }
}
