//! geomx-kernels: compression math for geo-distributed training.
//!
//! One module per technique of `specs/compression.md`, `specs/dgt.md` and `specs/sync.md`:
//!
//! - [`cast`]: f32 ↔ FP16 / BF16 conversions (round to nearest even, spec NaN rules), with
//!   F16C / AVX-512 paths chosen at run time and a portable bit-level path.
//! - [`wire`]: the 12-byte codec payload header.
//! - [`dense`]: dense f32 / f16 / bf16 payloads, with optional `pow2` scaling.
//! - [`sparse`]: sparse vectors (u32 indices + values), their payload codec, scatter-add and merge.
//! - [`topk`]: exact and DGC-style sampled top-k selection on |x|.
//! - [`bisparse`]: Bi-Sparse push state (error feedback, momentum correction, warm-up).
//! - [`mpq`]: the mixed-precision codec decision.
//! - [`dgt_score`]: DGT block contributions and ranking.
//! - [`optim`]: server-side optimizers (SGD, Adam, DC-ASGD) and the DiLoCo outer step.
//! - [`rng`]: the seeded sample generator and the selection seed hash.
//!
//! All kernels are CPU code; they are also the oracle the CUDA kernels (feature `cuda`) are
//! checked against.
//!
//! A Bi-Sparse round trip (local server push → wire → global server scatter-add):
//!
//! ```
//! use geomx_kernels::{selection_seed, BiSparse, BiSparseConfig, PushPayload, Scaling, SparseVec,
//!                     Tier, ValueType};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (n, key, round) = (1000, 7u64, 0u64);
//! let mut state = BiSparse::new(BiSparseConfig::default(), n)?; // ρ = 0.01, sampled selection
//! let g: Vec<f32> = (0..n).map(|i| (i as f32).sin()).collect();
//! let out = state.push(&g, round, selection_seed(42, Tier::Inter, 0, key, round))?;
//! let PushPayload::Sparse(sent) = out.payload else { unreachable!("1 % of 1000 is sparse") };
//! assert_eq!(sent.count(), 10);
//!
//! let mut bytes = Vec::new();
//! sent.encode(ValueType::F32, Scaling::None, &mut bytes);
//! assert_eq!(bytes.len(), 12 + 8 * 10);
//! let received = SparseVec::decode(&bytes, key, n)?; // validated: errors name the key
//! let mut sum = vec![0.0f32; n];
//! received.scatter_add_into(&mut sum)?;
//! // What was sent plus what stays behind is exactly the input.
//! for i in 0..n {
//!     assert_eq!(sum[i] + state.residual()[i], g[i]);
//! }
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod bisparse;
pub mod cast;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dense;
pub mod device;
pub mod dgt_score;
pub mod error;
pub mod mpq;
pub mod optim;
pub mod rng;
pub mod sparse;
pub mod topk;
pub mod wire;

pub use bisparse::{check_momentum_rule, BiSparse, BiSparseConfig, PushOutput, PushPayload};
pub use cast::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
pub use dense::{decode_dense, decode_dense_into, encode_dense, Scaling};
pub use dgt_score::{assign_channels, AdaptiveK, BlockScores};
pub use error::{DecodeError, KernelError};
pub use mpq::{choose_codec, is_large, MpqCodec};
pub use optim::{DilocoOuter, Optimizer, OptimizerConfig};
pub use rng::{selection_seed, Tier};
pub use sparse::{scatter_add_many, scatter_add_payload, MergeScratch, SparseVec};
pub use topk::{topk_exact, topk_sampled, SampledParams, Selection, TopkScratch};
pub use wire::{Layout, PayloadHeader, ValueType, HEADER_LEN};
