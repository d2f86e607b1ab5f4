//! Text that came from a worker (its output, a failure's message), made safe to store and to print
//! on a terminal: a log line can carry anything a program writes, and escape sequences printed
//! raw by `gantry logs` would move another user's cursor, recolour their terminal, or set its
//! title.

/// The longest log line stored whole, in bytes; a longer one is stored cut, marked as such (the
/// log file on disk keeps it whole).
pub const MAX_LINE: usize = 16 * 1024;

/// `line` with ANSI escape sequences (colours, cursor moves, titles) removed, what a terminal
/// would overwrite before a carriage return dropped, and every other control character but tab
/// written out (`\x07`).
pub fn clean_line(line: &str) -> String {
    // What a terminal shows of `50%\r60%\r70%`: the text after the last carriage return.
    let line = match line.trim_end_matches('\r').rsplit_once('\r') {
        Some((_, shown)) => shown,
        None => line.trim_end_matches('\r'),
    };
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => skip_escape(&mut chars),
            // The one-character CSI of the C1 set.
            '\u{9b}' => skip_csi(&mut chars),
            '\t' => out.push('\t'),
            c if (c as u32) < 0x20 || c == '\u{7f}' => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if ('\u{80}'..='\u{9f}').contains(&c) => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// After an ESC: a CSI (`ESC [ … final`), an OSC or other string (`ESC ] … BEL` or `… ESC \`),
/// or a two- or three-character sequence (`ESC c`, `ESC ( B`).
fn skip_escape(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    match chars.next() {
        Some('[') => skip_csi(chars),
        Some(']' | 'P' | 'X' | '^' | '_') => {
            while let Some(c) = chars.next() {
                if c == '\u{7}' || (c == '\u{1b}' && chars.next_if_eq(&'\\').is_some()) {
                    break;
                }
            }
        }
        Some(c) if (' '..='/').contains(&c) => {
            chars.next();
        }
        _ => {}
    }
}

/// A CSI's parameters and intermediates up to its final byte (`@` to `~`).
fn skip_csi(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    for c in chars.by_ref() {
        if ('@'..='~').contains(&c) {
            break;
        }
    }
}

/// `line` cut to at most `MAX_LINE` bytes (between characters), with a mark saying it was.
pub fn cut_line(line: &str, whole_len: usize) -> String {
    let mut end = MAX_LINE.min(line.len());
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [cut: the line has {whole_len} bytes; the first {end} are shown]", &line[..end])
}

/// A field for a terminal (a job's name, reason or path): cleaned, and at most `max` characters,
/// the rest marked `…`.
pub fn for_terminal(text: &str, max: usize) -> String {
    let clean = clean_line(&text.replace('\n', " "));
    if clean.chars().count() <= max {
        return clean;
    }
    let mut cut: String = clean.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_go_and_other_control_characters_are_written_out() {
        assert_eq!(clean_line("\u{1b}[1;31merror\u{1b}[0m: bad"), "error: bad");
        assert_eq!(clean_line("\u{1b}]0;owned title\u{7}text"), "text");
        assert_eq!(clean_line("\u{1b}]8;;http://x\u{1b}\\link\u{1b}]8;;\u{1b}\\"), "link");
        assert_eq!(clean_line("a\u{1b}(Bb\u{1b}cc"), "abc");
        assert_eq!(clean_line("\u{9b}2Jclear"), "clear");
        assert_eq!(clean_line("bell\u{7} nul\0 del\u{7f} c1\u{85}\ttab"), "bell\\x07 nul\\x00 del\\x7f c1\\u{0085}\ttab");
        assert_eq!(clean_line("10%\r50%\r100%"), "100%");
        assert_eq!(clean_line("crlf\r"), "crlf");
        assert_eq!(clean_line("plain text, ünïcödé"), "plain text, ünïcödé");
        assert_eq!(clean_line("\u{1b}"), "");
    }

    #[test]
    fn long_text_is_cut_between_characters_and_marked() {
        let long = "é".repeat(MAX_LINE);
        let cut = cut_line(&long, long.len());
        let (kept, mark) = cut.split_once('…').unwrap();
        assert_eq!(kept.len(), MAX_LINE);
        assert!(mark.contains(&format!("the line has {} bytes", long.len())), "{mark}");
        assert_eq!(for_terminal(&"x".repeat(100), 10), format!("{}…", "x".repeat(9)));
        assert_eq!(for_terminal("a\nb\u{1b}[2J", 10), "a b");
    }
}
