//! The gateway: the only code that touches user traffic.
//!
//! It accepts HTTP/1.1 connections, finds the service from the `Host`
//! header (`NAME.<domain>[:port]`), and forwards the request to one of the
//! service's healthy instances over a pooled keep-alive connection. When it
//! cannot, it answers itself with a status, a one-line reason and an
//! `x-skiff-error` header, so its answers are never mistaken for the
//! service's own.
#![forbid(unsafe_code)]

mod accept;
mod admission;
mod error;
mod front;
mod gateway;
mod h1;
mod hyper_side;
mod limits;
mod meter;
mod pipeline;
mod reqlog;
mod route;
mod threads;
mod upstream_io;

pub use admission::{Admitted, Cidr, CidrError, ConnectionLimits, ConnectionTable, Refused};
pub use error::{status, Cause, ErrorKind, Failure, Source};
pub use gateway::{Gateway, GatewayConfig, GatewayError};
pub use meter::{Buffers, Counts, Meters, Snapshot, Taken, ThreadMeter, DURATION_BUCKETS};
pub use reqlog::{Entry, Record, MAX_REQUEST_ID};
pub use route::{
    host_to_service, Connect, ConnectFuture, ExchangeLimits, FailureFuture, Lease, Route,
    RouteFuture, Router, Upstream, Wake,
};
pub use threads::{GatewayThreads, Listeners};
