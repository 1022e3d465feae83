//! MNIST-format IDX files: `u8` image tensors (magic `0x00000803`) and `u8` label vectors
//! (`0x00000801`), big-endian dimensions, optionally gzip-compressed (detected by the gzip magic).
//!
//! Errors are typed ([`IdxError`]) and wrapped in [`DataError::Idx`] with the file's path.

use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use super::{DataError, Dataset};

/// Type code of unsigned bytes in the IDX magic.
const TYPE_U8: u8 = 0x08;

/// What is wrong with one IDX file.
#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    /// The file could not be read (or its gzip stream is corrupt).
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    /// Fewer than 4 header bytes, or the first two magic bytes are not zero.
    #[error("not an IDX file (bad magic {0:02x?})")]
    BadMagic(Vec<u8>),
    /// The element type is not `u8` (0x08).
    #[error("element type 0x{0:02x} is not u8 (0x08)")]
    ElementType(u8),
    /// The number of dimensions is not what the caller expects.
    #[error("{found} dimensions, expected {expected}")]
    Dimensions {
        /// Dimensions in the header.
        found: u8,
        /// Dimensions expected (3 for images, 1 for labels).
        expected: u8,
    },
    /// The payload is shorter or longer than the dimensions say.
    #[error("payload has {found} bytes, dimensions say {expected}")]
    Length {
        /// Bytes present after the header.
        found: usize,
        /// Bytes the dimensions require.
        expected: usize,
    },
    /// A dimension is zero or their product overflows.
    #[error("invalid dimensions {0:?}")]
    BadDims(Vec<u32>),
}

/// A decoded IDX tensor of `u8`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxU8 {
    /// Dimensions, outermost first.
    pub dims: Vec<u32>,
    /// Elements in row-major order.
    pub data: Vec<u8>,
}

/// The first two bytes of a gzip stream.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Payload bytes reserved before any are read: a header's claim alone never allocates more.
const INITIAL_PAYLOAD_CAPACITY: usize = 1 << 20;

/// Decodes an IDX `u8` tensor with `expected_dims` dimensions from bytes (gzip or raw).
///
/// A gzip stream is decompressed as it is read: the header first, then exactly the payload its
/// dimensions ask for. Memory follows what the file holds, never what its header claims, and a
/// stream longer than its dimensions say is counted, not kept.
pub fn decode_u8(bytes: &[u8], expected_dims: u8) -> Result<IdxU8, IdxError> {
    if bytes.starts_with(&GZIP_MAGIC) {
        read_u8(GzDecoder::new(bytes), expected_dims)
    } else {
        read_u8(bytes, expected_dims)
    }
}

/// Reads into `buf` until it is full or the stream ends; returns how many bytes it holds.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// [`decode_u8`] of an uncompressed stream.
fn read_u8(mut r: impl Read, expected_dims: u8) -> Result<IdxU8, IdxError> {
    let mut magic = [0u8; 4];
    let n = read_up_to(&mut r, &mut magic)?;
    if n < 4 || magic[0] != 0 || magic[1] != 0 {
        return Err(IdxError::BadMagic(magic[..n].to_vec()));
    }
    if magic[2] != TYPE_U8 {
        return Err(IdxError::ElementType(magic[2]));
    }
    if magic[3] != expected_dims {
        return Err(IdxError::Dimensions {
            found: magic[3],
            expected: expected_dims,
        });
    }
    let mut header = vec![0u8; 4 * expected_dims as usize];
    let n = read_up_to(&mut r, &mut header)?;
    if n < header.len() {
        return Err(IdxError::Length {
            found: n,
            expected: header.len(),
        });
    }
    let dims: Vec<u32> = header
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| {
            if d == 0 {
                None
            } else {
                acc.checked_mul(d as usize)
            }
        })
        .ok_or_else(|| IdxError::BadDims(dims.clone()))?;
    let mut data = Vec::with_capacity(expected.min(INITIAL_PAYLOAD_CAPACITY));
    // One byte more than the payload tells a longer stream from an exact one.
    let limit = u64::try_from(expected)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    (&mut r).take(limit).read_to_end(&mut data)?;
    if data.len() != expected {
        let rest = std::io::copy(&mut r, &mut std::io::sink())?;
        return Err(IdxError::Length {
            found: data
                .len()
                .saturating_add(usize::try_from(rest).unwrap_or(usize::MAX)),
            expected,
        });
    }
    Ok(IdxU8 { dims, data })
}

fn read_file(path: &Path, expected_dims: u8) -> Result<IdxU8, DataError> {
    let wrap = |source: IdxError| DataError::Idx {
        path: path.to_path_buf(),
        source,
    };
    let bytes = std::fs::read(path).map_err(|e| wrap(e.into()))?;
    decode_u8(&bytes, expected_dims).map_err(wrap)
}

/// Loads an images file (3 dimensions: count × rows × cols) and a labels file (1 dimension) as a
/// data set with pixels scaled to [0, 1] and labels checked against `classes`.
pub fn load_pair(images: &Path, labels: &Path, classes: usize) -> Result<Dataset, DataError> {
    let img = read_file(images, 3)?;
    let lab = read_file(labels, 1)?;
    let pair_err = |reason: String| DataError::IdxPair {
        images: PathBuf::from(images),
        labels: PathBuf::from(labels),
        reason,
    };
    if img.dims[0] != lab.dims[0] {
        return Err(pair_err(format!(
            "{} images but {} labels",
            img.dims[0], lab.dims[0]
        )));
    }
    if let Some((i, &l)) = lab
        .data
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= classes)
    {
        return Err(pair_err(format!(
            "label {l} of sample {i} is not below classes = {classes}"
        )));
    }
    let n_features = img.dims[1] as usize * img.dims[2] as usize;
    let features = img.data.iter().map(|&p| f32::from(p) / 255.0).collect();
    let labels = lab.data.iter().map(|&l| u32::from(l)).collect();
    Dataset::new(features, labels, n_features, classes)
}

