//! `skiff status NAME`: state, instances, versions, and the last errors
//! with their explanation.

use std::process::ExitCode;

use clap::Args;
use skiff_api::types::ServiceStatus;

use super::client::{indent, instances, print_json, ClientArgs, Paint};
use super::doctor::{phase_header, phase_row};
use super::rm::path_segment;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The service.
    pub name: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/services/{}", path_segment(&args.name)?);
    let s: ServiceStatus = args.client.client()?.get(&path).await?;
    if args.client.json {
        print_json(&s)?;
        return Ok(ExitCode::SUCCESS);
    }
    let p = Paint::stdout();
    let sum = &s.summary;
    println!("{}  {}", p.bold(&sum.name), p.state(&sum.state));
    println!("  url:        {}", sum.url);
    if let Some(mode) = &sum.mode {
        println!("  mode:       {mode}");
    }
    println!(
        "  version:    {}",
        sum.version.map_or("-".into(), |v| v.to_string())
    );
    println!("  instances:  {}", instances(&sum.instances, &sum.state));
    if s.draining > 0 {
        println!(
            "  draining:   {} replaced version(s) answering what they accepted",
            s.draining
        );
    }
    if let Some(v) = sum.deploying {
        println!("  deploying:  version {v}");
    }
    if let Some(start) = &s.start {
        println!("  start:      {start}");
    }
    if let Some(build) = &s.build {
        println!("  build:      {build}");
    }
    if let Some(port) = s.port {
        println!("  port:       {port}");
    }
    if let Some(e) = &sum.error {
        println!("  {}\n{}", p.red("not serving:"), indent(&indent(e)));
    }
    if !s.versions.is_empty() {
        println!("{}", p.bold("versions (newest first):"));
        for v in &s.versions {
            let mut line = format!("  {:>4}  {:<9} {}", v.id, p.state(&v.state), v.created_at);
            if let Some(b) = v.build_ms {
                line.push_str(&format!("  build {:.1}s", b as f64 / 1000.0));
            }
            if let (Some(sb), Some(app)) = (v.sandbox_ms, v.app_ms) {
                line.push_str(&format!("  start: sandbox {sb}ms, app {app}ms"));
            }
            println!("{line}");
            if let Some(e) = &v.error {
                let first = e.lines().next().unwrap_or_default();
                println!("        {}", p.dim(first));
            }
        }
    }
    if let Some(start) = &s.last_start {
        println!("{}", p.bold("last start (ms from the request to start):"));
        println!("{}", phase_header());
        println!("{}", phase_row(start));
    }
    if !s.recent_errors.is_empty() {
        println!("{}", p.bold("last errors:"));
        for e in &s.recent_errors {
            println!(
                "  {}  {}",
                e.at,
                e.message.lines().next().unwrap_or_default()
            );
        }
    }
    if !s.findings.is_empty() {
        println!("{}", p.bold("diagnosis (skiff doctor shows the evidence):"));
        for f in &s.findings {
            println!(
                "  {} (seen {}x, last {})\n    why: {}\n    fix: {}",
                f.what, f.count, f.last_seen, f.why, f.fix
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
