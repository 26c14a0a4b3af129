//! The request log's carrier: every 200 ms the records the gateway's
//! threads made (`skiff_gateway::Meters::take_records`) go to the store,
//! whose writer thread commits them. Neither side waits for the other:
//! a thread holds at most its bound, the store's queue too, and what
//! does not fit is dropped and counted (`skiff_request_records_dropped_total`).
//! The carrier is a thread of its own in the batch scheduling class, as
//! the store's writer is: their wake-ups do not preempt the gateway (as
//! ordinary threads, their bursts showed in the gateway's p99), yet they
//! keep their fair share under load, so the writer never holds the
//! database's write lock long.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use skiff_gateway::Record;
use skiff_store::RequestRecord;

use crate::context::Context;

/// How often the records move: how late `skiff logs --requests -f` sees one.
const CARRY_EVERY: Duration = Duration::from_millis(200);

/// The carrier's thread.
#[derive(Debug)]
pub(crate) struct Carrier {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Carrier {
    /// Starts moving records.
    pub fn start(ctx: Arc<Context>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("skiff-requests".into())
            .spawn(move || {
                skiff_sandbox::batch_priority();
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(CARRY_EVERY);
                    carry_once(&ctx);
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops, once the last records are moved (call when no more come).
    pub fn finish(mut self, ctx: &Context) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        carry_once(ctx);
    }
}

impl Drop for Carrier {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Moves the records made so far.
fn carry_once(ctx: &Context) {
    let (mut records, dropped) = ctx.metrics.gateway().take_records();
    // The threads' records in the order their requests came.
    records.sort_by_key(|r| r.at);
    let batch: Vec<RequestRecord> = records.into_iter().map(stored).collect();
    let dropped = dropped + ctx.store.add_requests(batch);
    if dropped > 0 {
        ctx.metrics.request_records_dropped(dropped);
    }
}

fn stored(r: Record) -> RequestRecord {
    RequestRecord {
        id: 0,
        service: r.service.to_string(),
        at: r.at,
        method: r.method.to_string(),
        path: r.path.into(),
        status: r.status,
        duration: r.took,
        bytes_in: r.bytes_in,
        bytes_out: r.bytes_out,
        instance: r.instance.map(|i| i.to_string()),
        wake: r.wake.as_str().map(str::to_string),
        request_id: r.request_id.into(),
        error: r.refused.map(|k| k.as_str().to_string()),
    }
}
