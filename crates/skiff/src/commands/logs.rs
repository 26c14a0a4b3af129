//! `skiff logs NAME [-f] [--since]`: build and run output and the
//! platform's notes, oldest first; with `--requests`, the request log.

use std::process::ExitCode;

use bytes::Bytes;
use clap::Args;
use http::Method;
use skiff_api::types::{LogLine, RequestLine};
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
    /// The request log instead: one line per request the gateway routed
    /// to the service (time, method, path, status, duration, bytes,
    /// instance, cold start or thaw, request id).
    #[arg(long)]
    pub requests: bool,
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
        "/v1/services/{}/{}?{}",
        path_segment(&args.name)?,
        if args.requests { "requests" } else { "logs" },
        skiff_api::client::query(pairs)
    );
    let client = args.client.client()?;
    let mut lines = client.stream(Method::GET, &path, Bytes::new()).await?;
    let p = Paint::stdout();
    if args.requests {
        while let Some(r) = lines.next::<RequestLine>().await? {
            if args.client.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("{}", request_line(&r, p));
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
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

/// One request as `logs --requests` prints it:
/// `TIME METHOD PATH STATUS DURATION BYTES INSTANCE [cold|thawed] [error] id=ID`.
fn request_line(r: &RequestLine, p: Paint) -> String {
    let status = r.status.to_string();
    let status = if r.status >= 500 {
        p.red(&status)
    } else {
        p.bold(&status)
    };
    let out = r
        .bytes_out
        .map_or_else(|| "-".to_string(), |b| format!("{b} B"));
    let mut line = format!(
        "{} {} {} {status} {:.1} ms {out} {}",
        p.dim(&r.at),
        printable(&r.method),
        printable(&r.path),
        r.duration_ms,
        r.instance.as_deref().unwrap_or("-"),
    );
    if let Some(w) = &r.wake {
        line.push(' ');
        line.push_str(w);
    }
    if let Some(e) = &r.error {
        line.push(' ');
        line.push_str(&p.red(&format!("({e})")));
    }
    line.push(' ');
    line.push_str(&p.dim(&format!("id={}", printable(&r.request_id))));
    line
}

/// What a client sent, safe for a terminal: control characters (C0, DEL
/// and C1, which a URL's UTF-8 may carry) written as escapes.
fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_reads_in_one_line() {
        let mut r = RequestLine {
            id: 1,
            at: "2026-11-30T07:00:00.000Z".into(),
            request_id: "abc".into(),
            method: "GET".into(),
            path: "/items?page=2".into(),
            status: 200,
            duration_ms: 3.26,
            bytes_in: 0,
            bytes_out: Some(512),
            instance: Some("web-1-4".into()),
            wake: Some("cold".into()),
            error: None,
        };
        let plain = Paint::plain();
        assert_eq!(
            request_line(&r, plain),
            "2026-11-30T07:00:00.000Z GET /items?page=2 200 3.3 ms 512 B web-1-4 cold id=abc"
        );
        // A client's control characters reach no terminal.
        r.path = "/a\u{9b}31mred".into();
        assert!(request_line(&r, plain).contains("/a\\u{9b}31mred"));
        r.path = "/items?page=2".into();
        r.status = 503;
        r.error = Some("unavailable".into());
        r.bytes_out = None;
        r.instance = None;
        r.wake = None;
        assert_eq!(
            request_line(&r, plain),
            "2026-11-30T07:00:00.000Z GET /items?page=2 503 3.3 ms - - (unavailable) id=abc"
        );
    }
}
