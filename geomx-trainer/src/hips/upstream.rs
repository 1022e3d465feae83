//! The global servers as a local server reaches them: directly, or under P3 through one priority
//! sender each; and, under `resilience.lost_global_server = "continue"`, what brings a restarted
//! global server back to where the job is.
//!
//! A restarted global server holds its newest checkpoint, version `c` of its ranges. The local
//! server keeps, per range, every push since the global tier's last checkpoint (the global
//! server writes round `c`'s state before it answers round `c`, so a reply at a checkpoint
//! round lets the older pushes go). When a connection to a global server fails, the local server
//! asks the coordinator where that server's next incarnation listens, connects, learns each
//! range's version with a pull, and resends its pushes from there, one round at a time: every
//! DC does the same, so each resent round completes as it did before and the global tier ends
//! bit-identical to a run that lost nothing. A round the lost server completed (and saved) but
//! whose reply never arrived is read back: under FSA with f32 tiers the reply is θ (a pull), under
//! HFA an increment, which the checkpoint keeps for this case (a [`REPLY_FLAG`] pull).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use geomx_net::coord::{CoordClient, NodeKey};
use geomx_net::sched::priority::{PrioritySender, Queued};
use geomx_net::{KvClient, NetError, NetOptions, PayloadCodec, Response};

use super::msg::REPLY_FLAG;
use super::plan::roles;
use super::round_log::{MemberChange, RoundLog};
use super::{lock, JobSpec, RunError};
use crate::checkpoint::Policy;

/// Where a push or pull goes: `(range id, version, offset, key length)`.
pub(super) type At = (u64, u64, u64, u64);

/// A request on its way, and the connection generation it went out on.
pub(super) struct Flight {
    sent: Result<Queued, NetError>,
    generation: u64,
}

/// One global server's connection.
struct Link {
    client: KvClient,
    /// Bumped at every reconnection.
    generation: u64,
    /// The incarnation of the process `client` reaches (`None`: not known).
    incarnation: Option<u32>,
    /// Traffic of the connections this one replaced.
    retired_bytes: u64,
}

/// A push kept for a restarted global server.
#[derive(Clone)]
struct Kept {
    offset: u64,
    total: u64,
    payload: Vec<u8>,
}

/// What finds a lost global server's next incarnation and brings it up to date.
pub(super) struct Rejoin {
    coord: CoordClient,
    node_id: u32,
    net: NetOptions,
    central_dc: u32,
    dc: u32,
    policy: Option<Policy>,
    per_global: u64,
    /// HFA: replies are increments, so a lost reply is read back with a [`REPLY_FLAG`] pull
    /// (under FSA with f32 tiers the reply is θ, which a plain pull gives).
    delta_replies: bool,
    /// `lost_dc = "continue"`: a global server that stays alive at the incarnation whose
    /// connection broke has left this DC out (it was cut off or stalled), and this local server
    /// ends so that its restart rejoins; after how long (the detection time and a second).
    dropped_after: Option<Duration>,
    /// Per range: its pushes since the global tier's last checkpoint, by version.
    kept: Mutex<HashMap<u64, BTreeMap<u64, Kept>>>,
    /// Per range: the connection generation whose server holds every push before the current.
    synced: Mutex<HashMap<u64, u64>>,
    /// Where the losses and returns of global servers are logged.
    log: Arc<RoundLog>,
}

impl Rejoin {
    /// The rejoin support of DC `dc`'s local server, registered with the coordinator as
    /// `node_id`.
    pub(super) fn new(
        job: &JobSpec,
        dc: u32,
        coord: CoordClient,
        node_id: u32,
        net: NetOptions,
        log: Arc<RoundLog>,
    ) -> Self {
        Self {
            coord,
            node_id,
            net,
            central_dc: job.plan.central_dc,
            dc,
            policy: job.checkpoint.clone(),
            per_global: job.rounds_per_global(),
            delta_replies: job.hfa_periods().is_some(),
            dropped_after: job.dcs_may_rejoin().then(|| job.loss_verdict_after()),
            kept: Mutex::new(HashMap::new()),
            synced: Mutex::new(HashMap::new()),
            log,
        }
    }

    fn key(&self, server: usize) -> NodeKey {
        NodeKey::new(roles::GLOBAL_SERVER, self.central_dc, server as u32)
    }

