//! The DGT receiver: validation, duplicate / early / late / stale handling, deadline, delivery.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use super::header::{check_channel_map, DgtKind, Header};
use super::report::{ChannelRound, RoundReport};
use super::{f16_bits_to_f32, DgtConfig, DgtError, ValueType, MAX_CHANNELS, NOT_SENT};

const NCH: usize = (MAX_CHANNELS + 1) as usize;

/// Receiver counters of one channel (0 = reliable). Identity: `sent = on_time + late + lost`
/// over delivered rounds; `lost` becomes final when a round's late window closes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelCounters {
    /// Blocks listed on this channel by delivered terminators.
    pub sent: u64,
    /// Blocks that arrived before their round's delivery.
    pub on_time: u64,
    /// Blocks that arrived after their round's delivery (folded into the next round).
    pub late: u64,
    /// Listed blocks not (yet) arrived.
    pub lost: u64,
    /// Blocks arriving after the late window (dropped).
    pub stale: u64,
    /// Duplicate messages (ignored).
    pub dup: u64,
    /// Blocks more than one round ahead (dropped).
    pub future_dropped: u64,
    /// Valid block messages received (any outcome).
    pub received: u64,
    /// Bytes of valid messages received (header + payload).
    pub bytes: u64,
}

/// A delivered tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Sender id.
    pub sender: u32,
    /// Key.
    pub key: u32,
    /// Round.
    pub round: u32,
    /// Values widened to f32: zeros + arrived blocks of this round + late blocks of the
    /// previous round added (f32).
    pub values: Vec<f32>,
    /// Blocks listed as sent but missing at delivery (zero unless folded later).
    pub missing: Vec<u32>,
    /// Late blocks of the previous round folded in.
    pub folded_late: u32,
    /// True if delivery waited out the deadline (or was forced) instead of completing.
    pub timed_out: bool,
    /// First datagram of this round (`None` if nothing but the terminator arrived).
    pub first_at: Option<Instant>,
    /// When it was delivered.
    pub delivered_at: Instant,
}

#[derive(Debug, Clone, Copy)]
struct KeyInfo {
    n: u32,
    value_type: ValueType,
    per: u32,
    n_b: u32,
}

#[derive(Debug)]
struct Slot {
    values: Vec<f32>,
    /// Channel each block arrived on, [`NOT_SENT`] if not arrived.
    arrived: Vec<u8>,
    /// The channel map (from End or Map).
    end: Option<Vec<u8>>,
    /// When the terminator (End, or the first copy of Fin) arrived.
    fin: Option<Instant>,
    deadline: Option<Instant>,
    first_at: Option<Instant>,
}

impl Slot {
    fn new(k: &KeyInfo) -> Slot {
        Slot {
            values: Vec::new(),
            arrived: vec![NOT_SENT; k.n_b as usize],
            end: None,
            fin: None,
            deadline: None,
            first_at: None,
        }
    }

    /// Map and terminator both arrived: the sender handed out everything of the round.
    fn terminated(&self) -> bool {
        self.end.is_some() && self.fin.is_some()
    }

    fn complete(&self) -> bool {
        self.end.as_ref().is_some_and(|m| {
            m.iter()
                .zip(&self.arrived)
                .all(|(&c, &a)| c == NOT_SENT || a != NOT_SENT)
        })
    }
}

/// The delivered round whose late window is open.
#[derive(Debug)]
struct Closed {
    map: Vec<u8>,
    seen: Vec<bool>,
    report: RoundReport,
}

#[derive(Debug)]
struct Stream {
    cur: u32,
    slots: [Option<Slot>; 2],
    prev: Option<Closed>,
    late: Vec<(u32, Vec<f32>)>,
}

/// Sans-IO DGT receiver for all senders and keys of one node.
#[derive(Debug)]
pub struct DgtReceiver {
    cfg: DgtConfig,
    keys: HashMap<u32, KeyInfo>,
    streams: HashMap<(u32, u32), Stream>,
    counters: [ChannelCounters; NCH],
    invalid: u64,
    deliveries: VecDeque<Delivery>,
    reports: VecDeque<RoundReport>,
}

impl DgtReceiver {
    /// A receiver; keys must be added before their messages arrive.
    pub fn new(cfg: DgtConfig) -> Result<DgtReceiver, DgtError> {
        cfg.validate()?;
        Ok(DgtReceiver {
            cfg,
            keys: HashMap::new(),
            streams: HashMap::new(),
            counters: [ChannelCounters::default(); NCH],
            invalid: 0,
            deliveries: VecDeque::new(),
            reports: VecDeque::new(),
        })
    }

