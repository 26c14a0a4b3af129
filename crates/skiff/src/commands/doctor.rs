//! `skiff doctor NAME`: the service checked against the common errors
//! (docs/contract.md §3 and more): each finding with what happened, the
//! evidence, why, and what to do; and where the time of its starts went.

use std::process::ExitCode;

use clap::Args;
use skiff_api::types::{Doctor, Start};

use super::client::{print_json, ClientArgs, Paint};
use super::rm::path_segment;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The service.
    pub name: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn run(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/services/{}/doctor", path_segment(&args.name)?);
    let d: Doctor = args.client.client()?.get(&path).await?;
    if args.client.json {
        print_json(&d)?;
        return Ok(ExitCode::SUCCESS);
    }
    let p = Paint::stdout();
    let of_version = d
        .version
        .map(|v| format!(" of version {v}"))
        .unwrap_or_default();
    println!(
        "{} ({}): looked at {} lines of output and {} platform events{of_version}",
        p.bold(&d.service),
        p.state(&d.state),
        d.log_lines,
        d.events
    );
    if d.findings.is_empty() {
        println!("\nNo known problem found.");
    }
    for (i, f) in d.findings.iter().enumerate() {
        let seen = if f.count > 1 {
            format!("seen {} times, last {}", f.count, f.last_seen)
        } else {
            format!("seen {}", f.last_seen)
        };
        println!("\n{} {}", p.red(&format!("{}.", i + 1)), p.bold(&f.what));
        println!("   {}", p.dim(&seen));
        if !f.evidence.is_empty() {
            println!("   evidence: {}", f.evidence);
        }
        println!("   why: {}", f.why);
        println!("   fix: {}", f.fix);
    }
    if !d.starts.is_empty() {
        println!(
            "\n{}",
            p.bold("Last starts (ms from the request to start the instance):")
        );
        println!("{}", phase_header());
        for s in &d.starts {
            println!("{}", phase_row(s));
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn phase_header() -> String {
    format!(
        "  {:<28} {:>13} {:>15} {:>14} {:>12}",
        "instance", "sandbox ready", "process started", "port listening", "first answer"
    )
}

pub fn phase_row(s: &Start) -> String {
    format!(
        "  {:<28} {:>13.1} {:>15.1} {:>14.1} {:>12.1}",
        s.instance,
        s.sandbox_ready_ms,
        s.process_started_ms,
        s.port_listening_ms,
        s.first_answer_ms
    )
}
