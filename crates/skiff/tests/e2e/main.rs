//! End-to-end: the real binary, real sandboxes, real HTTP through the gateway.
//! Needs root (namespaces, mounts, cgroups) and the base image, which the
//! first test to need it prepares once for all (under a lock). The build
//! tests fetch from PyPI, npm and Debian, as users' builds do.

mod build;
mod console;
mod daemon;
mod diagnose;
mod doctor;
mod first_try;
mod gateway;
mod gateway_safety;
mod host_safety;
mod isolation;
mod metrics;
mod persistent;
mod sandbox;
mod scaling;
mod support;

use std::time::Duration;

/// How long a first start may take: the first test on a fresh machine waits
/// for the base image to be built (debootstrap, a few minutes).
pub const FIRST_START: Duration = Duration::from_secs(900);
