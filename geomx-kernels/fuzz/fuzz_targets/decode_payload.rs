//! Decoding arbitrary bytes never panics (compression.md oracle 8). The first two bytes pick the
//! key length the decoder is told to expect; the rest is the payload.
#![no_main]

use geomx_kernels::dense::decode_dense;
use geomx_kernels::sparse::{scatter_add_payload, SparseVec};
use geomx_kernels::wire::PayloadHeader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let n = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let payload = &data[2..];
    let _ = PayloadHeader::parse(payload, 7, n);
    let _ = decode_dense(payload, 7, n);
    if let Ok(s) = SparseVec::decode(payload, 7, n) {
        assert!(s.indices().windows(2).all(|w| w[0] < w[1]));
        assert!(s.indices().iter().all(|&i| (i as usize) < n));
    }
    let mut dense = vec![0.0f32; n];
    let _ = scatter_add_payload(payload, 7, &mut dense);
});
