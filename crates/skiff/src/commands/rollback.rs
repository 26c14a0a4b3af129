//! `skiff rollback NAME [VERSION]`: an earlier version's image serves again.

use std::process::ExitCode;

use clap::Args;
use skiff_api::client::query;
use skiff_api::types::RolledBack;

use super::client::{print_json, ClientArgs};
use super::rm::path_segment;

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The service to roll back.
    pub name: String,
    /// The version to serve again (default: the last one that served
    /// before the serving one; `skiff status NAME` lists them).
    pub version: Option<u64>,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn run(args: RollbackArgs) -> anyhow::Result<ExitCode> {
    let mut path = format!("/v1/services/{}/rollback", path_segment(&args.name)?);
    if let Some(v) = args.version {
        path.push('?');
        path.push_str(&query([("version", v.to_string().as_str())]));
    }
    let done: RolledBack = args.client.client()?.post(&path).await?;
    if args.client.json {
        print_json(&done)?;
    } else {
        println!("{}", done.url);
        eprintln!(
            "skiff: {} serves the earlier image as version {}",
            args.name, done.version
        );
    }
    Ok(ExitCode::SUCCESS)
}
