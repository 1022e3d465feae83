//! Input normalisation and augmentation with torchvision's customary settings, as pure functions on
//! row-major `f32` feature buffers.
//!
//! Pixel values in this crate are already scaled to [0, 1] (the equivalent of torchvision's
//! `ToTensor`), and every image row is channel-major (C × H × W): CIFAR-10 rows are 3 × 32 × 32,
//! IDX (MNIST-like) rows are 1 × side × side.
//!
//! The customary torchvision training pipeline for CIFAR-10 is
//! `RandomCrop(32, padding=4)`, `RandomHorizontalFlip()`, `ToTensor()`, `Normalize(mean, std)`:
//! the crop pads with 0 *before* normalisation. [`Augment::apply`] therefore takes the per-channel
//! `fill` value explicitly: pass `[0.0; C]` when augmenting un-normalised pixels, or
//! [`Normalize::normalized_zero`] when the rows have already been normalised; both give the same
//! result up to rounding.
//!
//! Augmentation is deterministic: the crop and flip of row `i` of a batch depend only on the
//! [`Augment`] seed, the caller's `stream` number for the batch and `i`, never on threads or timing.

use super::rng;
use super::{DataError, Dataset};

/// Per-channel mean of the CIFAR-10 training set (RGB, pixels in [0, 1]), as used with
/// torchvision's `transforms.Normalize` in the widely copied kuangliu/pytorch-cifar training script
/// and the PyTorch CIFAR-10 examples.
pub const CIFAR10_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
/// Per-channel standard deviation of the CIFAR-10 training set (RGB, pixels in [0, 1]): the
/// per-pixel figures (population standard deviation over all training pixels of each channel), the
/// companion of [`CIFAR10_MEAN`] in torchvision-style CIFAR-10 pipelines.
pub const CIFAR10_STD: [f32; 3] = [0.2470, 0.2435, 0.2616];
/// Mean of the MNIST training set (pixels in [0, 1]), as in the official PyTorch MNIST example
/// (`transforms.Normalize((0.1307,), (0.3081,))`).
pub const MNIST_MEAN: [f32; 1] = [0.1307];
/// Standard deviation of the MNIST training set (pixels in [0, 1]), as in the official PyTorch
/// MNIST example.
pub const MNIST_STD: [f32; 1] = [0.3081];

/// Largest crop padding [`Augment::apply`] accepts (far beyond any useful value; it keeps the
/// offset arithmetic exact and the offset draw unbiased).
pub const MAX_PAD: usize = 1 << 16;

