//! What the client commands share: finding the daemon (its address and
//! token are in its state directory), and output rules (colour only on a
//! terminal, never with NO_COLOR).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use skiff_api::Client;

use super::DEFAULT_STATE;

/// The file in the state directory holding the control API's token.
pub const TOKEN_FILE: &str = "api-token";
/// The file in the state directory naming the address the API listens on.
pub const ADDRESS_FILE: &str = "api-address";

/// How a client command reaches the daemon.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Control API address (default: what the daemon on --state wrote,
    /// else 127.0.0.1:7070).
    #[arg(long, env = "SKIFF_API")]
    pub api: Option<SocketAddr>,
    /// The daemon's state directory, where its address and token are.
    #[arg(long, env = "SKIFF_STATE")]
    pub state: Option<PathBuf>,
    /// The API token (default: read from the state directory).
    #[arg(long, env = "SKIFF_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Machine-readable JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

impl ClientArgs {
    pub fn client(&self) -> anyhow::Result<Client> {
        let state = self
            .state
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE));
        let addr = match self.api {
            Some(a) => a,
            None => read_address(&state)?.unwrap_or_else(|| ([127, 0, 0, 1], 7070).into()),
        };
        let token = match &self.token {
            Some(t) => t.clone(),
            None => read_token(&state)?,
        };
        Ok(Client::new(addr, token))
    }
}

fn read_address(state: &Path) -> anyhow::Result<Option<SocketAddr>> {
    let path = state.join(ADDRESS_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map(Some).with_context(|| {
            format!(
                "{} does not hold an address; restart `skiff serve` or pass --api",
                path.display()
            )
        }),
        Err(_) => Ok(None),
    }
}

fn read_token(state: &Path) -> anyhow::Result<String> {
    let path = state.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        Ok(_) => anyhow::bail!(
            "the API token file {} is empty; restart `skiff serve` to write a new one",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => anyhow::bail!(
            "cannot read the API token {}: only root may; run this as root, or pass --token \
             (or SKIFF_TOKEN)",
            path.display()
        ),
        Err(e) => anyhow::bail!(
            "cannot read the API token {}: {e}; is `skiff serve` running with --state {}? \
             Start it, or pass --state, --api and --token",
            path.display(),
            state.display()
        ),
    }
}

/// Colour on stdout: only on a terminal, and never when NO_COLOR is set
/// (https://no-color.org) or the terminal is dumb.
#[derive(Debug, Clone, Copy)]
pub struct Paint(bool);

impl Paint {
    pub fn stdout() -> Self {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        Self(std::io::stdout().is_terminal() && !no_color && !dumb)
    }

    /// No colour, whatever the terminal (for tests).
    #[cfg(test)]
    pub fn plain() -> Self {
        Self(false)
    }

    fn paint(self, code: &str, text: &str) -> String {
        if self.0 {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    pub fn bold(self, text: &str) -> String {
        self.paint("1", text)
    }

    pub fn dim(self, text: &str) -> String {
        self.paint("2", text)
    }

    pub fn red(self, text: &str) -> String {
        self.paint("31", text)
    }

    /// A service or version state, coloured by what it means.
    pub fn state(self, state: &str) -> String {
        match state {
            "ready" => self.paint("32", state),
            "failed" => self.paint("31", state),
            "deploying" | "building" | "starting" => self.paint("33", state),
            _ => self.dim(state),
        }
    }
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// "2 running, 1 suspended", or why there are none.
pub fn instances(i: &skiff_api::types::Instances, state: &str) -> String {
    let mut parts = Vec::new();
    for (n, what) in [
        (i.running, "running"),
        (i.suspended, "suspended"),
        (i.starting, "starting"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {what}"));
        }
    }
    if parts.is_empty() {
        match state {
            "ready" => "none (scaled to zero)".into(),
            _ => "none".into(),
        }
    } else {
        parts.join(", ")
    }
}

/// Every line of `text` indented by two spaces.
pub fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
