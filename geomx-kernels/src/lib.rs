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

pub use bisparse::{BiSparse, BiSparseConfig, PushOutput, PushPayload};
pub use cast::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
pub use dense::{decode_dense, decode_dense_into, encode_dense, Scaling};
pub use dgt_score::BlockScores;
pub use error::{DecodeError, KernelError};
pub use mpq::{choose_codec, is_large, MpqCodec};
pub use optim::{DilocoOuter, Optimizer, OptimizerConfig};
pub use rng::{selection_seed, Tier};
pub use sparse::SparseVec;
pub use topk::{topk_exact, topk_sampled, SampledParams, Selection, TopkScratch};
pub use wire::{Layout, PayloadHeader, ValueType, HEADER_LEN};
