//! The DGT sender: blocks, per-channel strict-priority queues, pacing, terminators.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use super::header::{DgtKind, Header, DGT_HEADER_LEN};
use super::pacing::TokenBucket;
use super::{
    DgtConfig, DgtError, TerminatorMode, ValueType, FIN_DATAGRAMS, MAX_CHANNELS, NOT_SENT,
};

/// The values of one (key, round).
#[derive(Debug, Clone, Copy)]
pub enum Values<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// IEEE binary16 bit patterns.
    F16(&'a [u16]),
}

impl Values<'_> {
    fn value_type(&self) -> ValueType {
        match self {
            Values::F32(_) => ValueType::F32,
            Values::F16(_) => ValueType::F16,
        }
    }

    fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F16(v) => v.len(),
        }
    }

    fn all_zero(&self, r: std::ops::Range<usize>) -> bool {
        match self {
            Values::F32(v) => v[r].iter().all(|&x| x == 0.0),
            Values::F16(v) => v[r].iter().all(|&h| h & 0x7fff == 0),
        }
    }

    fn le_bytes(&self) -> Vec<u8> {
        match self {
            Values::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Values::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// One message handed out by [`DgtSender::poll_transmit`]; its bytes were appended to the
/// caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// 0: a reliable message for the TCP transport; 1..=C: a datagram for that UDP channel.
    pub channel: u8,
    /// Block, map or terminator.
    pub kind: DgtKind,
    /// Key.
    pub key: u32,
    /// Round.
    pub round: u32,
    /// Block id (terminator: n_b); a reliable run's first block.
    pub block: u32,
    /// Blocks carried: 1 for a block datagram, up to [`RELIABLE_RUN_BYTES`] worth for a reliable
    /// run of consecutive blocks, 0 for a map or terminator.
    pub blocks: u32,
    /// Bytes appended (header + payload).
    pub len: usize,
}

/// Most value bytes of one reliable message: consecutive reliable blocks of a (key, round) go
/// as one run under one header, up to this much (at least one block), instead of a header
/// (and a frame header of the reliable stream) per block.
pub const RELIABLE_RUN_BYTES: usize = 64 * 1024;

/// What the sender handed out, per channel (index = channel).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SenderCounters {
    /// Block messages per channel.
    pub blocks: [u64; 8],
    /// Bytes (DGT header + payload) per channel.
    pub bytes: [u64; 8],
    /// Terminators (End or Fin) sent on the reliable channel.
    pub terminators: u64,
    /// Terminator copies sent as datagrams ([`TerminatorMode::Split`]).
    pub fin_datagrams: u64,
}

#[derive(Debug)]
struct Round {
    key: u32,
    round: u32,
    value_type: ValueType,
    n: u32,
    data: Vec<u8>,
    map: Vec<u8>,
    unreliable_left: usize,
    end_sent: bool,
}

impl Round {
    /// Payload bytes: what counts against the priority window.
    fn bytes(&self) -> usize {
        self.data.len()
    }
}

#[derive(Debug, Clone, Copy)]
enum Item {
    Block {
        id: u64,
        block: u32,
    },
    /// A control message of (key, round) `id` on the reliable channel: `End` (map and
    /// terminator in one), or under [`TerminatorMode::Split`] `Map` (the map alone, after the
    /// reliable blocks) and `Fin` (the terminator alone, after the last datagram).
    Control {
        id: u64,
        kind: DgtKind,
    },
    /// A copy of a terminator as a datagram: the whole message, so that it outlives its round.
    FinDatagram(Header),
}

/// Whether a control message of `kind` (End, Map or Fin) carries the channel map: all but Fin.
fn carries_map(kind: DgtKind) -> bool {
    kind != DgtKind::Fin
}