    /// Keeps the push of `payload` at `at` until a checkpoint covers it.
    fn keep(&self, at: At, payload: &[u8]) {
        let (id, version, offset, total) = at;
        let kept = Kept {
            offset,
            total,
            payload: payload.to_vec(),
        };
        lock(&self.kept)
            .entry(id)
            .or_default()
            .insert(version, kept);
    }

    /// The reply to range `id`'s push reached `version`. When the global tier saves round
    /// `version - 1`, every range of the server had completed round `version - 1` (the workers
    /// pushed round `version - 1` of this range with θ of all ranges at that version), and the
    /// range that completed it last answered once its checkpoint was on disk, or in the
    /// background (`checkpoint.background`) once the checkpoint before it was. The pushes
    /// before the checkpoint known to be on disk are no longer needed. (A reply at a checkpoint
    /// round itself proves nothing: other ranges may still be collecting that round.)
    fn trim(&self, id: u64, version: u64) {
        let Some(saved) = version.checked_sub(1) else {
            return;
        };
        let Some(p) = self
            .policy
            .as_ref()
            .filter(|p| p.due(saved * self.per_global))
        else {
            return;
        };
        let from = on_disk_after(p, self.per_global, saved);
        if let Some(k) = lock(&self.kept).get_mut(&id) {
            *k = k.split_off(&from);
        }
    }

    /// The kept pushes of range `id` from `from` up to (not including) `to`, in order, or why
    /// they cannot be resent.
    fn resend_list(
        &self,
        server: usize,
        id: u64,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, Kept)>, String> {
        let kept = lock(&self.kept);
        let mine = kept.get(&id);
        let out: Vec<_> = mine
            .into_iter()
            .flat_map(|k| k.range(from..to))
            .map(|(&v, k)| (v, k.clone()))
            .collect();
        if out.len() as u64 != to.saturating_sub(from) {
            let oldest = mine.and_then(|k| k.keys().next().copied());
            return Err(format!(
                "global server {server} restarted at round {from} of range {id}; dc {} keeps its \
                 pushes from round {} on (a checkpoint of another run in checkpoint.dir, or a \
                 newest checkpoint that was refused?)",
                self.dc,
                oldest.map_or_else(|| "none".into(), |o| o.to_string()),
            ));
        }
        Ok(out)
    }
}

/// The newest checkpoint version a global server holds on disk once it answered the round that
/// its checkpoint of version `saved` closes (a due version; a version is `per_global` training
/// rounds): `saved`, or in the background the due version before it (0: none, the job's start).
fn on_disk_after(p: &Policy, per_global: u64, saved: u64) -> u64 {
    if !p.background {
        return saved;
    }
    // Versions v are due when v · per_global is a multiple of every_rounds: every `step`-th.
    let g = gcd(p.every_rounds, per_global).max(1);
    let step = (p.every_rounds / g).max(1);
    saved.saturating_sub(step)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Why bringing a global server back failed: it was lost again (retry), or it cannot be done.
enum Fail {
    Lost(NetError),
    Fatal(String),
}

impl From<NetError> for Fail {
    fn from(e: NetError) -> Self {
        if recoverable(&e) {
            Fail::Lost(e)
        } else {
            Fail::Fatal(e.to_string())
        }
    }
}

/// What a local server concludes from a global server alive at the incarnation whose
/// connection broke `elapsed` ago.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AliveVerdict {
    /// Not yet known: ask again.
    Undecided,
    /// Its own coordinator connection dropped about when ours broke: it was stopped or cut off,
    /// not this DC; it ends itself (`GlobalHandler::judge_disconnect`) and its restart takes
    /// over. Wait for that incarnation.
    AwayToo,
    /// It never was away, so this DC was (cut off, or this process stopped): this local server
    /// ends so that its restart rejoins.
    LeftOut,
}

