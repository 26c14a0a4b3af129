//! The request log's side in the gateway: what one request's record
//! holds, and its `x-request-id`.
//!
//! Every request the gateway routes to a service gets one record (see
//! `meter.rs`, which keeps them in the thread's table until the platform
//! takes them) and an id: the client's own `x-request-id` when it sent a
//! usable one, else one made here. The service receives it in
//! `x-request-id`, and the client gets it back in the answer (unless the
//! service answered with one of its own), so a user can find the record
//! of a request they made.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::error::ErrorKind;
use crate::route::Wake;

/// The longest client-sent `x-request-id` that is kept; a longer one is
/// replaced by one made here.
pub const MAX_REQUEST_ID: usize = 128;

/// One request, as the request log records it.
#[derive(Debug, Clone)]
pub struct Record {
    /// The service it was for (one deployed here).
    pub service: Arc<str>,
    /// When its head had been read.
    pub at: SystemTime,
    pub method: http::Method,
    /// Its target: path and query.
    pub path: Box<str>,
    pub status: u16,
    /// From its head to the answer's head.
    pub took: Duration,
    /// The body's length.
    pub bytes_in: u64,
    /// The answer body's length, when known before it is sent (a
    /// persistent service's streamed answer may not say).
    pub bytes_out: Option<u64>,
    /// The instance that answered.
    pub instance: Option<Arc<str>>,
    /// Whether the request waited for a cold start or a thaw.
    pub wake: Wake,
    pub request_id: Box<str>,
    /// The gateway answered itself, and why.
    pub refused: Option<ErrorKind>,
}

/// What a request brings to its record besides its service and answer
/// (its text borrowed: the thread's table copies it).
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub at: SystemTime,
    pub method: http::Method,
    pub path: &'a str,
    pub bytes_in: u64,
    pub bytes_out: Option<u64>,
    pub instance: Option<Arc<str>>,
    pub wake: Wake,
    pub request_id: &'a str,
}

/// The longest method a record keeps as it came: HTTP allows methods of
/// any length, and a client must not make records large (15 bytes: what
/// `http::Method` holds without an allocation).
pub const MAX_LOGGED_METHOD: usize = 15;

/// A request's method as its record keeps it: longer ones as `OTHER`.
pub fn logged_method(method: &http::Method) -> http::Method {
    if method.as_str().len() <= MAX_LOGGED_METHOD {
        return method.clone();
    }
    http::Method::from_bytes(b"OTHER").unwrap_or_default()
}

/// The longest target a record keeps (longer ones are cut, with `…`).
pub const MAX_LOGGED_PATH: usize = 512;

/// A request's target as its record keeps it.
pub fn logged_path(target: &str) -> Box<str> {
    if target.len() <= MAX_LOGGED_PATH {
        return target.into();
    }
    let mut end = MAX_LOGGED_PATH;
    while !target.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &target[..end]).into_boxed_str()
}

/// The client's `x-request-id`, when it is one the gateway keeps: 1 to
/// [`MAX_REQUEST_ID`] visible ASCII characters (no space or control
/// character reaches a log or a terminal).
pub fn kept_id(value: &[u8]) -> Option<&str> {
    if value.is_empty()
        || value.len() > MAX_REQUEST_ID
        || !value.iter().all(|b| (0x21..=0x7e).contains(b))
    {
        return None;
    }
    std::str::from_utf8(value).ok()
}

/// A new request id: 24 hex digits, a random number per thread and a
/// count, so ids differ between threads and between runs of the platform.
pub fn make_id() -> Box<str> {
    thread_local! {
        static NEXT: Cell<(u64, u32)> = Cell::new((seed(), 0));
    }
    let (base, n) = NEXT.with(|next| {
        let (base, n) = next.get();
        next.set((base, n.wrapping_add(1)));
        (base, n)
    });
    format!("{base:016x}{n:08x}").into_boxed_str()
}

/// A random number from the standard library's hash keys (random per
/// process, and different for every `RandomState`).
fn seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x0073_6b69_6666);
    h.finish()
}

/// The id a request goes with: the client's, when usable, else a new one.
pub fn request_id(sent: Option<&[u8]>) -> Box<str> {
    match sent.and_then(kept_id) {
        Some(id) => id.into(),
        None => make_id(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_usable_client_id_is_kept_and_anything_else_replaced() {
        assert_eq!(&*request_id(Some(b"abc-123")), "abc-123");
        let long = vec![b'a'; MAX_REQUEST_ID];
        assert_eq!(request_id(Some(&long)).len(), MAX_REQUEST_ID);
        for bad in [
            &b""[..],
            b"has space",
            b"tab\there",
            b"esc\x1b[31m",
            "é".as_bytes(),
            &[b'a'; MAX_REQUEST_ID + 1],
        ] {
            let id = request_id(Some(bad));
            assert_eq!(id.len(), 24, "{bad:?} got {id}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        }
    }

    #[test]
    fn long_methods_are_recorded_as_other() {
        assert_eq!(logged_method(&http::Method::PATCH), http::Method::PATCH);
        let long = http::Method::from_bytes(&[b'A'; 60_000]).unwrap();
        assert_eq!(logged_method(&long).as_str(), "OTHER");
    }

    #[test]
    fn long_targets_are_cut() {
        assert_eq!(&*logged_path("/a?b=1"), "/a?b=1");
        let long = format!("/{}", "x".repeat(600));
        let cut = logged_path(&long);
        assert!(cut.starts_with("/xxx") && cut.ends_with('…'));
        assert_eq!(cut.len(), MAX_LOGGED_PATH + '…'.len_utf8());
    }

    #[test]
    fn made_ids_differ_within_a_thread_and_between_threads() {
        let (a, b) = (make_id(), make_id());
        assert_ne!(a, b);
        assert_eq!(a[..16], b[..16], "one thread's ids share its base");
        let other = std::thread::spawn(make_id).join().unwrap();
        assert_ne!(a[..16], other[..16]);
    }
}