/// Sans-IO DGT sender for one node (all keys). See the module docs of [`crate::dgt`].
#[derive(Debug)]
pub struct DgtSender {
    id: u32,
    cfg: DgtConfig,
    rounds: HashMap<u64, Round>,
    next_id: u64,
    queues: [VecDeque<Item>; (MAX_CHANNELS + 1) as usize],
    /// Pushed (key, round)s not yet in the queues (the priority window is full), in push order.
    waiting: VecDeque<u64>,
    /// Payload bytes of the (key, round)s in the queues and not finished.
    window_used: usize,
    bucket: Option<TokenBucket>,
    counters: SenderCounters,
}

impl DgtSender {
    /// A sender with node id `sender_id`.
    pub fn new(sender_id: u32, cfg: DgtConfig, now: Instant) -> Result<DgtSender, DgtError> {
        cfg.validate()?;
        let max_dgram = (DGT_HEADER_LEN + cfg.block_bytes + cfg.ip_overhead) as u64;
        let bucket = cfg
            .rate_bps
            .map(|r| TokenBucket::new(r, max_dgram * u64::from(cfg.burst), now));
        Ok(DgtSender {
            id: sender_id,
            cfg,
            rounds: HashMap::new(),
            next_id: 0,
            queues: Default::default(),
            waiting: VecDeque::new(),
            window_used: 0,
            bucket,
            counters: SenderCounters::default(),
        })
    }

    /// Number of blocks n_b for a tensor of `n` elements of `value_type`.
    pub fn num_blocks(&self, n: usize, value_type: ValueType) -> usize {
        n.div_ceil(self.cfg.block_bytes / value_type.size())
    }