    /// Registers a key of `n` elements of `value_type` (the key table both sides share).
    /// Rounds of every sender start at 0.
    pub fn add_key(&mut self, key: u32, n: u32, value_type: ValueType) -> Result<(), DgtError> {
        if n == 0 {
            return Err(DgtError::Invalid(format!("key {key} has no elements")));
        }
        let per = (self.cfg.block_bytes / value_type.size()) as u32;
        self.keys.insert(
            key,
            KeyInfo {
                n,
                value_type,
                per,
                n_b: n.div_ceil(per),
            },
        );
        Ok(())
    }

    /// Per-channel counters (index = channel).
    pub fn counters(&self) -> &[ChannelCounters; NCH] {
        &self.counters
    }

    /// Messages rejected by validation.
    pub fn invalid(&self) -> u64 {
        self.invalid
    }

    /// Next delivered tensor, in delivery order.
    pub fn poll_delivery(&mut self) -> Option<Delivery> {
        self.deliveries.pop_front()
    }

    /// Next final per-round report (a round's report is final at the next round's delivery);
    /// encode it with [`RoundReport::encode_into`] and send it back on the reliable channel.
    pub fn poll_report(&mut self) -> Option<RoundReport> {
        self.reports.pop_front()
    }

    /// Earliest terminator deadline pending.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.streams
            .values()
            .filter_map(|s| s.slots[0].as_ref().and_then(|sl| sl.deadline))
            .min()
    }

    /// Delivers every round whose deadline is ≤ `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<(u32, u32)> = self
            .streams
            .iter()
            .filter(|(_, s)| {
                s.slots[0]
                    .as_ref()
                    .and_then(|sl| sl.deadline)
                    .is_some_and(|d| d <= now)
            })
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            self.advance(id, now, true);
        }
    }

    /// A datagram from unreliable channel socket (header channel must be 1..=C).
    pub fn handle_datagram(&mut self, now: Instant, msg: &[u8]) -> Result<(), DgtError> {
        let r = self.handle(now, msg, false);
        if r.is_err() {
            self.invalid += 1;
        }
        r
    }

    /// A message from the reliable transport (channel-0 block or terminator).
    pub fn handle_reliable(&mut self, now: Instant, msg: &[u8]) -> Result<(), DgtError> {
        let r = self.handle(now, msg, true);
        if r.is_err() {
            self.invalid += 1;
        }
        r
    }

    fn handle(&mut self, now: Instant, msg: &[u8], reliable: bool) -> Result<(), DgtError> {
        let (h, payload) = Header::decode(msg)?;
        let k = *self.keys.get(&h.key).ok_or(DgtError::UnknownKey(h.key))?;
        if h.value_type != k.value_type {
            return Err(DgtError::ValueTypeMismatch {
                key: h.key,
                got: h.value_type,
                want: k.value_type,
            });
        }
        if reliable != (h.channel == 0) || h.channel > self.cfg.channels {
            return Err(DgtError::BadChannel(h.channel));
        }
        match h.kind {
            DgtKind::Block => self.on_blocks(now, &h, &k, payload, msg.len()),
            DgtKind::End | DgtKind::Map | DgtKind::Fin => {
                self.on_end(now, &h, &k, payload, msg.len())
            }
            DgtKind::Report => Err(DgtError::BadKind(DgtKind::Report as u8)),
        }
    }

    /// A block message: one block, or (reliable channel only) a run of consecutive whole blocks
    /// from `h.block` on, the last one possibly the tensor's shorter tail. Checked whole, then
    /// taken block by block.
    fn on_blocks(
        &mut self,
        now: Instant,
        h: &Header,
        k: &KeyInfo,
        payload: &[u8],
        len: usize,
    ) -> Result<(), DgtError> {
        if h.block >= k.n_b {
            return Err(DgtError::BlockOutOfRange {
                block: h.block,
                n_b: k.n_b,
            });
        }
        let off = h.block * k.per;
        let end = u64::from(off) + u64::from(h.elem_count);
        let whole = h.elem_count > 0
            && end <= u64::from(k.n)
            && (end % u64::from(k.per) == 0 || end == u64::from(k.n));
        let one_block = h.elem_count <= k.per;
        if h.elem_offset != off || !whole || (h.channel != 0 && !one_block) {
            return Err(DgtError::BadElemRange {
                block: h.block,
                offset: h.elem_offset,
                count: h.elem_count,
            });
        }
        let e = k.value_type.size();
        let want = h.elem_count as usize * e;
        if payload.len() != want {
            return Err(DgtError::BadPayloadLen {
                got: payload.len(),
                want,
            });
        }
        let blocks = h.elem_count.div_ceil(k.per);
        for j in 0..blocks {
            let b = h.block + j;
            let o = b * k.per;
            let c = k.per.min(k.n - o);
            let sub = Header {
                block: b,
                elem_offset: o,
                elem_count: c,
                ..*h
            };
            let from = (o - off) as usize * e;
            let bytes = &payload[from..from + c as usize * e];
            // The header counts once, with the run's first block.
            let head = if j == 0 { len - payload.len() } else { 0 };
            self.on_block(now, &sub, k, bytes, head + bytes.len())?;
        }
        Ok(())
    }

    /// One block whose header [`Self::on_blocks`] checked: `payload` holds exactly its values.
    fn on_block(
        &mut self,
        now: Instant,
        h: &Header,
        k: &KeyInfo,
        payload: &[u8],
        len: usize,
    ) -> Result<(), DgtError> {
        let off = h.elem_offset;
        let ch = usize::from(h.channel);
        let b = h.block as usize;
        let sid = (h.sender, h.key);
        if h.channel == 0 {
            self.force_until(sid, h.round, now);
        }
        let st = self.streams.entry(sid).or_insert_with(|| Stream {
            cur: 0,
            slots: [None, None],
            prev: None,
            late: Vec::new(),
        });
        let c = &mut self.counters[ch];
        if h.round.wrapping_add(1) == st.cur {
            // Late window of the delivered round.
            let Some(prev) = st.prev.as_mut() else {
                c.received += 1;
                c.bytes += len as u64;
                c.stale += 1;
                return Ok(());
            };
            if prev.map[b] != h.channel {
                return Err(DgtError::WrongChannel {
                    block: h.block,
                    got: h.channel,
                    want: prev.map[b],
                });
            }
            c.received += 1;
            c.bytes += len as u64;
            if prev.seen[b] {
                c.dup += 1;
            } else {
                prev.seen[b] = true;
                prev.report.channels[ch].late += 1;
                c.late += 1;
                c.lost -= 1;
                st.late.push((off, widen(k.value_type, payload)));
            }
            return Ok(());
        }
        let idx = match h.round.wrapping_sub(st.cur) {
            0 => 0,
            1 => 1,
            d if d < u32::MAX / 2 => {
                c.received += 1;
                c.bytes += len as u64;
                c.future_dropped += 1;
                return Ok(());
            }
            _ => {
                c.received += 1;
                c.bytes += len as u64;
                c.stale += 1;
                return Ok(());
            }
        };
        let slot = st.slots[idx].get_or_insert_with(|| Slot::new(k));
        if let Some(map) = &slot.end {
            if map[b] != h.channel {
                return Err(DgtError::WrongChannel {
                    block: h.block,
                    got: h.channel,
                    want: map[b],
                });
            }
        }
        c.received += 1;
        c.bytes += len as u64;
        if slot.arrived[b] != NOT_SENT {
            c.dup += 1;
            return Ok(());
        }
        slot.arrived[b] = h.channel;
        slot.first_at.get_or_insert(now);
        if slot.values.is_empty() {
            slot.values = vec![0.0; k.n as usize];
        }
        write_block(
            k.value_type,
            payload,
            &mut slot.values[off as usize..(off + h.elem_count) as usize],
        );
        if idx == 0 && slot.complete() {
            self.advance(sid, now, false);
        }
        Ok(())
    }

    /// End (map and terminator), Map (map only) or Fin (terminator only, reliable or a
    /// datagram copy). The round's deadline starts once it has both, from the terminator's
    /// arrival.
    fn on_end(
        &mut self,
        now: Instant,
        h: &Header,
        k: &KeyInfo,
        payload: &[u8],
        len: usize,
    ) -> Result<(), DgtError> {
        if h.block != k.n_b || h.elem_count != k.n || h.elem_offset != 0 {
            return Err(DgtError::BlockOutOfRange {
                block: h.block,
                n_b: k.n_b,
            });
        }
        let with_map = h.kind != DgtKind::Fin;
        let with_fin = h.kind != DgtKind::Map;
        if with_map {
            check_channel_map(payload, k.n_b as usize, self.cfg.channels)?;
        } else if !payload.is_empty() {
            return Err(DgtError::BadPayloadLen {
                got: payload.len(),
                want: 0,
            });
        }
        let sid = (h.sender, h.key);
        let reliable = h.channel == 0;
        if reliable {
            self.force_until(sid, h.round, now);
        }
        let st = self.streams.entry(sid).or_insert_with(|| Stream {
            cur: 0,
            slots: [None, None],
            prev: None,
            late: Vec::new(),
        });
        let c = &mut self.counters[usize::from(h.channel)];
        c.bytes += len as u64;
        let idx = match h.round.wrapping_sub(st.cur) {
            0 => 0,
            1 => 1,
            d if !reliable => {
                // A datagram copy of a terminator from too far ahead (unordered, so nothing to
                // conclude), or of one whose round was delivered: the usual fate of the copies
                // of a round that completed, not counted as a duplicate.
                if d < u32::MAX / 2 {
                    c.future_dropped += 1;
                }
                return Ok(());
            }
            d => {
                // Reliable and ordered: a duplicate of a delivered round's terminator (stale),
                // or a sender more than a round ahead while the current round has no
                // terminator yet (dropped; the sender must not run two rounds ahead).
                // A Fin of a delivered round is expected: its datagram copy ended the round.
                if d < u32::MAX / 2 {
                    c.future_dropped += 1;
                } else if with_map {
                    c.stale += 1;
                }
                return Ok(());
            }
        };
        let slot = st.slots[idx].get_or_insert_with(|| Slot::new(k));
        let mut fresh = false;
        if with_map {
            if let Some(m) = &slot.end {
                if m.as_slice() != payload {
                    return Err(DgtError::ConflictingEnd {
                        key: h.key,
                        round: h.round,
                    });
                }
            } else {
                // Blocks that arrived on a channel the map does not list are discarded.
                let mut discarded = 0;
                for (j, (&m, a)) in payload.iter().zip(slot.arrived.iter_mut()).enumerate() {
                    if *a != NOT_SENT && *a != m {
                        *a = NOT_SENT;
                        let off = j * k.per as usize;
                        let end = (off + k.per as usize).min(k.n as usize);
                        slot.values[off..end].fill(0.0);
                        discarded += 1;
                    }
                }
                slot.end = Some(payload.to_vec());
                self.invalid += discarded;
                fresh = true;
            }
        }
        if with_fin && slot.fin.is_none() {
            slot.fin = Some(now);
            fresh = true;
        }
        if !fresh {
            // A repeated map is a duplicate; a terminator that already arrived by another
            // transport (its copies race each other) is expected.
            if with_map {
                c.dup += 1;
            }
            return Ok(());
        }
        if let (Some(fin), None, true) = (slot.fin, slot.deadline, slot.end.is_some()) {
            // A map that comes after its terminator (its reliable stream was slow) ends the
            // wait at once if the terminator's deadline already passed.
            slot.deadline = Some((fin + self.cfg.deadline).max(now));
        }
        if idx == 0 {
            if slot.complete() {
                self.advance(sid, now, false);
            } else if slot.deadline.is_some_and(|d| d <= now) {
                self.advance(sid, now, true);
            }
        }
        Ok(())
    }

    /// The reliable channel is ordered: a reliable message of round r ≥ cur + 2 means the
    /// sender moved on, so rounds that already have their terminator are delivered now.
    fn force_until(&mut self, sid: (u32, u32), round: u32, now: Instant) {
        loop {
            let Some(st) = self.streams.get(&sid) else {
                return;
            };
            let ahead = round.wrapping_sub(st.cur);
            let has_end = st.slots[0].as_ref().is_some_and(Slot::terminated);
            if (2..u32::MAX / 2).contains(&ahead) && has_end {
                self.advance(sid, now, true);
            } else {
                return;
            }
        }
    }

    /// Delivers the current round of `sid` (it has its terminator), then any following round
    /// that is already complete or past its deadline.
    fn advance(&mut self, sid: (u32, u32), now: Instant, mut forced: bool) {
        let Some(&k) = self.keys.get(&sid.1) else {
            return;
        };
        loop {
            let Some(st) = self.streams.get_mut(&sid) else {
                return;
            };
            let Some(mut slot) = st.slots[0].take() else {
                return;
            };
            let Some(map) = slot.end.take() else {
                st.slots[0] = Some(slot);
                return;
            };
            if slot.values.is_empty() {
                slot.values = vec![0.0; k.n as usize];
            }
            let mut missing = Vec::new();
            let mut report = RoundReport {
                sender: sid.0,
                key: sid.1,
                round: st.cur,
                channels: vec![ChannelRound::default(); usize::from(self.cfg.channels) + 1],
            };
            for (j, (&m, &a)) in map.iter().zip(&slot.arrived).enumerate() {
                if m == NOT_SENT {
                    continue;
                }
                let c = &mut self.counters[usize::from(m)];
                let r = &mut report.channels[usize::from(m)];
                c.sent += 1;
                r.sent += 1;
                if a == NOT_SENT {
                    c.lost += 1;
                    missing.push(j as u32);
                } else {
                    c.on_time += 1;
                    r.on_time += 1;
                }
            }
            let late = std::mem::take(&mut st.late);
            let folded_late = late.len() as u32;
            for (off, v) in late {
                for (o, x) in slot.values[off as usize..].iter_mut().zip(v) {
                    *o += x;
                }
            }
            let seen = slot.arrived.iter().map(|&a| a != NOT_SENT).collect();
            if let Some(old) = st.prev.replace(Closed { map, seen, report }) {
                self.reports.push_back(old.report);
            }
            let round = st.cur;
            st.cur = st.cur.wrapping_add(1);
            st.slots[0] = st.slots[1].take();
            tracing::trace!(
                sender = sid.0,
                key = sid.1,
                round,
                missing = missing.len(),
                "dgt deliver"
            );
            self.deliveries.push_back(Delivery {
                sender: sid.0,
                key: sid.1,
                round,
                values: slot.values,
                missing,
                folded_late,
                timed_out: forced,
                first_at: slot.first_at,
                delivered_at: now,
            });
            let next = st.slots[0].as_ref();
            let ready = next.is_some_and(|s| s.complete());
            let due = next.and_then(|s| s.deadline).is_some_and(|d| d <= now);
            if !(ready || due) {
                return;
            }
            forced = !ready;
        }
    }
}

