//! `skiff deploy [DIR]`: pack, upload, follow the build and the start; exit
//! 0 only when the new version serves.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use http::Method;
use skiff_api::types::DeployMessage;

use super::client::{indent, ClientArgs, Paint};

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The source directory with its skiff.toml (default: `.`).
    pub dir: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: super::OverrideArgs,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn run(args: DeployArgs) -> anyhow::Result<ExitCode> {
    let dir = args.dir.clone().unwrap_or_else(|| PathBuf::from("."));
    let overrides = args.overrides.overrides();
    // The manifest is checked here first, so its errors name the user's
    // own file; the daemon checks it again.
    let spec = match skiff_model::load(&dir, &overrides) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    super::say_what_the_source_shows(&spec);
    let client = args.client.client()?;
    let source = dir.clone();
    let (archive, packed) = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        skiff_api::archive::pack(&source, &mut out).map(|p| (out, p))
    })
    .await
    .context("packing the source")??;
    let paint = Paint::stdout();
    eprintln!(
        "skiff: deploying {} from {} ({} files, {})",
        spec.name,
        dir.display(),
        packed.files,
        skiff_model::format_amount(packed.bytes)
    );
    let port = overrides.port.map(|p| p.to_string());
    // The name always goes along: one derived from the directory's name
    // cannot be derived again from the daemon's staging directory.
    let name = spec.name.to_string();
    let mut pairs: Vec<(&str, &str)> = vec![("name", &name)];
    for (k, v) in [
        ("build", &overrides.build),
        ("start", &overrides.start),
        ("port", &port),
        ("mode", &overrides.mode),
    ] {
        if let Some(v) = v {
            pairs.push((k, v));
        }
    }
    let path = format!("/v1/deploy?{}", skiff_api::client::query(pairs));
    let mut lines = client
        .stream(Method::POST, &path, Bytes::from(archive))
        .await?;
    while let Some(message) = lines.next::<DeployMessage>().await? {
        if args.client.json {
            println!("{}", serde_json::to_string(&message)?);
        }
        match message {
            DeployMessage::Accepted { .. } => {}
            DeployMessage::Progress { message } if !args.client.json => {
                eprintln!("skiff: {message}")
            }
            DeployMessage::Log { source, line } if !args.client.json => {
                let tag = if source == "build" {
                    format!("{name} build")
                } else {
                    name.clone()
                };
                eprintln!("{tag} | {line}");
            }
            DeployMessage::Ready {
                version,
                url,
                sandbox_ms,
                app_ms,
            } => {
                if !args.client.json {
                    eprintln!(
                        "skiff: {name} version {version} is {} (sandbox {sandbox_ms:.1}ms, app \
                         start {app_ms:.1}ms)",
                        paint.state("ready")
                    );
                    println!("{url}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            DeployMessage::Failed {
                error,
                findings,
                serving,
            } => {
                if !args.client.json {
                    let still = match serving {
                        Some(v) => format!("version {v} still serves"),
                        None => "nothing serves yet".into(),
                    };
                    eprintln!(
                        "{} {name} failed to deploy ({still}):\n{}",
                        paint.red("error:"),
                        indent(&error)
                    );
                    for f in findings.iter().filter(|f| !error.contains(&f.fix)) {
                        eprintln!(
                            "skiff: diagnosis: {}\n  why: {}\n  fix: {}",
                            f.what, f.why, f.fix
                        );
                    }
                }
                return Ok(ExitCode::FAILURE);
            }
            _ => {}
        }
    }
    anyhow::bail!(
        "the daemon stopped answering before the deploy finished; `skiff status {name}` shows \
         how it ended"
    )
}