/// The verdict on a global server alive at the broken connection's incarnation, under
/// `lost_dc = "continue"` (`verdict`: the detection time and a second, `None` otherwise). A
/// drop (the server's `server_dropped`, or this process's own, `own_dropped`, asked only when
/// needed) counts when it came at most one verdict time before the break: this process's own
/// drop decides at once, otherwise the verdict time must pass.
fn alive_verdict(
    elapsed: Duration,
    verdict: Option<Duration>,
    server_dropped: Option<Duration>,
    own_dropped: impl FnOnce() -> Option<Duration>,
) -> AliveVerdict {
    let Some(verdict) = verdict else {
        return AliveVerdict::Undecided;
    };
    let recent = |d: Option<Duration>| d.is_some_and(|d| d <= elapsed + verdict);
    if recent(server_dropped) {
        AliveVerdict::AwayToo
    } else if elapsed >= verdict || recent(own_dropped()) {
        AliveVerdict::LeftOut
    } else {
        AliveVerdict::Undecided
    }
}

/// Whether `e` means the connection (and maybe its process) is gone, not a refusal.
pub(super) fn recoverable(e: &NetError) -> bool {
    matches!(
        e,
        NetError::PeerClosed(_) | NetError::Io(_) | NetError::Shutdown
    )
}

/// The global servers as the uplinks reach them.
pub(super) struct Upstream {
    links: Vec<Mutex<Link>>,
    /// One per client under P3; empty otherwise.
    prio: Vec<PrioritySender>,
    /// Under `lost_global_server = "continue"`.
    rejoin: Option<Rejoin>,
    /// The longest wait for one reply, and for a lost global server to come back.
    wait: Duration,
}

impl Upstream {
    /// The uplinks over `clients` (index = global server rank), with `rejoin` when a lost global
    /// server may come back.
    pub(super) fn new(
        clients: Vec<KvClient>,
        job: &JobSpec,
        dc: u32,
        rejoin: Option<Rejoin>,
    ) -> Result<Self, RunError> {
        let prio = clients
            .iter()
            .enumerate()
            .filter_map(|(s, c)| job.p3_sender(c, &format!("geomx-p3-l{dc}.{s}")).transpose())
            .collect::<Result<_, _>>()?;
        let links = clients
            .into_iter()
            .enumerate()
            .map(|(s, client)| {
                // Which incarnation we reach: a reconnection waits for a later one.
                let incarnation = rejoin
                    .as_ref()
                    .and_then(|r| r.coord.locate(&r.key(s)).ok())
                    .map(|l| l.incarnation);
                Mutex::new(Link {
                    client,
                    generation: 0,
                    incarnation,
                    retired_bytes: 0,
                })
            })
            .collect();
        Ok(Self {
            links,
            prio,
            rejoin,
            wait: job.wait_limit(),
        })
    }

    /// Sets the send buffer (P3 credit) of every uplink connection.
    pub(super) fn set_credit(&self, bytes: u32) -> Result<(), String> {
        for (s, l) in self.links.iter().enumerate() {
            lock(l)
                .client
                .set_send_buffer(bytes as usize)
                .map_err(|e| format!("setting the P3 credit towards global server {s}: {e}"))?;
        }
        Ok(())
    }

    /// The largest credit the uplinks' senders sized to their paths (`credit_bytes = "path"`).
    pub(super) fn path_credit(&self) -> Option<u32> {
        self.prio
            .iter()
            .filter_map(PrioritySender::path_credit)
            .max()
    }

    /// Bytes sent and received on every uplink connection, replaced ones included.
    pub(super) fn total_bytes(&self) -> u64 {
        self.links
            .iter()
            .map(|l| {
                let l = lock(l);
                l.retired_bytes + super::total_bytes(l.client.stats())
            })
            .sum()
    }

    fn link(&self, server: usize) -> Result<(KvClient, u64), String> {
        let l = self
            .links
            .get(server)
            .ok_or_else(|| format!("no global server {server}"))?;
        let l = lock(l);
        Ok((l.client.clone(), l.generation))
    }

