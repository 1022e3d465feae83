//! A server's round-log entries on their way to the coordinator's journal (issue 16: "the
//! coordinator keeps a round log"), so that the log survives the server that wrote it.
//!
//! [`JournalTx::start`] runs one thread per process: it batches the entries ([`LogItem`]) into
//! JSON records of at most [`BATCH_BYTES`] and appends them with
//! [`CoordClient::journal`], in order, never on a training thread. A record the coordinator did
//! not take is sent again later; after the connection to the coordinator was replaced (a
//! restarted coordinator starts from its snapshot, without the journal) every entry so far is
//! sent again, and the coordinator counts repeats once ([`super::round_log::JournalLog`]).
//! [`JournalTx::flush`] waits until everything is stored: a server flushes before it reports
//! Done, so the coordinator's log is complete when the job ends.

use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use geomx_net::coord::CoordClient;

use super::round_log::LogItem;

/// Largest JSON batch sent as one journal record (well under the coordinator's cap).
pub const BATCH_BYTES: usize = 48 * 1024;

/// How long the thread waits before sending again what the coordinator did not take.
const RETRY: Duration = Duration::from_millis(100);

enum Msg {
    Item(LogItem),
    Flush(Sender<()>),
}

/// The sending end; cheap to clone.
#[derive(Debug, Clone)]
pub struct JournalTx {
    tx: Sender<Msg>,
}

impl JournalTx {
    /// Starts the thread that appends to `coord`'s journal.
    pub fn start(coord: CoordClient) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("geomx-journal".into())
            .spawn(move || run(&coord, &rx))?;
        Ok(Self { tx })
    }

    /// Queues `item` (never blocks).
    pub fn send(&self, item: LogItem) {
        let _ = self.tx.send(Msg::Item(item));
    }

    /// Waits up to `wait` until every item queued so far is stored at the coordinator; says
    /// whether it is.
    pub fn flush(&self, wait: Duration) -> bool {
        let (ack, done) = crossbeam_channel::bounded(1);
        if self.tx.send(Msg::Flush(ack)).is_err() {
            return false;
        }
        let ok = done.recv_timeout(wait).is_ok();
        if !ok {
            tracing::warn!(
                ?wait,
                "the round log did not reach the coordinator's journal in time"
            );
        }
        ok
    }
}

/// Sends `log`'s entries to the coordinator of `node` when the job's membership may change
/// (nothing else ever makes a partial round).
pub fn attach(
    log: &super::round_log::RoundLog,
    node: &super::node::Node,
    job: &super::JobSpec,
) -> Result<(), super::RunError> {
    if job.workers_may_rejoin() || job.dcs_may_rejoin() || job.global_servers_may_rejoin() {
        let tx = JournalTx::start(node.coord.clone()).map_err(|e| {
            super::RunError::Membership(format!("starting the journal thread: {e}"))
        })?;
        log.attach_journal(tx);
    }
    Ok(())
}

/// Splits `items` into JSON batches of at most about [`BATCH_BYTES`]: (items in it, bytes).
pub fn batches(items: &[LogItem]) -> Vec<(usize, Vec<u8>)> {
    // Each item is encoded once; a batch is those encodings joined into a JSON array.
    let mut out = Vec::new();
    let mut cur = vec![b'['];
    let mut n = 0;
    for item in items {
        let one = serde_json::to_vec(item).unwrap_or_default();
        if n > 0 && cur.len() + one.len() + 2 > BATCH_BYTES {
            cur.push(b']');
            out.push((n, std::mem::replace(&mut cur, vec![b'['])));
            n = 0;
        }
        if n > 0 {
            cur.push(b',');
        }
        cur.extend_from_slice(&one);
        n += 1;
    }
    if n > 0 {
        cur.push(b']');
        out.push((n, cur));
    }
    out
}

fn run(coord: &CoordClient, rx: &Receiver<Msg>) {
    use crossbeam_channel::RecvTimeoutError;
    let mut history: Vec<LogItem> = Vec::new();
    let mut sent = 0;
    let mut flushes: Vec<Sender<()>> = Vec::new();
    let mut generation = coord.generation();
    let mut open = true;
    loop {
        // Wait for an entry; while some are unsent, only a little, then try again.
        let first = if sent < history.len() {
            match rx.recv_timeout(RETRY) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    open = false;
                    None
                }
            }
        } else {
            rx.recv().ok()
        };
        if first.is_none() && sent >= history.len() {
            return; // every sender is gone and everything is stored
        }
        for m in first.into_iter().chain(rx.try_iter()) {
            match m {
                Msg::Item(i) => history.push(i),
                Msg::Flush(ack) => flushes.push(ack),
            }
        }
        let g = coord.generation();
        if g != generation {
            // A restarted coordinator has none of it: everything again.
            generation = g;
            sent = 0;
        }
        for (n, bytes) in batches(&history[sent..]) {
            match coord.journal(&bytes) {
                Ok(()) => sent += n,
                Err(e) => {
                    tracing::warn!(error = %e, "appending to the coordinator's journal; retrying");
                    if !open {
                        return;
                    }
                    break;
                }
            }
        }
        if sent == history.len() {
            for ack in flushes.drain(..) {
                let _ = ack.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_every_item_in_order_within_the_size() {
        let items: Vec<LogItem> = (0..5000)
            .map(|r| LogItem::Summed {
                dc: 1,
                key: 3,
                round: r,
                ranks: vec![0, 2, 5],
            })
            .collect();
        let b = batches(&items);
        assert!(b.len() > 1);
        assert_eq!(b.iter().map(|(n, _)| n).sum::<usize>(), items.len());
        let mut back: Vec<LogItem> = Vec::new();
        for (n, bytes) in &b {
            assert!(bytes.len() <= BATCH_BYTES, "{}", bytes.len());
            let part: Vec<LogItem> = serde_json::from_slice(bytes).unwrap();
            assert_eq!(part.len(), *n);
            back.extend(part);
        }
        assert_eq!(back, items);
        assert!(batches(&[]).is_empty());
    }
}