fn widen(vt: ValueType, payload: &[u8]) -> Vec<f32> {
    let mut v = vec![0.0; payload.len() / vt.size()];
    write_block(vt, payload, &mut v);
    v
}

fn write_block(vt: ValueType, payload: &[u8], out: &mut [f32]) {
    match vt {
        ValueType::F32 => {
            for (o, b) in out.iter_mut().zip(payload.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        ValueType::F16 => {
            for (o, b) in out.iter_mut().zip(payload.chunks_exact(2)) {
                *o = f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dgt::{DgtSender, TerminatorMode, Values, DGT_HEADER_LEN};
    use std::time::Duration;

    fn cfg() -> DgtConfig {
        DgtConfig {
            block_bytes: 16,
            channels: 2,
            rate_bps: None,
            terminator: TerminatorMode::AfterAll,
            ..DgtConfig::default()
        }
    }

    /// Messages of one pushed round: (reliable, bytes).
    fn round(key: u32, r: u32, x: &[f32], map: &[u8]) -> Vec<(bool, Vec<u8>)> {
        round_with(cfg(), key, r, x, map)
    }

    /// Messages of one round pushed by a sender with `cfg`.
    fn round_with(cfg: DgtConfig, key: u32, r: u32, x: &[f32], map: &[u8]) -> Vec<(bool, Vec<u8>)> {
        let now = Instant::now();
        let mut s = DgtSender::new(3, cfg, now).unwrap();
        s.push(key, r, Values::F32(x), map).unwrap();
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while let Some(t) = s.poll_transmit(now, &mut buf) {
            out.push((t.channel == 0, std::mem::take(&mut buf)));
        }
        out
    }

    fn feed(rx: &mut DgtReceiver, now: Instant, msgs: &[(bool, Vec<u8>)]) {
        for (rel, m) in msgs {
            if *rel {
                rx.handle_reliable(now, m).unwrap();
            } else {
                rx.handle_datagram(now, m).unwrap();
            }
        }
    }

    fn rx() -> DgtReceiver {
        let mut rx = DgtReceiver::new(cfg()).unwrap();
        rx.add_key(1, 12, ValueType::F32).unwrap();
        rx
    }

    #[test]
    fn terminator_only_round_delivers_zeros() {
        let mut rx = rx();
        let now = Instant::now();
        feed(&mut rx, now, &round(1, 0, &[0.0; 12], &[0, 1, 2]));
        let d = rx.poll_delivery().unwrap();
        assert_eq!(d.values, vec![0.0; 12]);
        assert!(d.first_at.is_none() && !d.timed_out);
        assert_eq!(rx.counters()[0].sent, 0);
    }

    #[test]
    fn deadline_then_late_then_stale() {
        let mut rx = rx();
        let t = Instant::now();
        let x: Vec<f32> = (1..=12).map(|v| v as f32).collect();
        let m0 = round(1, 0, &x, &[0, 1, 2]);
        // Messages: block 0 (reliable), block 1 (ch 1), block 2 (ch 2), terminator.
        // Hold the channel-2 datagram.
        let held = m0[2].clone();
        feed(&mut rx, t, &[m0[0].clone(), m0[1].clone(), m0[3].clone()]);
        assert!(rx.poll_delivery().is_none());
        assert_eq!(rx.poll_timeout(), Some(t + Duration::from_millis(5)));
        rx.handle_timeout(t + Duration::from_millis(4));
        assert!(rx.poll_delivery().is_none());
        rx.handle_timeout(t + Duration::from_millis(5));
        let d = rx.poll_delivery().unwrap();
        assert!(d.timed_out);
        assert_eq!(d.missing, vec![2]);
        assert_eq!(&d.values[8..], &[0.0; 4]);
        // Late: folded into round 1.
        feed(&mut rx, t, std::slice::from_ref(&held));
        feed(&mut rx, t, std::slice::from_ref(&held)); // duplicate of a late block
        let k = rx.counters()[2];
        assert_eq!((k.sent, k.on_time, k.late, k.lost, k.dup), (1, 0, 1, 0, 1));
        feed(&mut rx, t, &round(1, 1, &x, &[0, 1, 2]));
        let d1 = rx.poll_delivery().unwrap();
        assert_eq!(d1.folded_late, 1);
        assert_eq!(&d1.values[8..], &[18.0, 20.0, 22.0, 24.0]);
        // Round 0's report is final now: channel 2 had its block late.
        let rep = rx.poll_report().unwrap();
        assert_eq!((rep.sender, rep.key, rep.round), (3, 1, 0));
        let ch: Vec<(u32, u32, u32)> = rep
            .channels
            .iter()
            .map(|c| (c.sent, c.on_time, c.late))
            .collect();
        assert_eq!(ch, [(1, 1, 0), (1, 1, 0), (1, 0, 1)]);
        assert_eq!(rep.unreliable_loss(), 0.0);
        assert!(rx.poll_report().is_none());
        // Round 0's datagram again, now two deliveries on: stale.
        feed(&mut rx, t, std::slice::from_ref(&held));
        assert_eq!(rx.counters()[2].stale, 1);
    }

    #[test]
    fn early_round_kept_further_ahead_dropped() {
        let mut rx = rx();
        let t = Instant::now();
        let x = [1.5f32; 12];
        let r1 = round(1, 1, &x, &[0, 1, 2]);
        let r2 = round(1, 2, &x, &[0, 1, 2]);
        // Unreliable datagrams of round 2 while round 0 is current: dropped.
        feed(&mut rx, t, &r2[1..3]);
        assert_eq!(
            rx.counters()[1].future_dropped + rx.counters()[2].future_dropped,
            2
        );
        // Round 1 entirely early, then round 0: both deliver in order.
        feed(&mut rx, t, &r1);
        assert!(rx.poll_delivery().is_none());
        feed(&mut rx, t, &round(1, 0, &x, &[0, 1, 2]));
        assert_eq!(rx.poll_delivery().unwrap().round, 0);
        let d1 = rx.poll_delivery().unwrap();
        assert_eq!((d1.round, d1.values.as_slice()), (1, &x[..]));
    }

    #[test]
    fn reliable_message_two_rounds_ahead_forces_delivery() {
        let mut rx = rx();
        let t = Instant::now();
        let x = [1.0f32; 12];
        let r0 = round(1, 0, &x, &[0, 1, 2]);
        // Round 0: the terminator but not the channel-1 datagram.
        feed(&mut rx, t, &[r0[0].clone(), r0[2].clone(), r0[3].clone()]);
        feed(&mut rx, t, &round(1, 1, &x, &[0, 1, 2]));
        assert!(rx.poll_delivery().is_none());
        feed(&mut rx, t, &round(1, 2, &x, &[0, 0, 0])[..1]);
        let d0 = rx.poll_delivery().unwrap();
        assert!(d0.timed_out && d0.missing == [1]);
        assert_eq!(rx.poll_delivery().unwrap().round, 1);
    }

    #[test]
    fn reliable_runs_deliver_like_blocks_and_bad_runs_are_refused() {
        let t = Instant::now();
        let x: Vec<f32> = (0..12).map(|i| i as f32 - 5.5).collect();
        // All three blocks reliable: one run and the terminator.
        let m = round(1, 0, &x, &[0, 0, 0]);
        assert_eq!(m.len(), 2);
        let mut r = rx();
        feed(&mut r, t, &m);
        let d = r.poll_delivery().expect("delivered");
        assert_eq!(d.values, x);
        assert!(d.missing.is_empty());
        let c = &r.counters()[0];
        assert_eq!((c.received, c.on_time), (3, 3));
        assert_eq!(c.bytes, m.iter().map(|(_, b)| b.len() as u64).sum::<u64>());
        // Runs that do not cover whole blocks from their first one, or leave the tensor.
        let msg = |channel: u8, block: u32, offset: u32, count: u32, extra: usize| {
            let mut b = Vec::new();
            Header {
                kind: DgtKind::Block,
                channel,
                value_type: ValueType::F32,
                sender: 3,
                key: 1,
                round: 1,
                block,
                elem_offset: offset,
                elem_count: count,
            }
            .encode_into(&mut b);
            b.resize(b.len() + count as usize * 4 + extra, 0);
            b
        };
        let mut r = rx();
        for (block, offset, count) in [(0, 0, 6), (0, 0, 13), (0, 4, 8), (1, 4, 0), (2, 8, 8)] {
            let e = r.handle_reliable(t, &msg(0, block, offset, count, 0));
            assert!(
                matches!(e, Err(DgtError::BadElemRange { .. })),
                "{block} {offset} {count}: {e:?}"
            );
        }
        assert!(matches!(
            r.handle_reliable(t, &msg(0, 3, 12, 0, 0)),
            Err(DgtError::BlockOutOfRange { .. })
        ));
        assert!(matches!(
            r.handle_reliable(t, &msg(0, 0, 0, 8, 1)),
            Err(DgtError::BadPayloadLen { .. })
        ));
        // A datagram carries exactly one block.
        assert!(matches!(
            r.handle_datagram(t, &msg(1, 0, 0, 8, 0)),
            Err(DgtError::BadElemRange { .. })
        ));
        // Whole runs are fine: blocks 1–2 (the tail of 4), then block 0.
        r.handle_reliable(t, &msg(0, 1, 4, 8, 0)).unwrap();
        r.handle_reliable(t, &msg(0, 0, 0, 4, 0)).unwrap();
        assert_eq!(r.invalid(), 8);
        assert_eq!(r.counters()[0].received, 3);
    }

    #[test]
    fn terminator_and_channel_checks() {
        let mut rx = rx();
        let t = Instant::now();
        let x = [1.0f32; 12];
        let m = round(1, 0, &x, &[0, 1, 2]);
        let end = m.last().unwrap().1.clone();
        // A datagram on the reliable transport, a reliable block as a datagram.
        assert!(rx.handle_reliable(t, &m[1].1).is_err());
        assert!(rx.handle_datagram(t, &m[0].1).is_err());
        // A block arriving on another channel than the terminator lists.
        let mut conflicting = end.clone();
        *conflicting.last_mut().unwrap() = 1;
        rx.handle_reliable(t, &conflicting).unwrap();
        assert!(matches!(
            rx.handle_datagram(t, &m[2].1),
            Err(DgtError::WrongChannel {
                block: 2,
                got: 2,
                want: 1
            })
        ));
        // A different terminator for the same round; the same one again is a duplicate.
        assert!(matches!(
            rx.handle_reliable(t, &end),
            Err(DgtError::ConflictingEnd { .. })
        ));
        rx.handle_reliable(t, &conflicting).unwrap();
        assert_eq!(rx.counters()[0].dup, 1);
        // Unknown key, wrong value type, bad map length.
        let mut k = end.clone();
        k[12] = 2;
        assert_eq!(rx.handle_reliable(t, &k), Err(DgtError::UnknownKey(2)));
        let mut vt = end.clone();
        vt[5] = 1;
        assert!(matches!(
            rx.handle_reliable(t, &vt),
            Err(DgtError::ValueTypeMismatch { .. })
        ));
        assert!(rx.handle_reliable(t, &end[..end.len() - 1]).is_err());
        let mut report = Vec::new();
        crate::dgt::RoundReport {
            sender: 3,
            key: 1,
            round: 0,
            channels: vec![Default::default(); 3],
        }
        .encode_into(&mut report);
        assert_eq!(rx.handle_reliable(t, &report), Err(DgtError::BadKind(50)));
        assert_eq!(rx.invalid(), 8);
    }

    #[test]
    fn split_terminator_map_early_fin_from_either_transport() {
        let split = DgtConfig {
            terminator: TerminatorMode::Split,
            ..cfg()
        };
        let mut rx = rx();
        let t = Instant::now();
        let x: Vec<f32> = (0..12).map(|i| i as f32 + 1.0).collect();
        let m = round_with(split.clone(), 1, 0, &x, &[0, 1, 2]);
        let kinds: Vec<(bool, u8)> = m.iter().map(|(rel, b)| (*rel, b[3])).collect();
        // Reliable block, Map, two datagrams, Fin, two Fin copies (channel 1).
        assert_eq!(
            kinds,
            [
                (true, 48),
                (true, 51),
                (false, 48),
                (false, 48),
                (true, 52),
                (false, 52),
                (false, 52)
            ]
        );
        assert!(m[5..]
            .iter()
            .all(|(_, b)| b.len() == DGT_HEADER_LEN && b[4] == 1));
        // Block 2 is lost and the reliable Fin is late: the first copy starts the deadline.
        feed(&mut rx, t, &m[..3]);
        feed(&mut rx, t, &m[5..6]);
        assert_eq!(rx.poll_timeout(), Some(t + split.deadline));
        rx.handle_timeout(t + split.deadline);
        let d = rx.poll_delivery().unwrap();
        assert!(d.timed_out);
        assert_eq!(d.missing, vec![2]);
        assert_eq!(&d.values[..8], &x[..8]);
        // The late reliable Fin and the second copy change nothing and are no duplicates.
        rx.handle_reliable(t + split.deadline, &m[4].1).unwrap();
        rx.handle_datagram(t + split.deadline, &m[6].1).unwrap();
        assert!(rx.poll_delivery().is_none());
        assert!(rx.counters().iter().all(|c| c.dup + c.stale == 0));

        // Round 1: a copy of the Fin overtakes the map; the map arrives after the deadline
        // and ends the round at once.
        let m1 = round_with(split.clone(), 1, 1, &x, &[0, 1, 2]);
        rx.handle_datagram(t, &m1[5].1).unwrap();
        assert!(rx.poll_timeout().is_none(), "no deadline without the map");
        let late = t + 3 * split.deadline;
        feed(&mut rx, late, &m1[..2]);
        let d = rx.poll_delivery().unwrap();
        assert_eq!((d.round, d.timed_out, d.delivered_at), (1, true, late));
        assert_eq!(d.missing, vec![1, 2]);

        // Malformed: a Fin with a payload or the wrong block count, a Map as a datagram.
        let fin = m1[5].1.clone();
        let mut with_payload = fin.clone();
        with_payload.push(0);
        assert!(matches!(
            rx.handle_datagram(t, &with_payload),
            Err(DgtError::BadPayloadLen { got: 1, want: 0 })
        ));
        let mut bad_nb = fin.clone();
        bad_nb[20] = 9;
        assert!(rx.handle_datagram(t, &bad_nb).is_err());
        let mut map_dgram = m1[1].1.clone();
        map_dgram[4] = 1;
        assert_eq!(
            rx.handle_datagram(t, &map_dgram),
            Err(DgtError::BadChannel(1))
        );
        assert_eq!(rx.invalid(), 3);
        // A copy from far ahead is dropped and counted.
        let mut ahead = fin;
        ahead[16] = 7;
        rx.handle_datagram(t, &ahead).unwrap();
        assert_eq!(rx.counters()[1].future_dropped, 1);
        assert!(rx.poll_delivery().is_none());
    }
}
