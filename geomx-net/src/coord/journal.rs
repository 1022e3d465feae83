//! The coordinator's journal: opaque records its members append while the job runs (the trainer
//! keeps its round log there), bounded in size. The coordinator does not read them; whoever runs
//! it does, through [`crate::coord::Coordinator::journal`].

use super::NodeKey;

/// Largest record a member may append, in bytes.
pub const JOURNAL_RECORD_MAX: usize = 64 * 1024;

/// Most bytes the journal holds; appends beyond are refused.
pub const JOURNAL_MAX_BYTES: usize = 32 * 1024 * 1024;

/// One record: who appended it, and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalRecord {
    /// The member that appended it.
    pub from: NodeKey,
    /// Its bytes, as sent.
    pub bytes: Vec<u8>,
}

/// The records in the order they arrived, with the refusals counted.
#[derive(Debug, Default)]
pub struct Journal {
    records: Vec<JournalRecord>,
    bytes: usize,
    refused: u64,
}

impl Journal {
    /// Appends `bytes` from `from`, or says why not (too large, or the journal is full; the
    /// refusal is counted).
    pub fn append(&mut self, from: NodeKey, bytes: Vec<u8>) -> Result<(), String> {
        let why = if bytes.len() > JOURNAL_RECORD_MAX {
            format!(
                "a journal record of {} bytes exceeds {JOURNAL_RECORD_MAX}",
                bytes.len()
            )
        } else if self.bytes + bytes.len() > JOURNAL_MAX_BYTES {
            format!("the journal is full ({JOURNAL_MAX_BYTES} bytes)")
        } else {
            self.bytes += bytes.len();
            self.records.push(JournalRecord { from, bytes });
            return Ok(());
        };
        self.refused += 1;
        Err(why)
    }

    /// The records so far.
    pub fn records(&self) -> &[JournalRecord] {
        &self.records
    }

    /// Appends refused so far (the journal is then incomplete).
    pub fn refused(&self) -> u64 {
        self.refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_keep_their_order_and_oversized_or_overflowing_ones_are_refused() {
        let mut j = Journal::default();
        let a = NodeKey::new("local_server", 1, 0);
        j.append(a.clone(), b"one".to_vec()).unwrap();
        j.append(a.clone(), b"two".to_vec()).unwrap();
        assert!(j
            .append(a.clone(), vec![0; JOURNAL_RECORD_MAX + 1])
            .unwrap_err()
            .contains("exceeds"));
        let big = vec![0; JOURNAL_RECORD_MAX];
        let fits = (JOURNAL_MAX_BYTES - 6) / JOURNAL_RECORD_MAX;
        for _ in 0..fits {
            j.append(a.clone(), big.clone()).unwrap();
        }
        assert!(j.append(a.clone(), big).unwrap_err().contains("full"));
        assert_eq!(j.refused(), 2);
        assert_eq!(j.records()[1].bytes, b"two");
        assert_eq!(j.records().len(), 2 + fits);
    }
}
