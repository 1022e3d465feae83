//! The job's keys as pieces of the model's tensors (scheduling.md, "P3 … Slices").
//!
//! Without P3 every tensor is one key. With P3 a tensor of n elements becomes ⌈n/S⌉ keys; slice
//! j covers `[j·S, min(n, (j+1)·S))`. A slice is a key on both tiers: its own version,
//! aggregation state and optimizer, so that the servers, the codecs and the placement need not
//! know about slicing at all. Only the worker (which computes on whole tensors) and the reports
//! (which hash whole tensors) map between the two.
//!
//! Every slice carries the layer of its tensor (layers numbered 0 next to the input, in forward
//! order; a layer's weight and bias share it) and the P3 priority −layer.

use std::ops::Range;

/// One key: which part of which tensor, and its layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySlice {
    /// The tensor (the model's key).
    pub tensor: usize,
    /// First element of the slice inside the tensor.
    pub offset: usize,
    /// Elements.
    pub len: usize,
    /// Layer of the tensor.
    pub layer: usize,
}

impl KeySlice {
    /// The slice's element range in its tensor.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// The job's keys and the tensors they cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMap {
    keys: Vec<KeySlice>,
    /// Keys of each tensor (consecutive).
    tensors: Vec<Range<usize>>,
    /// Keys of each layer, in key order.
    layers: Vec<Vec<usize>>,
    sliced: bool,
}

impl KeyMap {
    /// Every tensor one key (`layers[t]`: layer of tensor t).
    pub fn whole(lens: &[usize], layers: &[usize]) -> Self {
        Self::build(lens, layers, None)
    }

    /// Tensors cut into slices of at most `slice_elems` (≥ 1) elements; an empty tensor is one
    /// empty key.
    pub fn sliced(lens: &[usize], layers: &[usize], slice_elems: usize) -> Self {
        Self::build(lens, layers, Some(slice_elems.max(1)))
    }

    fn build(lens: &[usize], layers: &[usize], slice: Option<usize>) -> Self {
        let mut keys = Vec::new();
        let mut tensors = Vec::with_capacity(lens.len());
        for (t, &n) in lens.iter().enumerate() {
            let layer = layers.get(t).copied().unwrap_or(t);
            let first = keys.len();
            let s = slice.unwrap_or(n).max(1);
            let count = n.div_ceil(s).max(1);
            for j in 0..count {
                let offset = j * s;
                keys.push(KeySlice {
                    tensor: t,
                    offset,
                    len: s.min(n - offset.min(n)),
                    layer,
                });
            }
            tensors.push(first..keys.len());
        }
        let n_layers = keys.iter().map(|k| k.layer + 1).max().unwrap_or(0);
        let mut by_layer = vec![Vec::new(); n_layers];
        for (k, s) in keys.iter().enumerate() {
            by_layer[s.layer].push(k);
        }
        Self {
            keys,
            tensors,
            layers: by_layer,
            sliced: slice.is_some(),
        }
    }

    /// True when P3 cut the tensors (even if every tensor fits one slice).
    pub fn is_sliced(&self) -> bool {
        self.sliced
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True without keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Element count of every key, in key order (the plan's key lengths).
    pub fn key_lens(&self) -> Vec<usize> {
        self.keys.iter().map(|k| k.len).collect()
    }

    /// Key `k` (`None` outside).
    pub fn key(&self, k: usize) -> Option<&KeySlice> {
        self.keys.get(k)
    }

    /// The keys of tensor `t` (empty outside).
    pub fn keys_of(&self, t: usize) -> Range<usize> {
        self.tensors.get(t).cloned().unwrap_or(0..0)
    }

    /// Number of tensors.
    pub fn tensors(&self) -> usize {
        self.tensors.len()
    }

    /// Number of layers.
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// The keys of layer `l`, in key order (empty outside).
    pub fn layer_keys(&self, l: usize) -> &[usize] {
        self.layers.get(l).map_or(&[], Vec::as_slice)
    }

    /// P3 priority of key `k`: −layer (the layer next to the input is the most urgent).
    pub fn priority(&self, k: usize) -> i64 {
        self.keys.get(k).map_or(i64::MIN, |s| -(s.layer as i64))
    }

    /// Key `k`'s part of `tensors` (one vector per tensor), if both exist and fit.
    pub fn part_mut<'a>(&self, tensors: &'a mut [Vec<f32>], k: usize) -> Option<&'a mut [f32]> {
        let s = self.keys.get(k)?;
        tensors.get_mut(s.tensor)?.get_mut(s.range())
    }

