//! Transfer scheduling (`../shared/specs/scheduling.md`): when and along which path bytes move,
//! never which values are aggregated.
//!
//! * [`mod@priority`]: P3's per-connection priority queue (sans-IO, with a fixed-rate link model
//!   for tests) and [`PrioritySender`](priority::PrioritySender), the thread that drains it into
//!   a [`crate::KvClient`].
//! * [`mod@reply`]: [`ReplyQueue`](reply::ReplyQueue), P3's server side: replies leave each
//!   connection in priority order from a writer thread of that connection.
//! * [`mod@credit`]: [`CreditTuner`](credit::CreditTuner), which picks a priority sender's credit
//!   (its connection's send buffer) from measured round times.
//! * [`mod@path_credit`]: [`PathCredit`](path_credit::PathCredit), which sizes a priority
//!   connection's credit to the bandwidth × round trip the kernel measured of its path.
//! * [`mod@tsengine`]: TSEngine's coordinator state machine (dynamic aggregation tree for push,
//!   ε-greedy broadcast tree for pull, throughput table with expiry).

pub mod credit;
pub mod path_credit;
pub mod priority;
pub mod reply;
pub mod tsengine;
