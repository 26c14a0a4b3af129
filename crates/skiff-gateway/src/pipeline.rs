//! One request's way through the gateway, whichever side read it: the
//! phases every request goes through, in order, in the spirit of
//! pingora's `ProxyHttp`.
//!
//! 1. **admit** (`admit`): CONNECT, the Host, the service it names, an
//!    upgrade a serverless service cannot take, and the service's rules.
//! 2. **prepare** (`receive_body`, `lease`, `Rules::lease`): a serverless
//!    request's body is received whole, within its limits and the minimum
//!    rate, before an instance is taken; then the platform leases one
//!    (waiting while one starts), whose version's rules then apply.
//! 3. **exchange** (`exchange`): the request goes to the instance and its
//!    answer comes back whole (`h1.rs`), within the request timeout;
//!    failures are named (`exchange_failed`) while the instance is still
//!    leased.
//! 4. **finish** (`finish`): the lease is released, the answer or the
//!    gateway's own refusal goes to the client, and refusals whose cause
//!    lies with the service are reported to the platform.
//!
//! The client's side of it — reading the body, watching the client while
//! the request waits, writing the answer — is a `Downstream`: `front.rs`
//! writes bytes to its socket itself, `hyper_side.rs` hands hyper a
//! `Response`. Persistent services (streamed, upgradable) go through the
//! same admission, lease and reporting but exchange through hyper's
//! client (`hyper_side.rs`).

use std::future::Future;

use bytes::Bytes;
use tokio::time::Instant;

use crate::error::{ErrorKind, Failure};
use crate::gateway::Gateway;
use crate::h1;
use crate::limits::{
    body_broke_off, body_due, body_timed_out, body_too_slow, broke_off, later, timed_out,
    too_large_request, too_large_response, FAR,
};
use crate::route::{host_to_service, ExchangeLimits, Lease, Route, Router, Upstream};

/// What the admission phase looks at in a request's head.
#[derive(Debug)]
pub(crate) struct Head<'a> {
    /// A CONNECT request.
    pub connect: bool,
    /// How many Host fields it has.
    pub hosts: usize,
    /// Its Host (or, from HTTP/2 clients, its target's authority).
    pub host: Option<&'a str>,
    /// The protocol it asks to upgrade to.
    pub upgrade: Option<&'a str>,
}

/// A request the gateway will route.
#[derive(Debug)]
pub(crate) struct Admitted {
    /// The service it is for (lowercase).
    pub service: String,
    /// The rules of a serverless service that is serving, and its
    /// response limit; `None` for a persistent service, an upgrade, or a
    /// service not serving yet (routing will say why).
    pub serverless: Option<(ExchangeLimits, u64)>,
}

/// The admission phase: which service the request is for, or why the
/// gateway answers it itself.
pub(crate) fn admit(gw: &Gateway, head: &Head<'_>) -> Result<Admitted, Failure> {
    let domain = &gw.config().domain;
    if head.connect {
        // Passed on, it would reach the service as `CONNECT /` and the
        // client would be left with an empty close.
        return Err(Failure::new(
            ErrorKind::ConnectNotSupported,
            format!(
                "CONNECT is not supported: skiff's gateway is not a forward proxy and \
                 opens no tunnels. Send plain requests to http://NAME.{domain}/ to reach \
                 service NAME."
            ),
        ));
    }
    if head.hosts > 1 {
        // RFC 9112 §3.2: one Host, or the gateway and the service might
        // each route by a different one.
        return Err(Failure::new(
            ErrorKind::BadRequest,
            "The request has more than one Host header; send exactly one.",
        ));
    }
    let Some(host) = head.host else {
        return Err(Failure::new(
            ErrorKind::BadHost,
            format!(
                "The request has no Host header; skiff routes by host name: \
                 request http://NAME.{domain}/ to reach service NAME."
            ),
        ));
    };
    let Some(service) = host_to_service(host, domain) else {
        return Err(Failure::new(
            ErrorKind::UnknownService,
            format!(
                "No service is reachable at host {host:?}: skiff routes \
                 http://NAME.{domain}/ to the service NAME."
            ),
        ));
    };
    let service = service.to_ascii_lowercase();
    let router = gw.router();
    if let Some(proto) = head.upgrade {
        if router.allows_streaming(&service) == Some(false) {
            return Err(Failure::new(
                ErrorKind::StreamingNeedsPersistent,
                format!(
                    "Service {service:?} runs in serverless mode, which serves short \
                     request/response exchanges only; a long-lived {proto} connection \
                     (Upgrade) needs mode = \"persistent\" in its skiff.toml."
                ),
            ));
        }
        return Ok(Admitted {
            service,
            serverless: None,
        });
    }
    let serverless = router
        .limits(&service)
        .and_then(|limits| Some((limits, limits.max_response?)));
    Ok(Admitted {
        service,
        serverless,
    })
}

