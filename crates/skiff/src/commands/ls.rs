//! `skiff ls`: services with their state, instance counts and URL.

use std::process::ExitCode;

use clap::Args;
use skiff_api::types::ServiceList;

use super::client::{instances, print_json, ClientArgs, Paint};

#[derive(Debug, Args)]
pub struct LsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn run(args: LsArgs) -> anyhow::Result<ExitCode> {
    let list: ServiceList = args.client.client()?.get("/v1/services").await?;
    if args.client.json {
        print_json(&list)?;
        return Ok(ExitCode::SUCCESS);
    }
    if list.services.is_empty() {
        eprintln!("no services deployed; deploy one with `skiff deploy DIR`");
        return Ok(ExitCode::SUCCESS);
    }
    let paint = Paint::stdout();
    let rows: Vec<[String; 5]> = list
        .services
        .iter()
        .map(|s| {
            [
                s.name.clone(),
                s.state.clone(),
                s.version.map_or("-".into(), |v| v.to_string()),
                instances(&s.instances, &s.state),
                s.url.clone(),
            ]
        })
        .collect();
    let header = ["NAME", "STATE", "VERSION", "INSTANCES", "URL"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let pad = |s: &str, w: usize| format!("{s}{}", " ".repeat(w.saturating_sub(s.chars().count())));
    let head: Vec<String> = header
        .iter()
        .zip(widths)
        .map(|(h, w)| paint.bold(&pad(h, w)))
        .collect();
    println!("{}", head.join("  ").trim_end());
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (c, w))| {
                let padded = pad(c, w);
                if i == 1 {
                    // Colour after padding: escape codes have no width.
                    padded.replacen(c.as_str(), &paint.state(c), 1)
                } else {
                    padded
                }
            })
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
    Ok(ExitCode::SUCCESS)
}
