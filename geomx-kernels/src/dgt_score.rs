//! DGT block contributions (`specs/dgt.md`, sender steps 1–4).
//!
//! Values are cut into blocks of B bytes (element size e): block j covers elements
//! `[j·B/e, min(N, (j+1)·B/e))`. Per (key, block) the contribution
//! `c_j ← α·c_j + (1 − α)·mean_i |x_i|` (sum in f64) is kept across rounds, starting at 0.
//! Blocks whose values are all zero are not sent but still update. Ranking: c descending, ties
//! by block id ascending. [`assign_channels`] maps the ranking to channels (step 4) and
//! [`AdaptiveK`] computes k_t from the reported loss.

use crate::error::KernelError;

/// Number of elements per block for block size `block_bytes` and element size `elem_bytes`.
pub fn block_elems(block_bytes: usize, elem_bytes: usize) -> Result<usize, KernelError> {
    if elem_bytes == 0 || block_bytes < elem_bytes || block_bytes % elem_bytes != 0 {
        return Err(KernelError::InvalidConfig(format!(
            "block size {block_bytes} B is not a positive multiple of the element size {elem_bytes} B"
        )));
    }
    Ok(block_bytes / elem_bytes)
}

/// Element range of block `j` for `n` elements and `per` elements per block.
pub fn block_range(j: usize, per: usize, n: usize) -> std::ops::Range<usize> {
    let start = (j * per).min(n);
    start..((j + 1) * per).min(n)
}

/// Contribution state of one key.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockScores {
    alpha: f64,
    per_block: usize,
    n: usize,
    scores: Vec<f64>,
    nonzero: Vec<bool>,
}

impl BlockScores {
    /// State for a key of `n` elements cut into blocks of `per_block` elements, EMA factor `alpha`
    /// (default 0.3) in [0, 1].
    pub fn new(n: usize, per_block: usize, alpha: f64) -> Result<BlockScores, KernelError> {
        if per_block == 0 {
            return Err(KernelError::InvalidConfig("block of zero elements".into()));
        }
        if !(0.0..=1.0).contains(&alpha) {
            return Err(KernelError::InvalidConfig(format!(
                "alpha {alpha} not in [0, 1]"
            )));
        }
        let blocks = n.div_ceil(per_block);
        Ok(BlockScores {
            alpha,
            per_block,
            n,
            scores: vec![0.0; blocks],
            nonzero: vec![false; blocks],
        })
    }

    /// Number of blocks n_b.
    pub fn num_blocks(&self) -> usize {
        self.scores.len()
    }

    /// Elements per block.
    pub fn per_block(&self) -> usize {
        self.per_block
    }

    /// Current contributions c_j.
    pub fn scores(&self) -> &[f64] {
        &self.scores
    }

    /// Whether block j had a non-zero value in the last update (all-zero blocks are not sent).
    pub fn block_nonzero(&self) -> &[bool] {
        &self.nonzero
    }

    /// Updates every block's contribution from this round's values.
    pub fn update(&mut self, x: &[f32]) -> Result<(), KernelError> {
        crate::error::check_len(self.n, x.len())?;
        self.update_with(|r| {
            let mut sum = 0.0f64;
            let mut any = false;
            for &v in &x[r] {
                sum += f64::from(v.abs());
                any |= v != 0.0;
            }
            (sum, any)
        });
        Ok(())
    }

    /// Updates from FP16 bits (the values as they will be sent on a 16-bit tier).
    pub fn update_f16(&mut self, x: &[u16]) -> Result<(), KernelError> {
        crate::error::check_len(self.n, x.len())?;
        self.update_with(|r| {
            let mut sum = 0.0f64;
            let mut any = false;
            for &h in &x[r] {
                let v = crate::cast::f16_to_f32(h);
                sum += f64::from(v.abs());
                any |= v != 0.0;
            }
            (sum, any)
        });
        Ok(())
    }

