//! The platform's pure core: what it decides and what it says, with no
//! I/O. The scaler turns requests and a clock into actions; the
//! troubleshooter's rules turn output lines and events into findings; the
//! typed events are the vocabulary the runtime records and the rules read.
//! Nothing here touches a file, a socket, a process or the clock: every
//! input is a value, so every rule is tested with made-up values.
#![forbid(unsafe_code)]

pub mod diagnose;
pub mod errors;
pub mod events;
pub mod scaler;

pub use errors::ErrorKind;
pub use events::{EventKind, Level, Phase, Phases, StartReport, Stream};