    /// Queues (key, round). `channel_of_block[j]` is block j's channel from the caller's ranking
    /// (geomx-kernels `assign_channels`): 0 reliable, 1..=C unreliable, [`NOT_SENT`] skipped.
    /// Blocks whose values are all zero are never sent, whatever the map says; a non-zero block
    /// marked [`NOT_SENT`] is refused (its values would silently vanish). Within a channel,
    /// blocks go in id order. The (key, round) enters the channel queues once the priority
    /// window ([`DgtConfig::window_bytes`]) has room for it.
    pub fn push(
        &mut self,
        key: u32,
        round: u32,
        values: Values<'_>,
        channel_of_block: &[u8],
    ) -> Result<(), DgtError> {
        let vt = values.value_type();
        let n = values.len();
        let n32 = u32::try_from(n).map_err(|_| DgtError::Invalid(format!("{n} elements")))?;
        if n == 0 {
            return Err(DgtError::Invalid("empty tensor".into()));
        }
        let per = self.cfg.block_bytes / vt.size();
        let n_b = n.div_ceil(per);
        if channel_of_block.len() != n_b {
            return Err(DgtError::Invalid(format!(
                "channel map of {} entries for {n_b} blocks",
                channel_of_block.len()
            )));
        }
        let mut map = channel_of_block.to_vec();
        for (j, c) in map.iter_mut().enumerate() {
            let zero = values.all_zero(j * per..((j + 1) * per).min(n));
            if zero {
                *c = NOT_SENT;
            } else if *c == NOT_SENT {
                return Err(DgtError::Invalid(format!(
                    "non-zero block {j} marked not sent"
                )));
            } else if *c > self.cfg.channels {
                return Err(DgtError::BadChannel(*c));
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let unreliable_left = map.iter().filter(|&&c| c != 0 && c != NOT_SENT).count();
        self.rounds.insert(
            id,
            Round {
                key,
                round,
                value_type: vt,
                n: n32,
                data: values.le_bytes(),
                map,
                unreliable_left,
                end_sent: false,
            },
        );
        self.waiting.push_back(id);
        self.admit();
        Ok(())
    }

    /// Moves waiting (key, round)s into the channel queues while the window has room.
    fn admit(&mut self) {
        while let Some(&id) = self.waiting.front() {
            let r = &self.rounds[&id];
            let fits = match self.cfg.window_bytes {
                None => true,
                Some(w) => self.window_used == 0 || self.window_used + r.bytes() <= w,
            };
            if !fits {
                return;
            }
            self.waiting.pop_front();
            self.window_used += r.bytes();
            for (j, &c) in r.map.iter().enumerate() {
                if c != NOT_SENT {
                    self.queues[usize::from(c)].push_back(Item::Block {
                        id,
                        block: j as u32,
                    });
                }
            }
            if r.unreliable_left == 0 || self.cfg.terminator == TerminatorMode::AfterReliable {
                self.queues[0].push_back(Item::Control {
                    id,
                    kind: DgtKind::End,
                });
            } else if self.cfg.terminator == TerminatorMode::Split {
                self.queues[0].push_back(Item::Control {
                    id,
                    kind: DgtKind::Map,
                });
            }
        }
    }

    /// Forgets a finished (key, round) and lets waiting ones into the window.
    fn finish(&mut self, id: u64) {
        if let Some(r) = self.rounds.remove(&id) {
            self.window_used -= r.bytes();
            self.admit();
        }
    }

    /// True while anything is queued or waits for the window.
    pub fn is_busy(&self) -> bool {
        !self.waiting.is_empty() || self.queues.iter().any(|q| !q.is_empty())
    }

    /// Next message to send at `now`, appended to `buf`: reliable messages first, then the
    /// lowest non-empty unreliable channel if the pacer allows. `None` when nothing may go now
    /// (see [`DgtSender::poll_timeout`]).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        let ch = self.queues.iter().position(|q| !q.is_empty())?;
        let item = *self.queues[ch].front()?;
        if ch != 0 {
            let size = self.item_len(item) + self.cfg.ip_overhead;
            if let Some(b) = self.bucket.as_mut() {
                if !b.try_take(size, now) {
                    return None;
                }
            }
        }
        self.queues[ch].pop_front();
        let mut blocks = 1;
        if let (0, Item::Block { id, block }) = (ch, item) {
            // A reliable run: the consecutive blocks of the same (key, round) queued next.
            let per_bytes = self.cfg.block_bytes;
            while let Some(&Item::Block { id: i, block: b }) = self.queues[0].front() {
                if i != id
                    || b != block + blocks
                    || (blocks as usize + 1) * per_bytes > RELIABLE_RUN_BYTES
                {
                    break;
                }
                self.queues[0].pop_front();
                blocks += 1;
            }
        }
        Some(self.emit(ch as u8, item, blocks, buf))
    }

    /// When the head unreliable datagram may go (pacing), if one waits and no reliable message
    /// is queued; `None` otherwise (reliable messages are never paced: poll again at once).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let ch = self.queues.iter().position(|q| !q.is_empty())?;
        if ch == 0 {
            return None;
        }
        let item = *self.queues[ch].front()?;
        let size = self.item_len(item) + self.cfg.ip_overhead;
        self.bucket.as_ref().map(|b| b.ready_at(size))
    }

    /// Counts of what was handed out so far.
    pub fn counters(&self) -> &SenderCounters {
        &self.counters
    }

    /// Current pacing rate in bit/s (`None`: unpaced).
    pub fn rate_bps(&self) -> Option<u64> {
        self.bucket.as_ref().map(TokenBucket::rate_bps)
    }

    /// Sets the pacing rate (e.g. the reliable goodput measured in the first round).
    pub fn set_rate(&mut self, rate_bps: u64, now: Instant) -> Result<(), DgtError> {
        let b = self
            .bucket
            .as_mut()
            .ok_or_else(|| DgtError::Invalid("sender is unpaced".into()))?;
        if rate_bps == 0 {
            return Err(DgtError::Invalid("rate 0".into()));
        }
        b.set_rate(rate_bps, now);
        Ok(())
    }