/// Encodes an IDX `u8` tensor (used by tests and tools that write small IDX files).
pub fn encode_u8(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, TYPE_U8, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::{write::GzEncoder, Compression};

    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("geomx-idx-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn loads_raw_and_gzip_pairs() {
        let dir = temp_dir("ok");
        let pixels: Vec<u8> = (0..3 * 2 * 2).map(|v| (v * 20) as u8).collect();
        let images = encode_u8(&[3, 2, 2], &pixels);
        let labels = encode_u8(&[3], &[1, 0, 2]);
        std::fs::write(dir.join("img"), &images).unwrap();
        std::fs::write(dir.join("lab.gz"), gzip(&labels)).unwrap();
        std::fs::write(dir.join("img.gz"), gzip(&images)).unwrap();
        let a = load_pair(&dir.join("img"), &dir.join("lab.gz"), 3).unwrap();
        let b = load_pair(&dir.join("img.gz"), &dir.join("lab.gz"), 3).unwrap();
        assert_eq!(a, b);
        assert_eq!((a.len(), a.n_features()), (3, 4));
        assert_eq!(a.labels(), &[1, 0, 2]);
        assert_eq!(
            a.row(1),
            &[80.0 / 255.0, 100.0 / 255.0, 120.0 / 255.0, 140.0 / 255.0]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn errors_name_the_file() {
        let dir = temp_dir("bad");
        let images = encode_u8(&[2, 2, 2], &[0; 8]);
        std::fs::write(dir.join("img"), &images).unwrap();
        std::fs::write(dir.join("short"), &images[..images.len() - 1]).unwrap();
        std::fs::write(dir.join("lab3"), encode_u8(&[3], &[0, 1, 1])).unwrap();
        std::fs::write(dir.join("lab_big"), encode_u8(&[2], &[0, 12])).unwrap();
        std::fs::write(dir.join("junk"), b"hello world").unwrap();

        let missing = load_pair(&dir.join("nope"), &dir.join("lab3"), 10)
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("nope") && missing.contains("read failed"),
            "{missing}"
        );
        let short = load_pair(&dir.join("short"), &dir.join("lab3"), 10)
            .unwrap_err()
            .to_string();
        assert!(
            short.contains("short") && short.contains("7 bytes"),
            "{short}"
        );
        let junk = load_pair(&dir.join("img"), &dir.join("junk"), 10)
            .unwrap_err()
            .to_string();
        assert!(
            junk.contains("junk") && junk.contains("bad magic"),
            "{junk}"
        );
        let dims = load_pair(&dir.join("lab3"), &dir.join("lab3"), 10)
            .unwrap_err()
            .to_string();
        assert!(dims.contains("1 dimensions, expected 3"), "{dims}");
        let count = load_pair(&dir.join("img"), &dir.join("lab3"), 10)
            .unwrap_err()
            .to_string();
        assert!(count.contains("2 images but 3 labels"), "{count}");
        let class = load_pair(&dir.join("img"), &dir.join("lab_big"), 10)
            .unwrap_err()
            .to_string();
        assert!(
            class.contains("lab_big") && class.contains("label 12"),
            "{class}"
        );
        assert!(matches!(
            decode_u8(&[0, 0, 0x0d, 1, 0, 0, 0, 1, 0, 0, 0, 0], 1),
            Err(IdxError::ElementType(0x0d))
        ));
        assert!(matches!(
            decode_u8(&encode_u8(&[0, 2, 2], &[]), 3),
            Err(IdxError::BadDims(_))
        ));
        // A longer payload is counted to its end, raw or compressed; a shorter one too.
        let mut long = encode_u8(&[2, 2, 2], &[7; 8]);
        long.extend(std::iter::repeat_n(0u8, 3 << 20));
        for bytes in [long.clone(), gzip(&long)] {
            match decode_u8(&bytes, 3) {
                Err(IdxError::Length { found, expected }) => {
                    assert_eq!((found, expected), (8 + (3 << 20), 8));
                }
                other => panic!("{other:?}"),
            }
        }
        // A header that claims 2^32 - 1 bytes over a short stream asks for no more memory
        // than the stream holds.
        let claim = encode_u8(&[u32::MAX], &[]);
        let claim = [claim, vec![1u8; 5]].concat();
        for bytes in [claim.clone(), gzip(&claim)] {
            match decode_u8(&bytes, 1) {
                Err(IdxError::Length { found, expected }) => {
                    assert_eq!((found, expected), (5, u32::MAX as usize));
                }
                other => panic!("{other:?}"),
            }
        }
        // Cut inside the header: the dimensions' bytes present are counted.
        assert!(matches!(
            decode_u8(&gzip(&encode_u8(&[2, 2, 2], &[0; 8])[..9]), 3),
            Err(IdxError::Length {
                found: 5,
                expected: 12
            })
        ));
        assert!(matches!(
            decode_u8(&gzip(&[0, 0]), 3),
            Err(IdxError::BadMagic(m)) if m == [0, 0]
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
