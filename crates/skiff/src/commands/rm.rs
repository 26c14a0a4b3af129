//! `skiff rm NAME`: stop and remove a service and its data.

use std::process::ExitCode;

use clap::Args;
use skiff_api::types::Removed;

use super::client::{print_json, ClientArgs};

#[derive(Debug, Args)]
pub struct RmArgs {
    /// The service to remove.
    pub name: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn run(args: RmArgs) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/services/{}", path_segment(&args.name)?);
    let removed: Removed = args.client.client()?.delete(&path).await?;
    if args.client.json {
        print_json(&removed)?;
    } else {
        eprintln!(
            "skiff: removed {} (instances stopped, versions, logs and files deleted)",
            removed.removed
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A service name checked before it goes into a URL path.
pub fn path_segment(name: &str) -> anyhow::Result<String> {
    skiff_model::ServiceName::parse(name)
        .map(|n| n.to_string())
        .map_err(|e| anyhow::anyhow!("{e}"))
}
