//! Accepting client connections: under the caps of `admission.rs` (over
//! them, answered 503 and closed at once), each given to a task of its
//! own that `front.rs` serves; and stopping, connection by connection,
//! when the gateway shuts down.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::warn;

use crate::admission::Refused;
use crate::gateway::Gateway;
use crate::hyper_side::HyperBuilder;

impl Gateway {
    /// Serves connections (HTTP/1.1, and HTTP/2 with prior knowledge) until
    /// `stop_accepting` completes; then tells every connection to close
    /// after its request in flight and waits for them, at most until
    /// `stop` completes.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        stop_accepting: impl Future<Output = ()>,
        stop: impl Future<Output = ()>,
    ) {
        tokio::pin!(stop_accepting);
        let mut builder = HyperBuilder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.config().header_read_timeout)
            .max_buf_size(self.config().max_header_bytes);
        builder.http2().timer(TokioTimer::new());
        let builder = Arc::new(builder);
        let (closing, _) = tokio::sync::watch::channel(false);
        // Every connection task adds a permit when it ends.
        let ended = Arc::new(tokio::sync::Semaphore::new(0));
        let mut count = 0u32;
        let mut backoff = ACCEPT_BACKOFF_MIN;
        let mut warned: Option<Instant> = None;
        let mut refused = 0u64;
        loop {
            let (stream, remote) = tokio::select! {
                _ = &mut stop_accepting => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors (EMFILE, ENFILE), or out of
                        // memory: the pending connection stays queued.
                        // Waiting a little, longer each time, keeps this
                        // loop from spinning; it never ends.
                        if warned.is_none_or(|w| w.elapsed() >= WARN_EVERY) {
                            warn!(
                                "gateway: cannot accept a connection: {e} ({} client connections open); retrying",
                                self.connections().open()
                            );
                            warned = Some(Instant::now());
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                        continue;
                    }
                },
            };
            backoff = ACCEPT_BACKOFF_MIN;
            let admitted = match self
                .connections()
                .admit(remote.ip(), self.config().connections)
            {
                Ok(a) => a,
                Err(why) => {
                    refuse(&stream, why);
                    refused += 1;
                    if warned.is_none_or(|w| w.elapsed() >= WARN_EVERY) {
                        let caps = self.config().connections;
                        warn!(
                            "gateway: refused {refused} connections (the last from {}: {}); raise --max-connections / --max-connections-per-address if these are real clients",
                            remote.ip(),
                            match why {
                                Refused::PerAddress => format!(
                                    "{} open from that address already",
                                    caps.per_address
                                ),
                                Refused::Total => format!("{} open already", caps.total),
                            }
                        );
                        warned = Some(Instant::now());
                        refused = 0;
                    }
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let gw = self.clone();
            let builder = builder.clone();
            let closing = closing.subscribe();
            let ended = ended.clone();
            count += 1;
            tokio::spawn(async move {
                // Counted as ended however the task ends (a panic too), or
                // shutdown would wait for it in vain.
                let _ended = EndedGuard(ended);
                let _admitted = admitted;
                crate::front::serve(gw, stream, remote, builder, closing).await;
            });
        }
        drop(listener);
        let _ = closing.send(true);
        let all_ended = async {
            if let Ok(p) = ended.acquire_many(count).await {
                p.forget();
            }
        };
        tokio::select! {
            _ = all_ended => {}
            _ = stop => {}
        }
    }
}

/// The first and the longest wait after a failed accept.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(500);
/// Refusals and accept errors are logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Closes a connection over a cap, after telling the client why if its
/// socket takes the answer at once (never waiting: the accept loop must
/// go on). A client that sends its request afterwards may see a reset
/// instead; either way it holds nothing here.
fn refuse(stream: &tokio::net::TcpStream, why: Refused) {
    let _ = stream.try_write(refusal(why));
}

/// The answer to a connection over a cap (`ErrorKind::TooManyConnections`).
fn refusal(why: Refused) -> &'static [u8] {
    match why {
        Refused::PerAddress => {
            b"HTTP/1.1 503 Service Unavailable\r\n\
            content-type: text/plain; charset=utf-8\r\nx-skiff-error: too-many-connections\r\n\
            retry-after: 5\r\nconnection: close\r\ncontent-length: 107\r\n\r\n\
            Too many connections from your address are open at this gateway; close idle ones \
            or try again in a moment.\n"
        }
        Refused::Total => {
            b"HTTP/1.1 503 Service Unavailable\r\n\
            content-type: text/plain; charset=utf-8\r\nx-skiff-error: too-many-connections\r\n\
            retry-after: 5\r\nconnection: close\r\ncontent-length: 72\r\n\r\n\
            The gateway holds as many connections as it can; try again in a moment.\n"
        }
    }
}

/// Adds a permit when dropped: one connection task has ended.
struct EndedGuard(Arc<tokio::sync::Semaphore>);

impl Drop for EndedGuard {
    fn drop(&mut self) {
        self.0.add_permits(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn refusals_are_whole_http_answers() {
        for why in [Refused::PerAddress, Refused::Total] {
            let answer = refusal(why);
            let mut fields = [httparse::EMPTY_HEADER; 16];
            let mut resp = httparse::Response::new(&mut fields);
            let head = match resp.parse(answer) {
                Ok(httparse::Status::Complete(n)) => n,
                other => panic!("{why:?}: {other:?}"),
            };
            assert_eq!(resp.code, Some(503));
            let field = |name: &str| {
                resp.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| std::str::from_utf8(h.value).unwrap().to_string())
            };
            assert_eq!(
                field("x-skiff-error").as_deref(),
                Some(ErrorKind::TooManyConnections.as_str())
            );
            let length: usize = field("content-length").unwrap().parse().unwrap();
            assert_eq!(length, answer.len() - head, "{why:?}");
        }
    }
}
