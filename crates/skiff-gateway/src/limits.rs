//! The exchange's limits in time and size, below both of the gateway's
//! sides: the deadlines a connection's timers follow, and the failures
//! that name the limit a request or an answer went past.

use std::pin::Pin;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{ErrorKind, Failure};
use crate::route::ExchangeLimits;

/// Further than any deadline the gateway sets.
pub(crate) const FAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// `d` from now; far in the future when that does not fit an `Instant`.
pub(crate) fn after(d: Duration) -> Instant {
    later(Instant::now(), d)
}

/// `d` after `t`, or far after it when that does not fit an `Instant`.
pub(crate) fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).or_else(|| t.checked_add(FAR)).unwrap_or(t)
}

/// Completes at `at`. Each request moves a connection's deadlines later;
/// the timer behind one is only moved when it fires before its deadline
/// or is set later than it — about once per timeout on a busy connection
/// rather than once per request.
pub(crate) async fn until(mut timer: Pin<&mut tokio::time::Sleep>, at: Instant) {
    if timer.deadline() > at {
        timer.as_mut().reset(at);
    }
    loop {
        timer.as_mut().await;
        if Instant::now() >= at {
            return;
        }
        timer.as_mut().reset(at);
    }
}

/// When a request body that started arriving at `started` and brought
/// `received` bytes so far must have brought more: `grace`, plus a second
/// for every `rate` bytes (mod_reqtimeout's rule). `None` without a
/// minimum rate.
pub(crate) fn body_due(
    started: Instant,
    grace: Duration,
    received: u64,
    rate: u64,
) -> Option<Instant> {
    if rate == 0 {
        return None;
    }
    let earned = Duration::from_millis(received.saturating_mul(1000) / rate);
    Some(later(started, grace.saturating_add(earned)))
}

fn size(bytes: u64) -> String {
    format!("{} = {bytes} bytes", skiff_model::format_size(bytes))
}

pub(crate) fn too_large_response(service: &str, max: u64) -> Failure {
    Failure::new(
        ErrorKind::ResponseTooLarge,
        format!(
            "Response is bigger than the maximum allowed size: service {service:?} answered \
             with more than {} (limits.max_response). Store large data in object storage \
             and return its URL instead.",
            size(max)
        ),
    )
}

pub(crate) fn too_large_request(max: u64) -> Failure {
    Failure::new(
        ErrorKind::RequestTooLarge,
        format!(
            "The request body is bigger than the service accepts: more than {} \
             (limits.max_request). Upload large data to object storage and send its URL.",
            size(max)
        ),
    )
}

pub(crate) fn timed_out(service: &str, limits: ExchangeLimits) -> Failure {
    let shown = skiff_model::format_duration(limits.request_timeout.unwrap_or_default());
    Failure::new(
        ErrorKind::RequestTimeout,
        format!(
            "Service {service:?} did not answer within the request timeout of {shown} \
             (limits.request_timeout); the request was cut off. Longer work belongs on a \
             persistent service (mode = \"persistent\")."
        ),
    )
}

/// The client's body did not arrive in time: the service is not to blame
/// (and never saw the request).
pub(crate) fn body_timed_out(service: &str, limits: ExchangeLimits) -> Failure {
    let shown = skiff_model::format_duration(limits.request_timeout.unwrap_or_default());
    Failure::new(
        ErrorKind::BodyTimeout,
        format!(
            "The request body did not arrive within the request timeout of {shown} \
             (limits.request_timeout of service {service:?}); the request was not sent to \
             the service. Send the body at once, or upload large data to object storage \
             and send its URL."
        ),
    )
}

/// The client's body came slower than the gateway's minimum rate: the
/// client held a connection and memory while sending almost nothing.
pub(crate) fn body_too_slow(
    service: &str,
    received: u64,
    took: Duration,
    rate: u64,
    grace: Duration,
) -> Failure {
    Failure::new(
        ErrorKind::BodyTimeout,
        format!(
            "The request body arrived too slowly: {received} bytes in {:.0} s, under the \
             gateway's minimum of {rate} bytes per second after {} (--min-body-rate); the \
             request was not sent to service {service:?}. Send the body at once, or upload \
             large data to object storage and send its URL.",
            took.as_secs_f64(),
            skiff_model::format_duration(grace)
        ),
    )
}

/// The client's body ended before all of it came.
pub(crate) fn body_broke_off() -> Failure {
    Failure::new(
        ErrorKind::BadRequest,
        "The request body broke off before it was complete.",
    )
}

/// Why a service did not answer: its instance's exit when known, else
/// the connection's error.
pub(crate) fn broke_off(service: &str, exit: Option<String>, cause: &str) -> String {
    match exit {
        Some(exit) => format!(
            "Service {service:?} did not answer the request: its instance {exit} while \
             handling it. See `skiff logs {service}`."
        ),
        None => format!(
            "Service {service:?} did not answer the request: {cause}. The instance may have \
             crashed or closed the connection; see `skiff logs {service}`."
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_earns_a_second_per_rate_bytes_after_its_grace() {
        let start = Instant::now();
        let grace = Duration::from_secs(10);
        assert_eq!(body_due(start, grace, 5000, 0), None, "no minimum");
        for (received, rate, after) in [
            (0, 1024, Duration::from_secs(10)),
            (1024, 1024, Duration::from_secs(11)),
            (512, 1024, Duration::from_millis(10_500)),
            (
                u64::MAX,
                1,
                Duration::from_secs(10) + Duration::from_millis(u64::MAX),
            ),
        ] {
            let due = body_due(start, grace, received, rate).unwrap();
            assert_eq!(due - start, after, "{received} bytes at {rate}/s");
        }
        let slow = body_too_slow("svc", 3, Duration::from_secs(12), 1024, grace);
        assert_eq!(slow.kind(), ErrorKind::BodyTimeout);
        assert!(
            slow.message().contains("3 bytes in 12 s")
                && slow.message().contains("--min-body-rate"),
            "{slow}"
        );
    }

    #[test]
    fn messages_name_the_limit() {
        let f = too_large_response("svc", 6 << 20);
        assert_eq!(f.kind(), ErrorKind::ResponseTooLarge);
        let m = f.message();
        assert!(
            m.starts_with("Response is bigger than the maximum allowed size"),
            "{m}"
        );
        assert!(
            m.contains("6MiB = 6291456 bytes") && m.contains("object storage"),
            "{m}"
        );
        let limits = ExchangeLimits {
            request_timeout: Some(Duration::from_secs(900)),
            ..Default::default()
        };
        let f = timed_out("svc", limits);
        assert_eq!(f.kind(), ErrorKind::RequestTimeout);
        assert!(f.message().contains("request timeout of 15m"), "{f}");
        let f = body_timed_out("svc", limits);
        assert_eq!(f.kind(), ErrorKind::BodyTimeout);
        assert!(
            f.message().contains("request timeout of 15m")
                && f.message().contains("was not sent to the service"),
            "{f}"
        );
        let f = too_large_request(6 << 20);
        assert_eq!(f.kind(), ErrorKind::RequestTooLarge);
        assert!(f.message().contains("limits.max_request"), "{f}");
    }

    #[test]
    fn deadlines_that_do_not_fit_are_far() {
        let now = Instant::now();
        assert_eq!(
            later(now, Duration::from_secs(1)) - now,
            Duration::from_secs(1)
        );
        assert!(later(now, Duration::MAX) >= now + Duration::from_secs(3600));
    }
}