    /// `auto` pacing step after a round, from the receiver's unreliable loss fraction:
    /// R ← 0.8·R above 2 %, R ← 1.05·R below 0.5 %, clamped to [`min_bps`, `max_bps`].
    /// Returns the new rate.
    pub fn adapt_rate(
        &mut self,
        unreliable_loss: f64,
        min_bps: u64,
        max_bps: u64,
        now: Instant,
    ) -> Result<u64, DgtError> {
        let r = self
            .rate_bps()
            .ok_or_else(|| DgtError::Invalid("sender is unpaced".into()))? as f64;
        let next = if unreliable_loss > 0.02 {
            0.8 * r
        } else if unreliable_loss < 0.005 {
            1.05 * r
        } else {
            r
        };
        let next = (next as u64).clamp(min_bps.max(1), max_bps.max(min_bps.max(1)));
        self.set_rate(next, now)?;
        Ok(next)
    }

    fn item_len(&self, item: Item) -> usize {
        match item {
            Item::Block { id, block } => {
                let r = &self.rounds[&id];
                let (_, cnt) = self.block_span(r, block, 1);
                DGT_HEADER_LEN + cnt as usize * r.value_type.size()
            }
            Item::Control { id, kind } if carries_map(kind) => {
                DGT_HEADER_LEN + self.rounds[&id].map.len()
            }
            Item::Control { .. } | Item::FinDatagram(_) => DGT_HEADER_LEN,
        }
    }

    /// (first element, elements) of `blocks` blocks from `block` on.
    fn block_span(&self, r: &Round, block: u32, blocks: u32) -> (u32, u32) {
        let per = (self.cfg.block_bytes / r.value_type.size()) as u32;
        let off = block * per;
        (off, off.saturating_add(per * blocks).min(r.n) - off)
    }

    /// The header of (key, round) `id`'s End, Map or Fin on the reliable channel.
    fn end_header(&self, id: u64, kind: DgtKind) -> Header {
        let r = &self.rounds[&id];
        Header {
            kind,
            channel: 0,
            value_type: r.value_type,
            sender: self.id,
            key: r.key,
            round: r.round,
            block: r.map.len() as u32,
            elem_offset: 0,
            elem_count: r.n,
        }
    }

    /// [`TerminatorMode::Split`]: the last datagram of `id` went out; queue the terminator on
    /// the reliable channel and its copies at the head of the first unreliable channel (behind
    /// nothing, so they follow the last datagram at once).
    fn queue_fin(&mut self, id: u64) {
        self.queues[0].push_back(Item::Control {
            id,
            kind: DgtKind::Fin,
        });
        let h = Header {
            channel: 1,
            ..self.end_header(id, DgtKind::Fin)
        };
        for _ in 0..FIN_DATAGRAMS {
            self.queues[1].push_front(Item::FinDatagram(h));
        }
    }

