//! `skiff logs NAME [-f] [--since]`: build and run output and the
//! platform's notes, oldest first.

use std::process::ExitCode;

use bytes::Bytes;
use clap::Args;
use http::Method;
use skiff_api::types::LogLine;
use skiff_runtime::diagnose::Diagnoser;

use super::client::{ClientArgs, Paint};
use super::rm::path_segment;

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The service.
    pub name: String,
    /// Keep following: print new lines as they come.
    #[arg(short, long)]
    pub follow: bool,
    /// Only lines since then: a duration back (10m, 2h) or a time
    /// (2026-11-28T06:00:00Z).
    #[arg(long)]
    pub since: Option<String>,
    /// Only the last N lines (default 1000, unless --since is given).
    #[arg(long)]
    pub tail: Option<u32>,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn run(args: LogsArgs) -> anyhow::Result<ExitCode> {
    let tail = args.tail.map(|t| t.to_string());
    let mut pairs = vec![("follow", if args.follow { "1" } else { "0" })];
    if let Some(s) = &args.since {
        pairs.push(("since", s));
    }
    if let Some(t) = &tail {
        pairs.push(("tail", t));
    }
    let path = format!(
        "/v1/services/{}/logs?{}",
        path_segment(&args.name)?,
        skiff_api::client::query(pairs)
    );
    let client = args.client.client()?;
    let mut lines = client.stream(Method::GET, &path, Bytes::new()).await?;
    let p = Paint::stdout();
    // Known errors are explained under the line where they first show.
    let mut diagnoser = Diagnoser::default();
    while let Some(l) = lines.next::<LogLine>().await? {
        if args.client.json {
            println!("{}", serde_json::to_string(&l)?);
            continue;
        }
        let finding = (l.source == "run")
            .then(|| {
                diagnoser
                    .observe(&l.line, std::time::SystemTime::now())
                    .cloned()
            })
            .flatten();
        let tag = match (l.source.as_str(), &l.instance) {
            ("build", _) => "build".to_string(),
            ("platform", _) => "skiff".to_string(),
            (_, Some(i)) => i.clone(),
            _ => "run".to_string(),
        };
        let text = if l.stream.as_deref() == Some("stderr") || l.source == "platform" {
            p.dim(&tag)
        } else {
            tag
        };
        println!("{} {text} | {}", p.dim(&l.at), l.line);
        if let Some(f) = finding {
            println!(
                "{} {}
    why: {}
    fix: {}",
                p.red("  ^ skiff:"),
                f.what,
                f.why,
                f.fix
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
