//! What the benchmarks share: how they start `skiff up`.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};

pub const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");

/// `skiff up DIRS...` on free gateway and API ports with its own state,
/// stdout piped (the URLs), stderr as given.
pub fn skiff_up(state: &Path, dirs: &[&Path], stderr: Stdio) -> Command {
    let mut cmd = Command::new(SKIFF);
    cmd.args([
        "up",
        "--listen",
        "127.0.0.1:0",
        "--api",
        "127.0.0.1:0",
        "--state",
    ])
    .arg(state)
    .args(dirs)
    .stdout(Stdio::piped())
    .stderr(stderr);
    cmd
}

/// The port in a URL `skiff up` printed (`http://NAME.localhost:PORT/`).
pub fn port_of(url: &str) -> Option<u16> {
    url.trim_end_matches('/').rsplit(':').next()?.parse().ok()
}
