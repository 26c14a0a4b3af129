//! The request log's carrier: every 200 ms the records the gateway's
//! threads made (`skiff_gateway::Meters::swap_out`) go to the store,
//! whose writer thread commits them. Neither side waits for the other:
//! a thread holds at most its bound, the store's queue too, and what
//! does not fit is dropped and counted (`skiff_request_records_dropped_total`).
//! Two threads: the swapper, an ordinary thread that only swaps each
//! gateway thread's buffers for emptied ones (under that thread's lock:
//! it must never be starved while it holds one), and the converter, at
//! idle priority (it holds no lock anyone else needs), which makes the
//! records, hands them to the store and gives the emptied buffers back
//! to be the next spares. The store's writer is in the batch class: its
//! wake-ups do not preempt the gateway, but it is never starved, since
//! it holds SQLite's locks (some of which are process-wide). Under full
//! load records wait, then are dropped and counted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use skiff_gateway::{Buffers, Record, Taken};
use skiff_store::RequestRecord;

use crate::context::Context;

/// How often the records move: how late `skiff logs --requests -f` sees one.
const CARRY_EVERY: Duration = Duration::from_millis(200);
/// Swaps waiting for the converter; beyond this their records are
/// dropped (and counted).
const WAITING: usize = 2;
/// How long a stopping platform waits for the converter.
const FINISH_WITHIN: Duration = Duration::from_secs(3);

/// The carrier's threads.
#[derive(Debug)]
pub(crate) struct Carrier {
    stop: Arc<AtomicBool>,
    swapper: Option<JoinHandle<()>>,
    converter: Option<JoinHandle<()>>,
    ctx: Arc<Context>,
}

impl Carrier {
    /// Starts moving records.
    pub fn start(ctx: Arc<Context>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (to_convert, taken) = mpsc::sync_channel::<Taken>(WAITING);
        let (give_back, spares) = mpsc::channel::<Vec<Buffers>>();
        let converter = {
            let ctx = ctx.clone();
            std::thread::Builder::new()
                .name("skiff-req-convert".into())
                .spawn(move || {
                    skiff_sandbox::idle_priority();
                    convert(&ctx, &taken, &give_back);
                })?
        };
        let stopped = stop.clone();
        let swap_ctx = ctx.clone();
        let swapper = std::thread::Builder::new()
            .name("skiff-req-swap".into())
            .spawn(move || {
                let mut spare = Vec::new();
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(CARRY_EVERY);
                    swap(&swap_ctx, &to_convert, &spares, &mut spare);
                }
                // Dropping the sender ends the converter once it has
                // what was sent.
            })?;
        Ok(Self {
            stop,
            swapper: Some(swapper),
            converter: Some(converter),
            ctx,
        })
    }

    /// Stops, once the last records are handed to the store (call when no
    /// more come): the last ones are made on the calling thread, and the
    /// converter is given `FINISH_WITHIN` for what it holds.
    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.swapper.take() {
            let _ = t.join();
        }
        let mut last = self.ctx.metrics.gateway().swap_out(&mut Vec::new());
        hand_over(&self.ctx, last.records(), last.dropped);
        if let Some(t) = self.converter.take() {
            let deadline = std::time::Instant::now() + FINISH_WITHIN;
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Carrier {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Swaps the gateway threads' records out and sends them on.
fn swap(
    ctx: &Context,
    to_convert: &SyncSender<Taken>,
    spares: &Receiver<Vec<Buffers>>,
    spare: &mut Vec<Buffers>,
) {
    while let Ok(mut back) = spares.try_recv() {
        spare.append(&mut back);
    }
    let taken = ctx.metrics.gateway().swap_out(spare);
    // Spares for one swap are enough; more would only hold memory.
    spare.truncate(taken.threads());
    if taken.dropped > 0 {
        ctx.metrics.request_records_dropped(taken.dropped);
    }
    if taken.is_empty() {
        spare.extend(taken.into_spares());
        return;
    }
    if let Err(TrySendError::Full(taken) | TrySendError::Disconnected(taken)) =
        to_convert.try_send(taken)
    {
        // The converter is far behind: these records go.
        ctx.metrics.request_records_dropped(taken.len() as u64);
    }
}

/// Makes the records, in the order their requests came, hands them to the
/// store, and gives the buffers back.
fn convert(ctx: &Context, taken: &Receiver<Taken>, give_back: &mpsc::Sender<Vec<Buffers>>) {
    while let Ok(mut t) = taken.recv() {
        let records = t.records();
        let _ = give_back.send(t.into_spares());
        hand_over(ctx, records, 0);
    }
}

/// Gives `records` to the store, in the order their requests came;
/// counts what was dropped.
fn hand_over(ctx: &Context, mut records: Vec<Record>, dropped: u64) {
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