/// Per-channel normalisation `(x - mean[c]) / std[c]`, like torchvision's `transforms.Normalize`.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalize {
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl Normalize {
    /// A normaliser with one `mean` and one `std` per channel. Fails unless both have the same
    /// nonzero length, every mean is finite and every standard deviation is finite and > 0.
    pub fn new(mean: &[f32], std: &[f32]) -> Result<Self, DataError> {
        if mean.is_empty() || mean.len() != std.len() {
            return Err(DataError::Shape(format!(
                "normalisation needs as many means as standard deviations, at least one: \
                 got {} and {}",
                mean.len(),
                std.len()
            )));
        }
        if let Some(c) = mean.iter().position(|m| !m.is_finite()) {
            return Err(DataError::Shape(format!(
                "normalisation mean of channel {c} is not finite ({})",
                mean[c]
            )));
        }
        if let Some(c) = std.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(DataError::Shape(format!(
                "normalisation standard deviation of channel {c} must be finite and > 0, got {}",
                std[c]
            )));
        }
        Ok(Self {
            mean: mean.to_vec(),
            std: std.to_vec(),
        })
    }

    /// The CIFAR-10 normaliser ([`CIFAR10_MEAN`], [`CIFAR10_STD`]).
    pub fn cifar10() -> Self {
        Self {
            mean: CIFAR10_MEAN.to_vec(),
            std: CIFAR10_STD.to_vec(),
        }
    }

    /// The MNIST normaliser ([`MNIST_MEAN`], [`MNIST_STD`]), for single-channel IDX images.
    pub fn mnist() -> Self {
        Self {
            mean: MNIST_MEAN.to_vec(),
            std: MNIST_STD.to_vec(),
        }
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.mean.len()
    }

    /// Per-channel means.
    pub fn mean(&self) -> &[f32] {
        &self.mean
    }

    /// Per-channel standard deviations.
    pub fn std(&self) -> &[f32] {
        &self.std
    }

    /// What a pixel value of 0 becomes per channel, `-mean[c] / std[c]`: the `fill` to give
    /// [`Augment::apply`] when it runs on already normalised rows.
    pub fn normalized_zero(&self) -> Vec<f32> {
        self.mean
            .iter()
            .zip(&self.std)
            .map(|(m, s)| (0.0 - m) / s)
            .collect()
    }

    /// Normalises `features` in place. Each row of `row_len` floats is channel-major with
    /// `row_len / channels` values per channel; value `x` of channel `c` becomes
    /// `(x - mean[c]) / std[c]`. Fails, leaving `features` untouched, when `row_len` is 0 or not a
    /// multiple of the channel count, or `features.len()` is not a multiple of `row_len`.
    pub fn apply(&self, features: &mut [f32], row_len: usize) -> Result<(), DataError> {
        let channels = self.channels();
        if row_len == 0 || row_len % channels != 0 {
            return Err(DataError::Shape(format!(
                "row length {row_len} is not a positive multiple of {channels} channels"
            )));
        }
        if features.len() % row_len != 0 {
            return Err(DataError::Shape(format!(
                "{} feature values are not a whole number of {row_len}-value rows",
                features.len()
            )));
        }
        let plane = row_len / channels;
        for row in features.chunks_exact_mut(row_len) {
            for ((values, &m), &s) in row.chunks_exact_mut(plane).zip(&self.mean).zip(&self.std) {
                for v in values {
                    *v = (*v - m) / s;
                }
            }
        }
        Ok(())
    }
}

/// Training augmentation as torchvision's `RandomCrop(side, padding=pad)` (constant fill) followed
/// by `RandomHorizontalFlip(p=0.5)`, for square channel-major images.
///
/// The crop offsets `dx`, `dy` are independent and uniform in `[-pad, pad]`; the output pixel
/// `(y, x)` is the input pixel `(y + dy, x + dx)`, or the channel's fill where that lies outside the
/// image. The cropped row is then mirrored left–right with probability 1/2 (when flipping is on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Augment {
    seed: u64,
    pad: usize,
    flip: bool,
}

impl Augment {
    /// An augmenter with the given seed, crop padding (0 disables cropping) and whether to flip.
    pub fn new(seed: u64, pad: usize, flip: bool) -> Self {
        Self { seed, pad, flip }
    }

    /// The customary CIFAR-10 augmentation: padding 4 and random horizontal flips.
    pub fn cifar10(seed: u64) -> Self {
        Self::new(seed, 4, true)
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The crop padding.
    pub fn pad(&self) -> usize {
        self.pad
    }

    /// Whether random horizontal flips are on.
    pub fn flip(&self) -> bool {
        self.flip
    }

    /// The crop offsets and flip of row `row` of the batch numbered `stream`.
    fn draw(&self, stream: u64, row: u64) -> (i32, i32, bool) {
        let mut r = rng::rng_for(self.seed, &[0x4155_474d, stream, row]);
        // `apply` has checked pad <= MAX_PAD, so these conversions are exact.
        let span = 2 * self.pad + 1;
        let pad = self.pad as i32;
        let dy = rng::below(&mut r, span) as i32 - pad;
        let dx = rng::below(&mut r, span) as i32 - pad;
        let flip = self.flip && rng::below(&mut r, 2) == 1;
        (dx, dy, flip)
    }

    /// Augments every row of `features` in place. Rows are `channels × side × side` channel-major
    /// images; `fill` holds one padding value per channel (`[0.0; C]` for un-normalised pixels, as
    /// torchvision pads before `Normalize`, or [`Normalize::normalized_zero`] for normalised rows).
    ///
    /// `stream` identifies the batch (e.g. `epoch << 32 | position`): the same seed, stream and row
    /// index always give the same crop and flip. Fails, leaving `features` untouched, when
    /// `channels` or `side` is 0, `fill.len() != channels`, `features.len()` is not a multiple of the
    /// row length, or the padding exceeds [`MAX_PAD`].
    pub fn apply(
        &self,
        features: &mut [f32],
        channels: usize,
        side: usize,
        fill: &[f32],
        stream: u64,
    ) -> Result<(), DataError> {
        let row_len = check_image(channels, side, fill)?;
        if features.len() % row_len != 0 {
            return Err(DataError::Shape(format!(
                "{} feature values are not a whole number of {channels}×{side}×{side} images",
                features.len()
            )));
        }
        if self.pad > MAX_PAD {
            return Err(DataError::Shape(format!(
                "crop padding {} exceeds the maximum {MAX_PAD}",
                self.pad
            )));
        }
        if self.pad == 0 && !self.flip {
            return Ok(());
        }
        let mut scratch = vec![0.0f32; row_len];
        for (i, row) in features.chunks_exact_mut(row_len).enumerate() {
            let (dx, dy, flip) = self.draw(stream, i as u64);
            if dx == 0 && dy == 0 && !flip {
                continue;
            }
            scratch.copy_from_slice(row);
            crop_flip_row(&scratch, row, channels, side, dx, dy, flip, fill)?;
        }
        Ok(())
    }
}

/// The augmentation of one worker's training batches: an [`Augment`] with the image geometry
/// and padding value of its data set.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageAugment {
    augment: Augment,
    channels: usize,
    side: usize,
    fill: Vec<f32>,
}