    fn update_with(&mut self, mut block_sum: impl FnMut(std::ops::Range<usize>) -> (f64, bool)) {
        let a = self.alpha;
        for j in 0..self.scores.len() {
            let r = block_range(j, self.per_block, self.n);
            let len = r.len() as f64;
            let (sum, any) = block_sum(r);
            self.scores[j] = a * self.scores[j] + (1.0 - a) * (sum / len);
            self.nonzero[j] = any;
        }
    }

    /// Ids of the blocks to send (non-zero in the last update), ranked by contribution
    /// descending, ties by id ascending.
    pub fn ranked_sendable(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = (0..self.scores.len() as u32)
            .filter(|&j| self.nonzero[j as usize])
            .collect();
        ids.sort_by(|&a, &b| {
            self.scores[b as usize]
                .total_cmp(&self.scores[a as usize])
                .then(a.cmp(&b))
        });
        ids
    }
}

/// Marker in `channel_of_block` for a block that is not sent.
pub const NOT_SENT: u8 = 0xFF;

/// Channel of every block (step 4): the first n_rel = ⌈k_t·n⌉ ranked blocks go on the reliable
/// channel 0; unreliable rank q (0-based among the remaining n − n_rel) goes to channel
/// 1 + ⌊q·C/(n − n_rel)⌋. Blocks not in `ranked` get [`NOT_SENT`]. `ranked` holds block ids
/// below `num_blocks` (as from [`BlockScores::ranked_sendable`]); `channels` is C in 1..=7.
pub fn assign_channels(
    ranked: &[u32],
    num_blocks: usize,
    k_t: f64,
    channels: u8,
) -> Result<Vec<u8>, KernelError> {
    if !(1..=7).contains(&channels) {
        return Err(KernelError::InvalidConfig(format!(
            "unreliable channels {channels} not in 1..=7"
        )));
    }
    if !(0.0..=1.0).contains(&k_t) {
        return Err(KernelError::InvalidConfig(format!(
            "k_t {k_t} not in [0, 1]"
        )));
    }
    let mut out = vec![NOT_SENT; num_blocks];
    let n = ranked.len();
    let n_rel = ((k_t * n as f64).ceil() as usize).min(n);
    let n_unrel = n - n_rel;
    for (rank, &b) in ranked.iter().enumerate() {
        let slot = out.get_mut(b as usize).ok_or_else(|| {
            KernelError::InvalidConfig(format!("block {b} out of range ({num_blocks} blocks)"))
        })?;
        *slot = if rank < n_rel {
            0
        } else {
            let q = rank - n_rel;
            1 + (q * usize::from(channels) / n_unrel) as u8
        };
    }
    Ok(out)
}

/// Adaptive reliable share (the DGT repository): L_0 is the first reported loss (> 0);
/// k_t = min(1, max(k·L_t/L_0, k_min)).
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveK {
    k: f64,
    k_min: f64,
    l0: Option<f64>,
}

impl AdaptiveK {
    /// Starts with base share k (default 0.8) and floor k_min (default 0.2).
    pub fn new(k: f64, k_min: f64) -> Result<AdaptiveK, KernelError> {
        if !(0.0..=1.0).contains(&k) || !(0.0..=k).contains(&k_min) {
            return Err(KernelError::InvalidConfig(format!(
                "need 0 ≤ k_min ≤ k ≤ 1, got k = {k}, k_min = {k_min}"
            )));
        }
        Ok(AdaptiveK { k, k_min, l0: None })
    }