    /// Emits `item`; a block item carries `blocks` consecutive blocks (a reliable run).
    fn emit(&mut self, channel: u8, item: Item, blocks: u32, buf: &mut Vec<u8>) -> Transmit {
        let start = buf.len();
        match item {
            Item::Block { id, block } => {
                let r = &self.rounds[&id];
                let (off, cnt) = self.block_span(r, block, blocks);
                let e = r.value_type.size();
                Header {
                    kind: DgtKind::Block,
                    channel,
                    value_type: r.value_type,
                    sender: self.id,
                    key: r.key,
                    round: r.round,
                    block,
                    elem_offset: off,
                    elem_count: cnt,
                }
                .encode_into(buf);
                buf.extend_from_slice(&r.data[off as usize * e..(off + cnt) as usize * e]);
                let (key, round) = (r.key, r.round);
                let len = buf.len() - start;
                self.counters.blocks[usize::from(channel)] += u64::from(blocks);
                self.counters.bytes[usize::from(channel)] += len as u64;
                if channel != 0 {
                    let r = self.rounds.get_mut(&id).expect("queued round exists");
                    r.unreliable_left -= 1;
                    if r.unreliable_left == 0 {
                        if r.end_sent {
                            self.finish(id);
                        } else {
                            match self.cfg.terminator {
                                TerminatorMode::AfterAll => {
                                    self.queues[0].push_back(Item::Control {
                                        id,
                                        kind: DgtKind::End,
                                    })
                                }
                                TerminatorMode::Split => self.queue_fin(id),
                                TerminatorMode::AfterReliable => {}
                            }
                        }
                    }
                }
                Transmit {
                    channel,
                    kind: DgtKind::Block,
                    key,
                    round,
                    block,
                    blocks,
                    len,
                }
            }
            Item::Control { id, kind } => {
                let h = self.end_header(id, kind);
                h.encode_into(buf);
                let r = self.rounds.get_mut(&id).expect("queued round exists");
                if carries_map(kind) {
                    buf.extend_from_slice(&r.map);
                }
                let len = buf.len() - start;
                self.counters.bytes[0] += len as u64;
                if kind != DgtKind::Map {
                    r.end_sent = true;
                    self.counters.terminators += 1;
                    // In after_reliable mode unreliable blocks may still be queued.
                    if r.unreliable_left == 0 {
                        self.finish(id);
                    }
                }
                Transmit {
                    channel: 0,
                    kind,
                    key: h.key,
                    round: h.round,
                    block: h.block,
                    blocks: 0,
                    len,
                }
            }
            Item::FinDatagram(h) => {
                h.encode_into(buf);
                let len = buf.len() - start;
                self.counters.fin_datagrams += 1;
                self.counters.bytes[usize::from(channel)] += len as u64;
                Transmit {
                    channel,
                    kind: DgtKind::Fin,
                    key: h.key,
                    round: h.round,
                    block: h.block,
                    blocks: 0,
                    len,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mode: TerminatorMode) -> DgtConfig {
        DgtConfig {
            block_bytes: 16,
            channels: 2,
            rate_bps: None,
            terminator: mode,
            ..DgtConfig::default()
        }
    }

    fn drain(s: &mut DgtSender, now: Instant) -> Vec<Transmit> {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        while let Some(t) = s.poll_transmit(now, &mut buf) {
            out.push(t);
        }
        assert_eq!(buf.len(), out.iter().map(|t| t.len).sum::<usize>());
        out
    }

    #[test]
    fn push_checks_the_map() {
        let now = Instant::now();
        let mut s = DgtSender::new(1, cfg(TerminatorMode::AfterAll), now).unwrap();
        let x = [1.0f32; 9]; // 3 blocks of 4
        assert_eq!(s.num_blocks(9, ValueType::F32), 3);
        assert!(s.push(1, 0, Values::F32(&x), &[0, 1]).is_err());
        assert!(s.push(1, 0, Values::F32(&x), &[0, 1, NOT_SENT]).is_err());
        assert!(matches!(
            s.push(1, 0, Values::F32(&x), &[0, 1, 3]),
            Err(DgtError::BadChannel(3))
        ));
        assert!(s.push(1, 0, Values::F32(&[]), &[]).is_err());
        assert!(!s.is_busy());
    }

    #[test]
    fn zero_blocks_are_skipped_and_listed_not_sent() {
        let now = Instant::now();
        let mut s = DgtSender::new(1, cfg(TerminatorMode::AfterAll), now).unwrap();
        let mut x = [2.0f32; 12];
        x[4..8].fill(-0.0);
        s.push(1, 0, Values::F32(&x), &[1, 0, 2]).unwrap();
        let mut buf = Vec::new();
        let mut log = Vec::new();
        while let Some(t) = s.poll_transmit(now, &mut buf) {
            log.push((t.kind, t.channel, t.block));
        }
        assert_eq!(
            log,
            [
                (DgtKind::Block, 1, 0),
                (DgtKind::Block, 2, 2),
                (DgtKind::End, 0, 3)
            ]
        );
        // The terminator's map, at the end of the buffer, lists block 1 as not sent.
        assert_eq!(&buf[buf.len() - 3..], &[1, NOT_SENT, 2]);
        assert!(s.rounds.is_empty());
        assert_eq!(s.counters().blocks[..3], [0, 1, 1]);
        assert_eq!(s.counters().terminators, 1);
    }

    #[test]
    fn f16_block_sizes_and_bytes() {
        let now = Instant::now();
        let mut s = DgtSender::new(9, cfg(TerminatorMode::AfterAll), now).unwrap();
        let h: Vec<u16> = (1..=10).collect(); // 8 per block: blocks of 8 and 2
        s.push(4, 7, Values::F16(&h), &[0, 1]).unwrap();
        let mut buf = Vec::new();
        let t = s.poll_transmit(now, &mut buf).unwrap();
        assert_eq!((t.len, t.blocks), (DGT_HEADER_LEN + 16, 1));
        let (hd, payload) = Header::decode(&buf).unwrap();
        assert_eq!((hd.sender, hd.key, hd.round, hd.elem_count), (9, 4, 7, 8));
        assert_eq!(payload[..4], [1, 0, 2, 0]);
        let t = s.poll_transmit(now, &mut buf).unwrap();
        assert_eq!((t.block, t.len), (1, DGT_HEADER_LEN + 4));
    }

    #[test]
    fn after_reliable_frees_the_round_after_its_last_datagram() {
        let now = Instant::now();
        let mut s = DgtSender::new(1, cfg(TerminatorMode::AfterReliable), now).unwrap();
        s.push(1, 0, Values::F32(&[1.0; 12]), &[0, 1, 2]).unwrap();
        let log = drain(&mut s, now);
        let kinds: Vec<(DgtKind, u8)> = log.iter().map(|t| (t.kind, t.channel)).collect();
        assert_eq!(
            kinds,
            [
                (DgtKind::Block, 0),
                (DgtKind::End, 0),
                (DgtKind::Block, 1),
                (DgtKind::Block, 2)
            ]
        );
        assert!(s.rounds.is_empty());
    }

    #[test]
    fn consecutive_reliable_blocks_go_as_one_run() {
        let now = Instant::now();
        // 16-byte blocks: RELIABLE_RUN_BYTES / 16 of them fit one run.
        let cap = (RELIABLE_RUN_BYTES / 16) as u32;
        let n_b = cap as usize + 5;
        let n = n_b * 4 - 1; // the last block is 3 elements
        let x: Vec<f32> = (0..n).map(|i| i as f32 + 1.0).collect();
        let mut map = vec![0u8; n_b];
        map[2] = 1; // blocks 0–1, then 3 up to the cap, then the rest, on channel 0
        let mut s = DgtSender::new(1, cfg(TerminatorMode::AfterAll), now).unwrap();
        s.push(6, 0, Values::F32(&x), &map).unwrap();
        let mut buf = Vec::new();
        let mut runs = Vec::new();
        while let Some(t) = s.poll_transmit(now, &mut buf) {
            runs.push((t.kind, t.channel, t.block, t.blocks));
        }
        use DgtKind::{Block, End};
        let rest = n_b as u32 - 3 - cap;
        assert_eq!(
            runs,
            [
                (Block, 0, 0, 2),
                (Block, 0, 3, cap),
                (Block, 0, 3 + cap, rest),
                (Block, 1, 2, 1),
                (End, 0, n_b as u32, 0)
            ]
        );
        // A run is one header and its blocks' values back to back; the tail run ends at N.
        let (h, payload) = Header::decode(&buf).unwrap();
        assert_eq!((h.block, h.elem_offset, h.elem_count), (0, 0, 8));
        // (`decode` hands back the rest of the buffer: the run's values come first.)
        assert_eq!(payload[28..32], 8.0f32.to_le_bytes());
        let (h, _) = Header::decode(&payload[32..]).unwrap();
        assert_eq!((h.block, h.elem_count), (3, cap * 4));
        let tail = DGT_HEADER_LEN * 2 + 32 + cap as usize * 16;
        let (h, payload) = Header::decode(&buf[tail..]).unwrap();
        assert_eq!(h.elem_offset, (3 + cap) * 4);
        assert_eq!(h.elem_count as usize, n - (3 + cap as usize) * 4);
        assert_eq!(payload[..4], ((3 + cap) as f32 * 4.0 + 1.0).to_le_bytes());
        assert_eq!(s.counters().blocks[0], u64::from(n_b as u32 - 1));
    }

    /// (key, kind, channel) of a send log.
    fn order(log: &[Transmit]) -> Vec<(u32, DgtKind, u8)> {
        log.iter().map(|t| (t.key, t.kind, t.channel)).collect()
    }

    #[test]
    fn the_window_finishes_a_key_before_the_next_enters() {
        use DgtKind::{Block, End};
        let now = Instant::now();
        // Two keys of 3 blocks (48 B each), one reliable block and two unreliable ones each.
        let push_two = |window: Option<usize>| {
            let c = DgtConfig {
                window_bytes: window,
                ..cfg(TerminatorMode::AfterAll)
            };
            let mut s = DgtSender::new(1, c, now).unwrap();
            s.push(1, 0, Values::F32(&[1.0; 12]), &[0, 1, 2]).unwrap();
            s.push(2, 0, Values::F32(&[1.0; 12]), &[0, 1, 2]).unwrap();
            let log = order(&drain(&mut s, now));
            assert!(!s.is_busy() && s.rounds.is_empty() && s.window_used == 0);
            log
        };
        // A window of one key: key 1 goes whole, terminator included, before key 2 enters.
        let one = [
            (1, Block, 0),
            (1, Block, 1),
            (1, Block, 2),
            (1, End, 0),
            (2, Block, 0),
            (2, Block, 1),
            (2, Block, 2),
            (2, End, 0),
        ];
        assert_eq!(push_two(Some(48)), one);
        // An oversized key still enters an empty window, alone.
        assert_eq!(push_two(Some(4)), one);
        // Without a window (or one that holds both), strict priority across keys: both
        // reliable blocks first, and key 1's terminator only after key 2's reliable block.
        let strict = [
            (1, Block, 0),
            (2, Block, 0),
            (1, Block, 1),
            (2, Block, 1),
            (1, Block, 2),
            (1, End, 0),
            (2, Block, 2),
            (2, End, 0),
        ];
        assert_eq!(push_two(None), strict);
        assert_eq!(push_two(Some(96)), strict);
        // A zero window is refused.
        let zero = DgtConfig {
            window_bytes: Some(0),
            ..cfg(TerminatorMode::AfterAll)
        };
        assert!(DgtSender::new(1, zero, now).is_err());
    }

    #[test]
    fn auto_rate_steps() {
        let now = Instant::now();
        let c = DgtConfig {
            rate_bps: Some(100_000_000),
            ..cfg(TerminatorMode::AfterAll)
        };
        let mut s = DgtSender::new(1, c, now).unwrap();
        assert_eq!(s.adapt_rate(0.03, 1, u64::MAX, now).unwrap(), 80_000_000);
        assert_eq!(s.adapt_rate(0.01, 1, u64::MAX, now).unwrap(), 80_000_000);
        assert_eq!(s.adapt_rate(0.001, 1, u64::MAX, now).unwrap(), 84_000_000);
        assert_eq!(
            s.adapt_rate(0.5, 70_000_000, u64::MAX, now).unwrap(),
            70_000_000
        );
        assert_eq!(s.adapt_rate(0.0, 1, 71_000_000, now).unwrap(), 71_000_000);
        let mut unpaced = DgtSender::new(1, cfg(TerminatorMode::AfterAll), now).unwrap();
        assert!(unpaced.adapt_rate(0.0, 1, 2, now).is_err());
    }
}