    /// Pushes `payload` (codec `Raw`) to `server` at `at`.
    pub(super) fn push(
        &self,
        server: usize,
        priority: i64,
        at: At,
        payload: Vec<u8>,
    ) -> Result<Flight, String> {
        let (id, version, offset, total) = at;
        if let Some(p) = self.prio.get(server) {
            let sent = p.push(
                priority,
                id,
                version,
                PayloadCodec::Raw,
                offset,
                total,
                payload,
            );
            return Ok(Flight {
                sent,
                generation: 0,
            });
        }
        let (client, generation) = self.link(server)?;
        if let Some(r) = &self.rejoin {
            r.keep(at, &payload);
            // After a reconnection, the restarted server first gets the pushes it lacks.
            if let Err(e) = self.sync(r, server, &client, generation, id, version) {
                return match e {
                    Fail::Lost(e) => Ok(Flight {
                        sent: Err(e),
                        generation,
                    }),
                    Fail::Fatal(m) => Err(m),
                };
            }
        }
        let sent = client
            .push(id, version, PayloadCodec::Raw, offset, total, &payload)
            .map(Queued::from);
        Ok(Flight { sent, generation })
    }

    /// Pulls `at` from `server` (pulls skip the P3 queue).
    pub(super) fn pull(&self, server: usize, at: At) -> Result<Flight, String> {
        let (id, version, offset, total) = at;
        let (client, generation) = self.link(server)?;
        if let Some(r) = &self.rejoin {
            if let Err(e) = self.sync(r, server, &client, generation, id, u64::MAX) {
                return match e {
                    Fail::Lost(e) => Ok(Flight {
                        sent: Err(e),
                        generation,
                    }),
                    Fail::Fatal(m) => Err(m),
                };
            }
        }
        let sent = client.pull(id, version, offset, total).map(Queued::from);
        Ok(Flight { sent, generation })
    }

    /// Waits for the answer to `flight` (a push when `pushing`) to `server` at `at`. A lost
    /// connection under `lost_global_server = "continue"` is recovered: the answer then comes
    /// from the server's next incarnation.
    pub(super) fn wait(
        &self,
        server: usize,
        at: At,
        pushing: bool,
        flight: Flight,
    ) -> Result<Response, String> {
        let describe =
            |e: &dyn std::fmt::Display| format!("range {} from global server {server}: {e}", at.0);
        let resp = match (flight.sent.and_then(|q| q.wait(self.wait)), &self.rejoin) {
            (Ok(resp), _) => resp,
            (Err(e), Some(r)) if recoverable(&e) => self
                .recover(r, server, flight.generation, at, pushing, &e)
                .map_err(|m| describe(&m))?,
            (Err(e), _) => return Err(describe(&e)),
        };
        if let (Some(r), true) = (&self.rejoin, pushing) {
            r.trim(at.0, resp.version);
        }
        Ok(resp)
    }

    /// Brings `server` back after the connection of generation `failed` broke while `at` was
    /// pushed (or pulled), and answers it from the next incarnation.
    fn recover(
        &self,
        r: &Rejoin,
        server: usize,
        mut failed: u64,
        at: At,
        pushing: bool,
        cause: &NetError,
    ) -> Result<Response, String> {
        let (id, version, offset, total) = at;
        let deadline = Instant::now() + self.wait;
        let mut cause = cause.to_string();
        loop {
            let (client, generation) = self.reconnect(r, server, failed, version, &cause)?;
            let attempt = || -> Result<Response, Fail> {
                if !pushing {
                    self.catch_up(r, server, &client, id, u64::MAX)?;
                    return Ok(client.pull(id, version, offset, total)?.wait(self.wait)?);
                }
                let now = self.catch_up(r, server, &client, id, version)?;
                if now == version + 1 {
                    // The lost server completed and saved this round: its reply is θ (FSA),
                    // or the increment its checkpoint kept (HFA).
                    tracing::warn!(
                        server,
                        range = id,
                        round = version,
                        "reading back the reply of a round the lost server completed"
                    );
                    let key = if r.delta_replies { id | REPLY_FLAG } else { id };
                    return Ok(client.pull(key, now, offset, total)?.wait(self.wait)?);
                }
                if now != version {
                    return Err(Fail::Fatal(format!(
                        "global server {server} restarted at round {now} of range {id}, beyond \
                         this push of round {version} (a checkpoint of another run in \
                         checkpoint.dir?)"
                    )));
                }
                let again = r.resend_list(server, id, version, version + 1);
                let [(_, k)] = &again.map_err(Fail::Fatal)?[..] else {
                    return Err(Fail::Fatal(format!(
                        "range {id}: no kept push of {version}"
                    )));
                };
                Ok(client
                    .push(id, version, PayloadCodec::Raw, offset, total, &k.payload)?
                    .wait(self.wait)?)
            };
            match attempt() {
                Ok(resp) => {
                    lock(&r.synced).insert(id, generation);
                    return Ok(resp);
                }
                Err(Fail::Lost(e)) if Instant::now() < deadline => {
                    (failed, cause) = (generation, e.to_string());
                }
                Err(Fail::Lost(e)) => return Err(e.to_string()),
                Err(Fail::Fatal(m)) => return Err(m),
            }
        }
    }