    /// Key `k`'s part of `tensor` (tensor `self.key(k).tensor`'s values), if it fits.
    pub fn part<'a>(&self, tensor: &'a [f32], k: usize) -> Option<&'a [f32]> {
        tensor.get(self.keys.get(k)?.range())
    }

    /// Per-key vectors from per-tensor ones (parts that do not fit are left empty).
    pub fn split(&self, tensors: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
        if !self.sliced {
            return tensors;
        }
        self.keys
            .iter()
            .map(|s| {
                tensors
                    .get(s.tensor)
                    .and_then(|t| t.get(s.range()))
                    .map_or_else(Vec::new, <[f32]>::to_vec)
            })
            .collect()
    }

    /// Per-tensor vectors from per-key ones (in key order, as [`KeyMap::split`] gives them).
    pub fn assemble(&self, keys: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
        if !self.sliced {
            return keys;
        }
        let mut out: Vec<Vec<f32>> = self
            .tensors
            .iter()
            .map(|r| Vec::with_capacity(self.keys[r.clone()].iter().map(|s| s.len).sum()))
            .collect();
        for (s, v) in self.keys.iter().zip(keys) {
            out[s.tensor].extend_from_slice(&v);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_counts_follow_the_spec() {
        // Oracle 3: sizes 1, S − 1, S, S + 1, 3S give 1, 1, 1, 2, 3 slices.
        let s = 1000;
        let lens = [1, s - 1, s, s + 1, 3 * s];
        let m = KeyMap::sliced(&lens, &[0, 1, 2, 3, 4], s);
        let counts: Vec<usize> = (0..lens.len()).map(|t| m.keys_of(t).len()).collect();
        assert_eq!(counts, [1, 1, 1, 2, 3]);
        let last = m.keys_of(3);
        assert_eq!(
            m.key(last.start + 1).map(|k| (k.offset, k.len)),
            Some((s, 1))
        );
        assert_eq!(
            m.key_lens().iter().sum::<usize>(),
            lens.iter().sum::<usize>()
        );
    }

    #[test]
    fn split_and_assemble_are_inverse() {
        let lens = [7, 0, 3, 12];
        let m = KeyMap::sliced(&lens, &[0, 0, 1, 1], 5);
        let tensors: Vec<Vec<f32>> = lens
            .iter()
            .enumerate()
            .map(|(t, &n)| (0..n).map(|i| (t * 100 + i) as f32).collect())
            .collect();
        let keys = m.split(tensors.clone());
        assert_eq!(keys.len(), 2 + 1 + 1 + 3);
        assert_eq!(m.assemble(keys), tensors);
        let mut t2 = tensors.clone();
        let k = m.keys_of(3).start + 2;
        m.part_mut(&mut t2, k).unwrap().fill(-1.0);
        assert_eq!(&t2[3][10..], &[-1.0, -1.0]);
        assert_eq!(m.part(&tensors[3], k), Some(&tensors[3][10..12]));
        assert!(m.part_mut(&mut t2, 99).is_none());
    }

    #[test]
    fn layers_group_keys_and_order_priorities() {
        let m = KeyMap::sliced(&[4, 2, 9, 3], &[0, 0, 1, 1], 4);
        assert_eq!(m.layers(), 2);
        assert_eq!(m.layer_keys(0), &[0, 1]);
        assert_eq!(m.layer_keys(1), &[2, 3, 4, 5]);
        assert!(m.priority(0) > m.priority(5));
        assert!(m.layer_keys(7).is_empty());
        let w = KeyMap::whole(&[4, 2, 9, 3], &[0, 0, 1, 1]);
        assert!(!w.is_sliced());
        assert_eq!(w.key_lens(), [4, 2, 9, 3]);
    }
}