    /// Reports this round's training loss and returns k_t. Losses before the first positive,
    /// finite one (and any non-finite loss) leave k_t = k.
    pub fn update(&mut self, loss: f64) -> f64 {
        if !loss.is_finite() {
            return self.k;
        }
        match self.l0 {
            None if loss > 0.0 => {
                self.l0 = Some(loss);
                self.k.min(1.0)
            }
            None => self.k,
            Some(l0) => (self.k * loss / l0).max(self.k_min).min(1.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_and_mean_by_hand() {
        // 5 elements, 2 per block: blocks [0,2), [2,4), [4,5).
        let mut s = BlockScores::new(5, 2, 0.3).unwrap();
        s.update(&[1.0, -3.0, 0.0, 0.0, 4.0]).unwrap();
        assert_eq!(s.scores(), &[0.7 * 2.0, 0.0, 0.7 * 4.0]);
        assert_eq!(s.block_nonzero(), &[true, false, true]);
        s.update(&[0.0, 0.0, 2.0, 2.0, 0.0]).unwrap();
        let c = s.scores();
        assert!((c[0] - 0.3 * 1.4).abs() < 1e-15);
        assert!((c[1] - 0.7 * 2.0).abs() < 1e-15);
        assert!((c[2] - 0.3 * 2.8).abs() < 1e-15);
        // Blocks 0 and 2 are all zero now: only block 1 is sendable.
        assert_eq!(s.ranked_sendable(), vec![1]);
        assert_eq!(s.block_nonzero(), &[false, true, false]);
    }

    #[test]
    fn channels_follow_the_formula() {
        // 10 blocks, block 9 not sent; ranking 8, 7, …, 0; k = 0.5, C = 3.
        let ranked: Vec<u32> = (0..9).rev().collect();
        let ch = assign_channels(&ranked, 10, 0.5, 3).unwrap();
        // n = 9, n_rel = 5: ranks 0..5 reliable; unreliable q = 0..4 → 1 + ⌊3q/4⌋ = 1, 1, 2, 3.
        assert_eq!(ch, vec![3, 2, 1, 1, 0, 0, 0, 0, 0, NOT_SENT]);
        assert_eq!(assign_channels(&[], 3, 0.8, 3).unwrap(), vec![NOT_SENT; 3]);
        assert_eq!(assign_channels(&[1, 0], 2, 1.0, 1).unwrap(), vec![0, 0]);
        assert!(assign_channels(&[5], 2, 0.5, 3).is_err());
        assert!(assign_channels(&[0], 2, 0.5, 8).is_err());
    }

    #[test]
    fn adaptive_k_oracle() {
        // dgt.md oracle 9: k = 0.8, k_min = 0.2, losses [2, 1, 0.5, 0.1] → [0.8, 0.4, 0.2, 0.2].
        let mut a = AdaptiveK::new(0.8, 0.2).unwrap();
        let got: Vec<f64> = [2.0, 1.0, 0.5, 0.1].iter().map(|&l| a.update(l)).collect();
        assert_eq!(got, vec![0.8, 0.4, 0.2, 0.2]);
        let mut b = AdaptiveK::new(0.8, 0.2).unwrap();
        assert_eq!(b.update(0.0), 0.8);
        assert_eq!(b.update(f64::NAN), 0.8);
        assert_eq!(b.update(1.0), 0.8);
        assert_eq!(b.update(4.0), 1.0);
        assert!(AdaptiveK::new(0.5, 0.6).is_err());
    }

    #[test]
    fn ties_rank_by_id_and_f16_matches_f32() {
        let mut a = BlockScores::new(6, 2, 0.3).unwrap();
        let mut b = a.clone();
        let x = [1.0f32, 1.0, 0.5, 1.5, 2.0, 0.0];
        a.update(&x).unwrap();
        let h: Vec<u16> = x.iter().map(|&v| crate::cast::f32_to_f16(v)).collect();
        b.update_f16(&h).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.ranked_sendable(), vec![0, 1, 2]);
        assert!(BlockScores::new(6, 0, 0.3).is_err());
        assert!(a.update(&x[..5]).is_err());
        assert_eq!(block_elems(4096, 4).unwrap(), 1024);
        assert!(block_elems(4098, 4).is_err());
    }
}