impl ImageAugment {
    /// `augment` on rows of `channels × side × side` pixels, padding with `fill` (one value per
    /// channel). Fails when the geometry and the fill disagree.
    pub fn new(
        augment: Augment,
        channels: usize,
        side: usize,
        fill: Vec<f32>,
    ) -> Result<ImageAugment, DataError> {
        check_image(channels, side, &fill)?;
        Ok(ImageAugment {
            augment,
            channels,
            side,
            fill,
        })
    }

    /// Augments the rows of `batch` in place; `stream` identifies the batch (see
    /// [`Augment::apply`]).
    pub fn apply(&self, batch: &mut Dataset, stream: u64) -> Result<(), DataError> {
        self.augment.apply(
            batch.features_mut(),
            self.channels,
            self.side,
            &self.fill,
            stream,
        )
    }
}

/// Checks an image geometry and fill, returning the row length `channels × side × side`.
fn check_image(channels: usize, side: usize, fill: &[f32]) -> Result<usize, DataError> {
    if channels == 0 || side == 0 {
        return Err(DataError::Shape(format!(
            "images need at least one channel and one pixel: got {channels} channels of side {side}"
        )));
    }
    if fill.len() != channels {
        return Err(DataError::Shape(format!(
            "{} fill values for {channels} channels",
            fill.len()
        )));
    }
    side.checked_mul(side)
        .and_then(|p| p.checked_mul(channels))
        .ok_or_else(|| {
            DataError::Shape(format!(
                "{channels}×{side}×{side} images are too large to address"
            ))
        })
}