/// A serverless request, as the phases after admission see it.
#[derive(Debug)]
pub(crate) struct Serverless<'a> {
    pub service: &'a str,
    /// A HEAD request: the answer has no body whatever its length says.
    pub head_only: bool,
    /// Safe to send again when a reused connection turns out closed.
    pub idempotent: bool,
}

/// What became of a read of the request's body.
#[derive(Debug)]
pub(crate) enum Piece {
    /// More of it came.
    More,
    /// All of it is here.
    End,
    /// The deadline passed first.
    Late,
    /// The client's body broke off (answered 400).
    Broken,
    /// The client closed the connection (nobody to answer).
    Gone,
}

/// What became of something the request waited for.
#[derive(Debug)]
pub(crate) enum Watched<T> {
    Done(T),
    /// Its deadline passed first.
    Late,
    /// The client left first: nobody waits for the answer.
    Gone,
}

/// The client's side of a serverless request: what the phases need from
/// whichever side of the gateway read it.
pub(crate) trait Downstream {
    /// What serving the request comes to for that side.
    type Done;

    /// The body's length, when the client announced it.
    fn announced(&self) -> Option<u64>;
    /// How many bytes of the body have come so far.
    fn received(&self) -> u64;
    /// Reads more of the body, unless `due` passes first.
    async fn read_body(&mut self, due: Option<Instant>) -> Piece;
    /// The request for the instance, once its body is whole: its head in
    /// wire form (with the body after it when small, `h1::end_request`),
    /// and its body.
    fn request(&mut self) -> (Vec<u8>, Bytes);
    /// Takes back the head `request` gave, to reuse its buffer.
    fn reuse(&mut self, _head: Vec<u8>) {}
    /// The instance the request got, and what it waited for (what the
    /// request's record names).
    fn leased(&mut self, lease: &Lease);
    /// Waits for `work` unless `by` passes or the client leaves first.
    async fn watch<F: Future>(&mut self, work: F, by: Option<Instant>) -> Watched<F::Output>;
    /// Sends the instance's answer on.
    async fn respond(&mut self, received: &mut h1::Received) -> Self::Done;
    /// Sends the gateway's own answer.
    async fn refuse(&mut self, failure: Failure) -> Self::Done;
    /// The client left: there is nobody to answer.
    fn gone(&mut self) -> Self::Done;
}

/// The rules a serverless request is held to: its service's, then those
/// of the version of the instance it was leased.
#[derive(Debug, Clone, Copy)]
struct Rules {
    limits: ExchangeLimits,
    max_response: u64,
    /// When the request timeout passes (far away without one).
    answer_by: Instant,
}

impl Rules {
    fn new(limits: ExchangeLimits, max_response: u64, started: Instant) -> Self {
        Self {
            limits,
            max_response,
            answer_by: later(started, limits.request_timeout.unwrap_or(FAR)),
        }
    }

    /// The instance leased may run a version deployed meanwhile: its
    /// rules apply (a service turned persistent keeps the rules the
    /// request was received under).
    fn lease(&mut self, upstream: &Upstream, started: Instant, body: u64) -> Result<(), Failure> {
        let leased = upstream.limits;
        let Some(max) = leased.max_response else {
            return Ok(());
        };
        if leased.request_timeout != self.limits.request_timeout {
            self.limits.request_timeout = leased.request_timeout;
            self.answer_by = later(started, leased.request_timeout.unwrap_or(FAR));
        }
        if let Some(limit) = leased.max_request.filter(|limit| body > *limit) {
            return Err(too_large_request(limit));
        }
        self.limits.max_request = leased.max_request;
        self.max_response = max;
        Ok(())
    }

    /// The deadline of the answer, when there is one.
    fn deadline(&self) -> Option<Instant> {
        self.limits.request_timeout.map(|_| self.answer_by)
    }
}

/// Why a request stopped before its exchange.
enum Stop {
    Refuse(Failure),
    Gone,
}

impl From<Failure> for Stop {
    fn from(failure: Failure) -> Self {
        Self::Refuse(failure)
    }
}

