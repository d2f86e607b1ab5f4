//! Progress bars on stderr (hidden when stderr is not a terminal, where a log line per step is
//! written instead by the caller).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub fn bar(len: u64, template: &str, enabled: bool) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let target = if enabled { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
    pb.set_draw_target(target);
    pb.set_style(ProgressStyle::with_template(template).expect("progress templates are static").progress_chars("=> "));
    pb
}

/// Whether stderr is an interactive terminal.
pub fn interactive() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}