/// Writes into `dst` the crop of the channel-major image `src` (`channels × side × side`) at
/// offset (`dx`, `dy`) — output pixel `(y, x)` is input pixel `(y + dy, x + dx)`, or `fill[c]`
/// outside the image — mirrored left–right when `flip` is set. Fails when `src`, `dst` or `fill`
/// do not match the geometry.
#[allow(clippy::too_many_arguments)]
pub(crate) fn crop_flip_row(
    src: &[f32],
    dst: &mut [f32],
    channels: usize,
    side: usize,
    dx: i32,
    dy: i32,
    flip: bool,
    fill: &[f32],
) -> Result<(), DataError> {
    let row_len = check_image(channels, side, fill)?;
    if src.len() != row_len || dst.len() != row_len {
        return Err(DataError::Shape(format!(
            "crop of {channels}×{side}×{side} images ({row_len} values) got source of {} and \
             destination of {} values",
            src.len(),
            dst.len()
        )));
    }
    let n = side as i64;
    let (dx, dy) = (i64::from(dx), i64::from(dy));
    // Output columns whose source column x + dx lies inside the image.
    let x0 = (-dx).clamp(0, n) as usize;
    let x1 = (n - dx).clamp(0, n) as usize;
    let plane = side * side;
    for ((src_c, dst_c), &f) in src
        .chunks_exact(plane)
        .zip(dst.chunks_exact_mut(plane))
        .zip(fill)
    {
        for (y, out) in dst_c.chunks_exact_mut(side).enumerate() {
            let sy = y as i64 + dy;
            if !(0..n).contains(&sy) || x0 >= x1 {
                out.fill(f);
                continue;
            }
            let start = sy as usize * side;
            let sx0 = (x0 as i64 + dx) as usize;
            out[..x0].fill(f);
            out[x0..x1].copy_from_slice(&src_c[start + sx0..start + sx0 + (x1 - x0)]);
            out[x1..].fill(f);
            if flip {
                out.reverse();
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_rows(rows: usize, row_len: usize, seed: u64) -> Vec<f32> {
        let mut r = rng::rng_for(seed, &[0x7e57]);
        (0..rows * row_len)
            .map(|_| rng::unit_f64(&mut r) as f32)
            .collect()
    }

    /// Independent reference: builds the padded image explicitly, slices it, then mirrors it.
    #[allow(clippy::too_many_arguments)]
    fn naive_crop_flip(
        src: &[f32],
        channels: usize,
        side: usize,
        pad: usize,
        dx: i32,
        dy: i32,
        flip: bool,
        fill: &[f32],
    ) -> Vec<f32> {
        let big = side + 2 * pad;
        let mut out = Vec::with_capacity(src.len());
        for c in 0..channels {
            let mut padded = vec![vec![fill[c]; big]; big];
            for y in 0..side {
                for x in 0..side {
                    padded[y + pad][x + pad] = src[c * side * side + y * side + x];
                }
            }
            let top = (pad as i32 + dy) as usize;
            let left = (pad as i32 + dx) as usize;
            for y in 0..side {
                let mut line: Vec<f32> = padded[top + y][left..left + side].to_vec();
                if flip {
                    line.reverse();
                }
                out.extend(line);
            }
        }
        out
    }

    #[test]
    fn normalize_matches_hand_computed_values() {
        // Two rows of 3 channels × 2 values.
        let mut f = vec![
            0.0, 1.0, 0.5, 0.25, 0.4914, 0.75, //
            1.0, 0.0, 0.4822, 0.1, 0.3, 0.4465,
        ];
        Normalize::cifar10().apply(&mut f, 6).unwrap();
        // (x - mean) / std worked out by hand (rounded to 7 decimals).
        let want = [
            -1.989_473_7,
            2.059_109_3,
            0.073_100_6,
            -0.953_593_4,
            0.171_636_1,
            1.160_168_2,
            2.059_109_3,
            -1.989_473_7,
            0.0,
            -1.569_609_9,
            -0.560_015_3,
            0.0,
        ];
        for (i, (g, w)) in f.iter().zip(want).enumerate() {
            assert!((g - w).abs() < 1e-6, "value {i}: got {g}, want {w}");
        }

        let mut m = vec![0.0, 1.0, 0.1307, 0.5];
        Normalize::mnist().apply(&mut m, 2).unwrap();
        let want = [-0.424_212_9, 2.821_486_5, 0.0, 1.198_636_8];
        for (g, w) in m.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "got {g}, want {w}");
        }

        let n = Normalize::new(&[0.5, 0.25], &[0.5, 2.0]).unwrap();
        let mut v = vec![1.0, 0.0, 0.25, 4.25];
        n.apply(&mut v, 4).unwrap();
        assert_eq!(v, [1.0, -1.0, 0.0, 2.0]);
        let z = Normalize::cifar10().normalized_zero();
        for (g, w) in z.iter().zip([-1.989_473_7, -1.980_287_5, -1.706_804_3]) {
            assert!((g - w).abs() < 1e-6, "got {g}, want {w}");
        }
        let mut empty: Vec<f32> = vec![];
        assert!(Normalize::mnist().apply(&mut empty, 784).is_ok());
    }

    #[test]
    fn normalize_rejects_bad_parameters_and_lengths() {
        let shape = |r: Result<Normalize, DataError>| matches!(r, Err(DataError::Shape(_)));
        assert!(shape(Normalize::new(&[], &[])));
        assert!(shape(Normalize::new(&[0.5, 0.5], &[0.2])));
        assert!(shape(Normalize::new(&[0.5], &[0.0])));
        assert!(shape(Normalize::new(&[0.5], &[-0.1])));
        assert!(shape(Normalize::new(&[0.5], &[f32::NAN])));
        assert!(shape(Normalize::new(&[0.5], &[f32::INFINITY])));
        assert!(shape(Normalize::new(&[f32::NAN], &[1.0])));
        assert!(Normalize::new(&[0.5], &[1e-3]).is_ok());

        let n = Normalize::cifar10();
        let orig: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let mut f = orig.clone();
        for row_len in [0, 4, 5, 9] {
            assert!(
                matches!(n.apply(&mut f, row_len), Err(DataError::Shape(_))),
                "row_len {row_len}"
            );
        }
        let mut g = orig[..9].to_vec();
        assert!(matches!(n.apply(&mut g, 6), Err(DataError::Shape(_))));
        assert_eq!(f, orig, "a failed apply must not modify the buffer");
    }

    #[test]
    fn crop_flip_row_matches_naive_padded_reference() {
        let (channels, side, pad) = (3, 32, 4);
        let src = random_rows(1, channels * side * side, 1);
        let fill = [-0.5, 0.0, 2.0];
        let mut dst = vec![f32::NAN; src.len()];
        let cases = [
            (0, 0),
            (-4, -4),
            (4, 4),
            (-4, 4),
            (4, -4),
            (1, -3),
            (-2, 0),
            (0, 3),
            (3, 1),
        ];
        for (dx, dy) in cases {
            for flip in [false, true] {
                crop_flip_row(&src, &mut dst, channels, side, dx, dy, flip, &fill).unwrap();
                let want = naive_crop_flip(&src, channels, side, pad, dx, dy, flip, &fill);
                assert_eq!(dst, want, "dx {dx}, dy {dy}, flip {flip}");
            }
        }
        // A small image with offsets beyond its side is all fill.
        let small = [1.0, 2.0, 3.0, 4.0];
        let mut out = [0.0; 4];
        crop_flip_row(&small, &mut out, 1, 2, 3, 0, false, &[9.0]).unwrap();
        assert_eq!(out, [9.0; 4]);
        crop_flip_row(&small, &mut out, 1, 2, 0, 0, true, &[9.0]).unwrap();
        assert_eq!(out, [2.0, 1.0, 4.0, 3.0]);
        crop_flip_row(&small, &mut out, 1, 2, 1, -1, false, &[9.0]).unwrap();
        assert_eq!(out, [9.0, 9.0, 2.0, 9.0]);
        assert!(crop_flip_row(&small, &mut out, 1, 2, 0, 0, false, &[]).is_err());
        assert!(crop_flip_row(&small[..3], &mut out, 1, 2, 0, 0, false, &[0.0]).is_err());
    }

    #[test]
    fn augment_is_deterministic_per_seed_and_stream() {
        let row_len = 3 * 32 * 32;
        let rows = random_rows(16, row_len, 2);
        let fill = [0.0; 3];
        let run = |aug: Augment, stream: u64| {
            let mut f = rows.clone();
            aug.apply(&mut f, 3, 32, &fill, stream).unwrap();
            f
        };
        let a = run(Augment::cifar10(11), 5);
        assert_eq!(a, run(Augment::cifar10(11), 5));
        assert_ne!(a, rows);
        assert_ne!(a, run(Augment::cifar10(11), 6));
        assert_ne!(a, run(Augment::cifar10(12), 5));
        // Each row is one of the 162 crop/flip variants of its input, the one `draw` names.
        let aug = Augment::cifar10(11);
        let mut want = vec![0.0; row_len];
        for (i, (src, got)) in rows
            .chunks_exact(row_len)
            .zip(a.chunks_exact(row_len))
            .enumerate()
        {
            let (dx, dy, flip) = aug.draw(5, i as u64);
            crop_flip_row(src, &mut want, 3, 32, dx, dy, flip, &fill).unwrap();
            assert_eq!(got, &want[..], "row {i}");
        }
    }

    #[test]
    fn augment_offsets_and_flips_are_uniform() {
        // Distinct positive pixel values let the crop and flip be read back from the output.
        let (side, pad, n_rows) = (12usize, 4i32, 2000usize);
        let plane = side * side;
        let one: Vec<f32> = (0..2 * plane).map(|v| (v + 1) as f32).collect();
        let mut f: Vec<f32> = one
            .iter()
            .cycle()
            .take(n_rows * 2 * plane)
            .copied()
            .collect();
        let fill = [-1.0, -2.0];
        Augment::cifar10(3)
            .apply(&mut f, 2, side, &fill, 77)
            .unwrap();

        let mut seen = [[0usize; 9]; 9];
        let mut flips = 0usize;
        let mut check = vec![0.0; 2 * plane];
        for row in f.chunks_exact(2 * plane) {
            // Output line 6 always comes from an image line since |dy| <= 4 < 6.
            let y = 6;
            let line = &row[y * side..(y + 1) * side];
            let xs: Vec<usize> = (0..side).filter(|&x| line[x] > 0.0).collect();
            assert!(xs.len() >= side - pad as usize, "{line:?}");
            let x = xs[0];
            let flip = line[xs[1]] < line[x];
            let v = line[x] as usize - 1;
            let (sy, sx) = ((v / side) as i32, (v % side) as i32);
            let dy = sy - y as i32;
            let dx = if flip {
                sx - (side - 1 - x) as i32
            } else {
                sx - x as i32
            };
            assert!(dx.abs() <= pad && dy.abs() <= pad, "dx {dx}, dy {dy}");
            crop_flip_row(&one, &mut check, 2, side, dx, dy, flip, &fill).unwrap();
            assert_eq!(row, &check[..], "dx {dx}, dy {dy}, flip {flip}");
            seen[(dy + pad) as usize][(dx + pad) as usize] += 1;
            flips += usize::from(flip);
        }
        let frac = flips as f64 / n_rows as f64;
        assert!((frac - 0.5).abs() <= 0.05, "flipped fraction {frac}");
        assert!(
            seen.iter().flatten().all(|&c| c > 0),
            "offset counts {seen:?}"
        );
    }

    #[test]
    fn augment_without_pad_or_flip_is_identity() {
        let rows = random_rows(8, 3 * 32 * 32, 4);
        let mut f = rows.clone();
        Augment::new(9, 0, false)
            .apply(&mut f, 3, 32, &[0.0; 3], 1)
            .unwrap();
        assert_eq!(f, rows);
        // Pad 0 with flips only mirrors rows.
        let mut g = rows.clone();
        Augment::new(9, 0, true)
            .apply(&mut g, 3, 32, &[0.0; 3], 1)
            .unwrap();
        assert_ne!(g, rows);
        for (src, got) in rows.chunks_exact(32).zip(g.chunks_exact(32)) {
            let rev: Vec<f32> = src.iter().rev().copied().collect();
            assert!(got == src || got == &rev[..]);
        }
    }

    #[test]
    fn augment_rejects_bad_shapes() {
        let orig = random_rows(2, 3 * 4 * 4, 5);
        let mut f = orig.clone();
        let aug = Augment::cifar10(1);
        let bad = |r: Result<(), DataError>| matches!(r, Err(DataError::Shape(_)));
        assert!(bad(aug.apply(&mut f, 3, 4, &[0.0; 2], 0)));
        assert!(bad(aug.apply(&mut f, 0, 4, &[], 0)));
        assert!(bad(aug.apply(&mut f, 3, 0, &[0.0; 3], 0)));
        assert!(bad(aug.apply(&mut f, 3, 5, &[0.0; 3], 0)));
        assert!(bad(aug.apply(&mut f[..47], 3, 4, &[0.0; 3], 0)));
        assert!(bad(aug.apply(&mut f, 1, usize::MAX, &[0.0], 0)));
        assert!(bad(
            Augment::new(1, MAX_PAD + 1, true).apply(&mut f, 3, 4, &[0.0; 3], 0)
        ));
        assert_eq!(f, orig, "a failed apply must not modify the buffer");
        assert!(aug.apply(&mut [], 3, 4, &[0.0; 3], 0).is_ok());
    }
}
