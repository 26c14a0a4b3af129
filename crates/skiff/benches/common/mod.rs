//! What the benchmarks share: how they start `skiff up`, and which skiff
//! builds they measure.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");

/// The skiff builds to measure, named: this one, and the one in
/// `SKIFF_BASELINE` when it is set (e.g. a release build of the commit
/// before a change), so that a change is measured against what it changes
/// in the same run, in turns.
pub fn builds() -> Vec<(&'static str, PathBuf)> {
    let mut builds = vec![("this build", PathBuf::from(SKIFF))];
    if let Some(baseline) = std::env::var_os("SKIFF_BASELINE") {
        builds.push(("baseline", PathBuf::from(baseline)));
    }
    builds
}

/// `skiff up DIRS...` on free gateway and API ports with its own state,
/// stdout piped (the URLs), stderr as given.
pub fn skiff_up(state: &Path, dirs: &[&Path], stderr: Stdio) -> Command {
    skiff_up_with(Path::new(SKIFF), state, dirs, stderr)
}

/// `skiff_up` with another skiff build.
pub fn skiff_up_with(skiff: &Path, state: &Path, dirs: &[&Path], stderr: Stdio) -> Command {
    let mut cmd = Command::new(skiff);
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