    /// Before a request on connection `generation`: a server that has not seen this DC's pushes
    /// of range `id` since it (re)started gets those before `to`.
    fn sync(
        &self,
        r: &Rejoin,
        server: usize,
        client: &KvClient,
        generation: u64,
        id: u64,
        to: u64,
    ) -> Result<(), Fail> {
        let synced = lock(&r.synced).get(&id).copied().unwrap_or(0);
        if synced == generation {
            return Ok(());
        }
        let now = self.catch_up(r, server, client, id, to)?;
        if to != u64::MAX && now != to {
            return Err(Fail::Fatal(format!(
                "global server {server} holds round {now} of range {id}, this DC pushes {to}"
            )));
        }
        lock(&r.synced).insert(id, generation);
        Ok(())
    }

    /// Resends range `id`'s kept pushes from the version `client`'s server holds up to (not
    /// including) `to` (all of them: `u64::MAX`), one round at a time; returns the version it
    /// holds then.
    fn catch_up(
        &self,
        r: &Rejoin,
        server: usize,
        client: &KvClient,
        id: u64,
        to: u64,
    ) -> Result<u64, Fail> {
        // A pull at version 0 is answered at once, with the range's version.
        let (offset, total) = {
            let kept = lock(&r.kept);
            kept.get(&id)
                .and_then(|k| k.values().next())
                .map_or((0, 0), |k| (k.offset, k.total))
        };
        let mut now = client.pull(id, 0, offset, total)?.wait(self.wait)?.version;
        let to = match to {
            u64::MAX => lock(&r.kept)
                .get(&id)
                .and_then(|k| k.keys().next_back())
                .map_or(now, |&v| v + 1)
                .max(now),
            t => t,
        };
        if now >= to {
            return Ok(now);
        }
        let resend = r.resend_list(server, id, now, to).map_err(Fail::Fatal)?;
        if !resend.is_empty() {
            tracing::info!(server, range = id, from = now, to, "resending pushes");
        }
        for (v, k) in resend {
            let resp = client
                .push(id, v, PayloadCodec::Raw, k.offset, k.total, &k.payload)?
                .wait(self.wait)?;
            if resp.version != v + 1 {
                return Err(Fail::Fatal(format!(
                    "range {id}: resent round {v} answered at version {}",
                    resp.version
                )));
            }
            now = v + 1;
        }
        Ok(now)
    }