/// A serverless request from admission to its answer: the body first,
/// then an instance, then the exchange.
pub(crate) async fn serverless<D: Downstream>(
    gw: &Gateway,
    down: &mut D,
    req: &Serverless<'_>,
    (limits, max_response): (ExchangeLimits, u64),
) -> D::Done {
    let started = Instant::now();
    let mut rules = Rules::new(limits, max_response, started);
    let received = match receive_body(gw, down, req.service, &rules, started).await {
        Ok(received) => received,
        Err(stop) => return finish(gw, down, req.service, stop).await,
    };
    // The request leaves the client's buffer before the wait for an
    // instance: what the buffer holds then is the client's next request
    // (a client that leaves meanwhile is seen), and a refusal cannot leave
    // this one behind to be served again.
    let request = down.request();
    let lease = match down.watch(lease(gw.router(), req.service), None).await {
        Watched::Done(Ok(lease)) => {
            down.leased(&lease);
            lease
        }
        Watched::Done(Err(failure)) => {
            down.reuse(request.0);
            return finish(gw, down, req.service, failure.into()).await;
        }
        Watched::Late | Watched::Gone => {
            down.reuse(request.0);
            return down.gone();
        }
    };
    if let Err(failure) = rules.lease(&lease.upstream, started, received) {
        drop(lease);
        down.reuse(request.0);
        return finish(gw, down, req.service, failure.into()).await;
    }
    exchange(gw, down, req, rules, lease, request).await
}

/// A serverless request whose service's rules were not known before an
/// instance was leased (it was starting): the body is received under the
/// instance's rules, then the exchange.
pub(crate) async fn serverless_leased<D: Downstream>(
    gw: &Gateway,
    down: &mut D,
    req: &Serverless<'_>,
    lease: Lease,
    max_response: u64,
) -> D::Done {
    let started = Instant::now();
    down.leased(&lease);
    let rules = Rules::new(lease.upstream.limits, max_response, started);
    if let Err(stop) = receive_body(gw, down, req.service, &rules, started).await {
        drop(lease);
        return finish(gw, down, req.service, stop).await;
    }
    let request = down.request();
    exchange(gw, down, req, rules, lease, request).await
}

/// Prepare: the body, received whole within its limit, the request
/// timeout and the minimum rate. Returns its length.
async fn receive_body<D: Downstream>(
    gw: &Gateway,
    down: &mut D,
    service: &str,
    rules: &Rules,
    started: Instant,
) -> Result<u64, Stop> {
    let limits = rules.limits;
    // A body announced too large is refused before it is read.
    if let (Some(max), Some(len)) = (limits.max_request, down.announced()) {
        if len > max {
            return Err(too_large_request(max).into());
        }
    }
    let (rate, grace) = (gw.config().min_body_rate, gw.config().header_read_timeout);
    loop {
        // The body's own deadline moves with every piece that comes.
        let got = down.received();
        let by_rate = body_due(started, grace, got, rate);
        let (due, slow) = match (rules.deadline(), by_rate) {
            (Some(t), Some(r)) if r < t => (Some(r), true),
            (None, Some(r)) => (Some(r), true),
            (t, _) => (t, false),
        };
        match down.read_body(due).await {
            Piece::More => {
                if let Some(max) = limits.max_request.filter(|max| down.received() > *max) {
                    return Err(too_large_request(max).into());
                }
            }
            Piece::End => return Ok(down.received()),
            Piece::Late if slow => {
                let took = started.elapsed();
                return Err(body_too_slow(service, got, took, rate, grace).into());
            }
            Piece::Late => return Err(body_timed_out(service, limits).into()),
            Piece::Broken => return Err(body_broke_off().into()),
            Piece::Gone => return Err(Stop::Gone),
        }
    }
}

/// Prepare: asks the platform for an instance, waiting while one starts
/// or thaws.
pub(crate) async fn lease(router: &dyn Router, service: &str) -> Result<Lease, Failure> {
    let mut route = router.route(service);
    loop {
        route = match route {
            Route::Instance(lease) => return Ok(lease),
            // The client sees latency only.
            Route::Wait(next) => next.await,
            Route::Unknown { deployed } => {
                let list = if deployed.is_empty() {
                    "none is deployed yet".to_string()
                } else {
                    format!("deployed: {}", deployed.join(", "))
                };
                return Err(Failure::new(
                    ErrorKind::UnknownService,
                    format!("No service named {service:?} is deployed here ({list})."),
                ));
            }
            Route::Unavailable { reason } => {
                return Err(Failure::new(
                    ErrorKind::Unavailable,
                    format!("Service {service:?} is unavailable: {reason}"),
                ));
            }
        };
    }
}

