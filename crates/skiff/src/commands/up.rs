//! `skiff up [DIR]...`: the whole platform in one foreground process.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use skiff_runtime::diagnose::Diagnoser;
use skiff_runtime::{Event, Phase, Platform};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::broadcast::error::RecvError;

use super::client::indent;
use super::serve::start_api;
use super::PlatformArgs;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Source directories to deploy, each with its skiff.toml (default: `.`).
    pub dirs: Vec<PathBuf>,
    #[command(flatten)]
    pub overrides: super::OverrideArgs,
    #[command(flatten)]
    pub platform: PlatformArgs,
}

pub async fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    let dirs = if args.dirs.is_empty() {
        vec![PathBuf::from(".")]
    } else {
        args.dirs.clone()
    };
    if dirs.len() > 1 && args.overrides.name.is_some() {
        anyhow::bail!("--name names one service, but {} directories were given; put name = \"...\" in each skiff.toml instead", dirs.len());
    }
    let overrides = args.overrides.overrides();
    let mut specs = Vec::new();
    let mut bad = 0;
    for dir in &dirs {
        match skiff_model::load(dir, &overrides) {
            Ok(spec) => {
                super::say_what_the_source_shows(&spec);
                specs.push(spec)
            }
            Err(e) => {
                eprintln!("error: {e}");
                bad += 1;
            }
        }
    }
    if bad > 0 {
        return Ok(ExitCode::FAILURE);
    }
    for (i, s) in specs.iter().enumerate() {
        if let Some(other) = specs[..i].iter().find(|o| o.name == s.name) {
            anyhow::bail!(
                "{} and {} are both named {:?}; service names must differ (set name = \"...\" in skiff.toml)",
                other.source.display(),
                s.source.display(),
                s.name.as_str()
            );
        }
    }

    let config = args.platform.config()?;
    let state = config.state_dir.clone();
    let platform = Platform::start(config).await?;
    // The control API too, so `skiff ls`, `status` and `logs` reach this
    // platform; without it the services still run.
    let api = match start_api(&platform.handle(), &args.platform, &state).await {
        Ok(api) => Some(api),
        Err(e) => {
            eprintln!(
                "skiff: warning: {e}; `skiff ls`, `status` and `logs` will not reach this platform"
            );
            None
        }
    };
    let renderer = tokio::spawn(render(platform.subscribe()));

    let mut sigterm = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot watch for Ctrl-C")?;
    let stop = async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
    };
    tokio::pin!(stop);

    let mut failed = 0;
    let mut interrupted = false;
    for spec in &specs {
        tokio::select! {
            result = platform.deploy(spec) => match result {
                Ok(deployed) => {
                    eprintln!(
                        "skiff: {} is ready (sandbox {}, app start {})",
                        spec.name,
                        ms(deployed.report.sandbox),
                        ms(deployed.report.app)
                    );
                    println!("{}", deployed.url);
                }
                Err(e) => {
                    failed += 1;
                    eprintln!("error: {} failed to start:\n{}", spec.name, indent(&e.to_string()));
                }
            },
            _ = &mut stop => {
                interrupted = true;
                break;
            }
        }
    }
    if !interrupted && failed < specs.len() {
        eprintln!(
            "skiff: serving on http://{}; press Ctrl-C to stop",
            platform.gateway_addr()
        );
        (&mut stop).await;
    }
    eprintln!("skiff: stopping");
    if let Some(api) = api {
        api.stop().await;
    }
    platform.shutdown().await;
    let _ = std::fs::remove_file(state.join(super::client::ADDRESS_FILE));
    renderer.abort();
    Ok(if failed > 0 && failed == specs.len() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1000.0)
}

/// Prints what the platform reports: base image progress, service logs.
async fn render(mut events: tokio::sync::broadcast::Receiver<Event>) {
    let tty = std::io::stderr().is_terminal();
    let mut spinner: Option<ProgressBar> = None;
    let mut diagnosers: HashMap<String, Diagnoser> = HashMap::new();
    loop {
        let event = match events.recv().await {
            Ok(e) => e,
            Err(RecvError::Lagged(n)) => {
                eprintln!("skiff: ({n} log lines skipped: output too fast to show)");
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        match event {
            Event::BaseImage { line } => {
                let bar = spinner.get_or_insert_with(|| {
                    eprintln!(
                        "skiff: preparing the base image (Debian with bash, python3, node); \
                         this happens once and takes a few minutes"
                    );
                    let bar = ProgressBar::new_spinner();
                    bar.set_style(
                        ProgressStyle::with_template("{spinner} [{elapsed}] {wide_msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    bar.enable_steady_tick(Duration::from_millis(120));
                    bar
                });
                if tty {
                    bar.set_message(line);
                }
            }
            Event::BaseImageReady { built_in } => {
                if let (Some(bar), Some(d)) = (spinner.take(), built_in) {
                    bar.finish_and_clear();
                    eprintln!("skiff: base image ready in {:.0}s", d.as_secs_f64());
                }
            }
            Event::BuildStarted { service } => {
                eprintln!("skiff: building {service}");
                let bar = ProgressBar::new_spinner();
                bar.set_style(
                    ProgressStyle::with_template("{spinner} building [{elapsed}] {wide_msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.set_message(service);
                bar.enable_steady_tick(Duration::from_millis(120));
                spinner = Some(bar);
            }
            Event::BuildFinished {
                service,
                elapsed,
                written,
                layer_size,
            } => {
                if let Some(bar) = spinner.take() {
                    bar.finish_and_clear();
                }
                match elapsed {
                    Some(d) => eprintln!(
                        "skiff: built {service} in {:.1}s (image layer {}; the build wrote {}, \
                         package caches dropped)",
                        d.as_secs_f64(),
                        skiff_model::format_amount(layer_size),
                        skiff_model::format_amount(written.unwrap_or(layer_size))
                    ),
                    None => eprintln!(
                        "skiff: {service}: same source and build command as before; \
                         reusing the built image (layer {})",
                        skiff_model::format_amount(layer_size)
                    ),
                }
            }
            Event::Starting { service, .. } => eprintln!("skiff: starting {service}"),
            Event::Log {
                service,
                phase,
                line,
                at,
                ..
            } => {
                let text = match phase {
                    Phase::Build => format!("{service} build | {line}"),
                    Phase::Run => format!("{service} | {line}"),
                };
                // Above the spinner, when one is showing.
                match &spinner {
                    Some(bar) if tty => bar.println(text),
                    _ => println!("{text}"),
                }
                // Explain a known error the first time it shows.
                if phase == Phase::Run {
                    let diagnoser = diagnosers.entry(service.clone()).or_default();
                    if let Some(finding) = diagnoser.observe(&line, at) {
                        eprintln!(
                            "skiff: {service}: diagnosis: {}",
                            finding.to_string().replace('\n', "\n  ")
                        );
                    }
                }
            }
            Event::Exited { service, exit, instance } => eprintln!(
                "skiff: {service}: instance {instance} exited ({exit}); it is replaced (persistent: \
                 at once; serverless: on the next request)"
            ),
            Event::InstanceStarted {
                service,
                instance,
                report,
            } => eprintln!(
                "skiff: {service}: started instance {instance} (sandbox {}, app start {})",
                ms(report.sandbox),
                ms(report.app)
            ),
            Event::InstanceStopped { service, instance } => {
                eprintln!("skiff: {service}: stopped idle instance {instance}")
            }
            Event::Ready { .. } | Event::Failed { .. } => {}
        }
    }
}