    /// The connection to `server` after generation `failed` broke: a new one to its next
    /// incarnation, once the coordinator knows where that listens (another uplink may have made
    /// it already).
    fn reconnect(
        &self,
        r: &Rejoin,
        server: usize,
        failed: u64,
        round: u64,
        cause: &str,
    ) -> Result<(KvClient, u64), String> {
        let slot = self
            .links
            .get(server)
            .ok_or_else(|| format!("no global server {server}"))?;
        let mut l = lock(slot);
        if l.generation != failed {
            return Ok((l.client.clone(), l.generation));
        }
        let (central, rank) = (r.central_dc, server as u32);
        // Events count training rounds (an HFA global round is k1 · k2 of them).
        let round = round * r.per_global;
        r.log.change_of(
            roles::GLOBAL_SERVER,
            central,
            rank,
            MemberChange::Lost,
            round,
            cause.to_string(),
        );
        let started = Instant::now();
        let deadline = started + self.wait;
        let mut away_too = false;
        loop {
            if Instant::now() >= deadline {
                return Err(format!(
                    "global server {server} was lost ({cause}) and no later incarnation came \
                     within {:?}",
                    self.wait
                ));
            }
            let next = match r.coord.locate(&r.key(server)) {
                Ok(at) if at.live && l.incarnation.is_none_or(|i| at.incarnation > i) => at,
                Ok(at) if at.live && l.incarnation == Some(at.incarnation) => {
                    let own = || r.coord.own_dropped_ago();
                    match alive_verdict(started.elapsed(), r.dropped_after, at.dropped_ago, own) {
                        AliveVerdict::LeftOut => {
                            return Err(format!(
                                "global server {server} is alive at the incarnation whose \
                                 connection broke ({cause}): it left dc {} out (cut off or \
                                 stalled)",
                                r.dc
                            ));
                        }
                        AliveVerdict::AwayToo if !away_too => {
                            away_too = true;
                            tracing::warn!(
                                server,
                                "global server {server} was away too; waiting for its restart"
                            );
                        }
                        _ => {}
                    }
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Ok(_) => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(e) if recoverable(&e) => {
                    return Err(format!("locating global server {server}: {e}"));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "locate refused; retrying");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let addr = super::node::wan_route(&next.addr);
            match KvClient::connect(addr.as_str(), r.node_id, r.net.clone()) {
                Ok(c) => {
                    l.retired_bytes += super::total_bytes(l.client.stats());
                    l.client.close();
                    l.client = c;
                    l.generation += 1;
                    l.incarnation = Some(next.incarnation);
                    tracing::warn!(
                        server,
                        incarnation = next.incarnation,
                        %addr,
                        "reconnected to a restarted global server"
                    );
                    r.log.change_of(
                        roles::GLOBAL_SERVER,
                        central,
                        rank,
                        MemberChange::Rejoined,
                        round,
                        String::new(),
                    );
                    return Ok((l.client.clone(), l.generation));
                }
                Err(e) => {
                    tracing::info!(server, %addr, error = %e, "restarted global server not reachable yet");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn in_the_background_the_pushes_since_the_checkpoint_before_the_newest_are_kept() {
        let policy = |every_rounds, background| Policy {
            dir: "d".into(),
            every_rounds,
            keep: 2,
            background,
        };
        // Waiting for the disk: the newest checkpoint is on disk once its round is answered.
        assert_eq!(on_disk_after(&policy(50, false), 1, 100), 100);
        // In the background, the one before it: versions 50 and 0 (the start).
        assert_eq!(on_disk_after(&policy(50, true), 1, 100), 50);
        assert_eq!(on_disk_after(&policy(50, true), 1, 50), 0);
        // HFA, 20 training rounds per version, a checkpoint every 100 training rounds: every
        // 5th version is due.
        assert_eq!(on_disk_after(&policy(100, true), 20, 30), 25);
        // Every 6 training rounds at 4 per version: versions 3, 6, 9, … (12, 24, 36 rounds).
        let p = policy(6, true);
        assert!(p.due(9 * 4) && p.due(6 * 4) && !p.due(8 * 4) && !p.due(7 * 4));
        assert_eq!(on_disk_after(&p, 4, 9), 6);
    }

    #[test]
    fn a_global_server_that_dropped_too_is_waited_for_and_one_that_never_did_left_the_dc_out() {
        let verdict = Some(2 * S);
        let never = || None;
        // Without lost_dc, nothing to decide.
        assert_eq!(
            alive_verdict(5 * S, None, None, never),
            AliveVerdict::Undecided
        );
        // Stopped with us (its coordinator connection dropped 0.5 s before our break, seen
        // 1 s after it): wait for its restart, however long it takes.
        let dropped = Some(S + S / 2);
        assert_eq!(
            alive_verdict(S, verdict, dropped, never),
            AliveVerdict::AwayToo
        );
        assert_eq!(
            alive_verdict(3 * S, verdict, Some(3 * S + S / 2), never),
            AliveVerdict::AwayToo
        );
        // A drop long before the break is another story: after the verdict time, left out.
        let old = Some(10 * S);
        assert_eq!(
            alive_verdict(S, verdict, old, never),
            AliveVerdict::Undecided
        );
        assert_eq!(
            alive_verdict(2 * S, verdict, old, never),
            AliveVerdict::LeftOut
        );
        // This process's own drop (it was stopped) decides at once; an old one does not.
        assert_eq!(
            alive_verdict(S / 10, verdict, None, || Some(S)),
            AliveVerdict::LeftOut
        );
        assert_eq!(
            alive_verdict(S / 10, verdict, None, || Some(10 * S)),
            AliveVerdict::Undecided
        );
    }
}