/// Exchange, then finish: the request to the instance and its answer
/// back whole, within the request timeout.
async fn exchange<D: Downstream>(
    gw: &Gateway,
    down: &mut D,
    req: &Serverless<'_>,
    rules: Rules,
    lease: Lease,
    (head, body): (Vec<u8>, Bytes),
) -> D::Done {
    let upstream = &lease.upstream;
    let prepared = h1::Prepared {
        bytes: &head,
        body: &body,
        head_only: req.head_only,
        idempotent: req.idempotent,
    };
    let exchanged = h1::exchange(gw.pool(), upstream, prepared, rules.max_response);
    let result = down.watch(exchanged, rules.deadline()).await;
    down.reuse(head);
    let failure = match result {
        Watched::Done(Ok(mut received)) => {
            let key = upstream.key.clone();
            // Released before the answer goes out: a client that sends
            // its next request on another connection as soon as it has
            // this answer must find the slot free (else it would queue,
            // or even start another instance, for a moment's overlap).
            drop(lease);
            let done = down.respond(&mut received).await;
            // The instance's connection goes back to this thread's pool
            // once the answer is written, off the request's path.
            // (Another request on this thread meanwhile, possible only
            // while a slow client takes a large answer, opens a
            // connection of its own.)
            gw.pool().put_back(&key, &mut received);
            return done;
        }
        // Still leased while the exit is learned (`exchange_failed`).
        Watched::Done(Err(e)) => {
            exchange_failed(req.service, upstream, e, rules.max_response).await
        }
        Watched::Late => timed_out(req.service, rules.limits),
        Watched::Gone => return down.gone(),
    };
    drop(lease);
    finish(gw, down, req.service, failure.into()).await
}

/// What to tell the client when the exchange with the instance failed:
/// an answer over `max`, or an instance that could not be reached or
/// broke it off. Call while still holding the lease: released, an idle
/// instance would be frozen before it could report its exit.
async fn exchange_failed(
    service: &str,
    upstream: &Upstream,
    e: h1::ExchangeError,
    max: u64,
) -> Failure {
    if let h1::ExchangeError::TooLarge = e {
        return too_large_response(service, max).because(e);
    }
    let exit = upstream.connect.failure().await;
    let message = match (&e, exit) {
        (h1::ExchangeError::Malformed(what), None) => format!(
            "Service {service:?} broke off its response: {what}. See `skiff logs {service}`."
        ),
        (h1::ExchangeError::Connect(io) | h1::ExchangeError::Broken(io), exit) => {
            broke_off(service, exit, &io.to_string())
        }
        (_, exit) => broke_off(service, exit, "its answer was cut off"),
    };
    Failure::new(ErrorKind::UpstreamFailed, message).because(e)
}

/// Finish, for a request the gateway answers itself: the platform hears
/// of refusals whose cause lies with the service, the client gets the
/// answer.
async fn finish<D: Downstream>(gw: &Gateway, down: &mut D, service: &str, stop: Stop) -> D::Done {
    match stop {
        Stop::Refuse(failure) => {
            // The underlying error is for the platform's log, never the
            // client's answer.
            if let Some(cause) = failure.cause() {
                tracing::debug!("{service}: {failure} (because: {cause})");
            }
            gw.report(service, &failure);
            down.refuse(failure).await
        }
        Stop::Gone => down.gone(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::route::{Connect, ConnectFuture};

    struct Nowhere;

    impl Connect for Nowhere {
        fn connect(&self) -> ConnectFuture {
            Box::pin(async { Err(std::io::ErrorKind::NotFound.into()) })
        }
    }

    fn upstream(limits: ExchangeLimits) -> Upstream {
        Upstream {
            key: Arc::from("i"),
            connect: Arc::new(Nowhere),
            limits,
        }
    }

    #[test]
    fn the_leased_versions_rules_apply_unless_it_streams() {
        let started = Instant::now();
        let received = ExchangeLimits {
            request_timeout: Some(Duration::from_secs(10)),
            max_response: Some(100),
            max_request: Some(50),
        };
        let redeployed = ExchangeLimits {
            request_timeout: Some(Duration::from_secs(2)),
            max_response: Some(200),
            max_request: Some(20),
        };
        let mut rules = Rules::new(received, 100, started);
        assert_eq!(rules.deadline(), Some(started + Duration::from_secs(10)));
        rules.lease(&upstream(redeployed), started, 20).unwrap();
        assert_eq!(rules.deadline(), Some(started + Duration::from_secs(2)));
        assert_eq!(rules.max_response, 200);

        // A body the new version does not take.
        let mut rules = Rules::new(received, 100, started);
        let refused = rules.lease(&upstream(redeployed), started, 21).unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::RequestTooLarge);

        // A version turned persistent: the rules it was received under.
        let mut rules = Rules::new(received, 100, started);
        rules
            .lease(&upstream(ExchangeLimits::default()), started, 50)
            .unwrap();
        assert_eq!(rules.deadline(), Some(started + Duration::from_secs(10)));
        assert_eq!(rules.max_response, 100);

        // No timeout: no deadline.
        let none = ExchangeLimits {
            request_timeout: None,
            ..received
        };
        assert_eq!(Rules::new(none, 100, started).deadline(), None);
    }
}
