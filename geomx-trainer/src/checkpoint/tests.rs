//! Round directories: completeness, fallback past torn, corrupt and foreign rounds, retention.

use super::manifest::{entry_path, round_dir, state_path};
use super::*;

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("geomx-ckpt-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

const HASH: u64 = 0x1234_5678_9abc_def0;

fn ids() -> Vec<String> {
    vec![
        process_id("global_server", 2, 0),
        process_id("worker", 0, 1),
    ]
}

fn saver(dir: &Path, id: &str, keep: usize) -> Saver {
    let policy = Policy {
        dir: dir.to_path_buf(),
        every_rounds: 5,
        keep,
        background: true,
    };
    Saver::new(policy, id.to_string(), HASH)
}

/// Both processes save `round`, each a tensor holding the round.
fn save_round(dir: &Path, round: u64, keep: usize) {
    for id in ids() {
        let s = saver(dir, &id, keep);
        let mut st = s.state(round);
        st.put_f32("x", vec![round as f32; 3]);
        s.save(&st).unwrap();
    }
}

fn loaded_round(dir: &Path, id: &str) -> Result<u64, CheckpointError> {
    let mut st = load(dir, &ids(), id, HASH, 100)?;
    let x = st.take_f32("x", Some(3)).unwrap();
    assert_eq!(x[0], st.round as f32);
    Ok(st.round)
}

#[test]
fn ids_policy_and_parts() {
    assert_eq!(process_id("global_server", 2, 0), "global-server-2-0");
    let p = Policy {
        dir: "d".into(),
        every_rounds: 5,
        keep: 1,
        background: true,
    };
    assert!(!p.due(0) && !p.due(4) && p.due(5) && p.due(10));
    let mut parts = RoundParts::new(2, HASH);
    assert!(parts.add(5, |s| s.put_u64("a", vec![1])).is_none());
    assert!(parts.add(10, |s| s.put_u64("a", vec![2])).is_none());
    let s = parts.add(5, |s| s.put_u64("b", vec![3])).unwrap();
    assert_eq!((s.round, s.entries.len(), s.config_hash), (5, 2, HASH));
}

#[test]
fn newest_complete_round_is_loaded_and_incomplete_ones_are_skipped() {
    let dir = scratch("complete");
    save_round(&dir, 5, 3);
    save_round(&dir, 10, 3);
    assert_eq!(loaded_round(&dir, "worker-0-1").unwrap(), 10);
    // Round 15 has only one process's files (the job died while writing it).
    let s = saver(&dir, "worker-0-1", 3);
    let mut st = s.state(15);
    st.put_f32("x", vec![15.0; 3]);
    s.save(&st).unwrap();
    assert_eq!(loaded_round(&dir, "worker-0-1").unwrap(), 10);
    assert_eq!(loaded_round(&dir, "global-server-2-0").unwrap(), 10);
    // A round of the last round has nothing left to run.
    match load(&dir, &ids(), "worker-0-1", HASH, 10) {
        Err(CheckpointError::Finished { round: 10, .. }) => {}
        other => panic!("expected Finished, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn torn_corrupt_and_foreign_rounds_are_refused_naming_the_file() {
    let dir = scratch("corrupt");
    save_round(&dir, 5, 3);
    save_round(&dir, 10, 3);
    let rd = round_dir(&dir, 10);
    // A flipped byte in round 10: refused, round 5 is used.
    let f = state_path(&rd, "global-server-2-0");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[20] ^= 1;
    std::fs::write(&f, &bytes).unwrap();
    let e = manifest::read_checked(&dir, 10, "global-server-2-0", HASH).unwrap_err();
    assert!(matches!(e, CheckpointError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("global-server-2-0.ckpt"), "{e}");
    assert_eq!(loaded_round(&dir, "worker-0-1").unwrap(), 5);
    // A torn file (shorter than its manifest says).
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    assert_eq!(loaded_round(&dir, "worker-0-1").unwrap(), 5);
    // A missing file.
    std::fs::remove_file(state_path(&round_dir(&dir, 5), "worker-0-1")).unwrap();
    let e = load(&dir, &ids(), "worker-0-1", HASH, 100).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, CheckpointError::NoCompleteRound { .. }),
        "{msg}"
    );
    assert!(msg.contains("round-5/worker-0-1.ckpt: missing"), "{msg}");
    assert!(msg.contains("round-10/global-server-2-0.ckpt"), "{msg}");
    // Another job's checkpoint.
    let other = scratch("foreign");
    save_round(&other, 5, 3);
    let e = load(&other, &ids(), "worker-0-1", HASH ^ 1, 100).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("configuration hash"), "{msg}");
    assert!(msg.contains("global-server-2-0.manifest.json"), "{msg}");
    // An entry that claims an absurd size is refused before anything is read.
    let ep = entry_path(&round_dir(&other, 5), "worker-0-1");
    let text = std::fs::read_to_string(&ep).unwrap();
    let size = std::fs::metadata(state_path(&round_dir(&other, 5), "worker-0-1"))
        .unwrap()
        .len();
    std::fs::write(
        &ep,
        text.replace(
            &format!("\"bytes\": {size}"),
            "\"bytes\": 18446744073709551615",
        ),
    )
    .unwrap();
    let e = manifest::read_checked(&other, 5, "worker-0-1", HASH).unwrap_err();
    assert!(e.to_string().contains("more than"), "{e}");
    // A manifest entry that is not JSON, and garbage in place of a state file.
    std::fs::write(entry_path(&round_dir(&other, 5), "worker-0-1"), b"\xff{").unwrap();
    let e = manifest::read_checked(&other, 5, "worker-0-1", HASH).unwrap_err();
    assert!(e.to_string().contains("bad manifest entry"), "{e}");
    assert!(matches!(
        load(&scratch("none"), &ids(), "worker-0-1", HASH, 100),
        Err(CheckpointError::Missing { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&other);
}

#[test]
fn keep_retains_the_newest_rounds() {
    let dir = scratch("keep");
    for r in [5, 10, 15, 20] {
        if r == 15 {
            // A write of round 10 that a crash interrupted.
            std::fs::write(round_dir(&dir, 10).join(".worker-0-1.ckpt.tmp.1"), b"x").unwrap();
        }
        save_round(&dir, r, 2);
    }
    assert_eq!(manifest::rounds(&dir).unwrap(), vec![20, 15]);
    // No temporary files are left behind.
    let names: Vec<String> = std::fs::read_dir(round_dir(&dir, 20))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_restarted_process_loads_its_own_newest_intact_round() {
    let dir = scratch("own");
    let gs = process_id("global_server", 2, 0);
    assert!(
        load_newest_own(&dir, &gs, HASH).unwrap().is_none(),
        "no directory yet"
    );
    save_round(&dir, 5, 3);
    // Only the global server reached round 10 (the others have not written it yet), and its
    // round 15 is torn: round 10 is its newest intact state, the last round included.
    let s = saver(&dir, &gs, 3);
    for round in [10, 15] {
        let mut st = s.state(round);
        st.put_f32("x", vec![round as f32; 3]);
        s.save(&st).unwrap();
    }
    let torn = state_path(&round_dir(&dir, 15), &gs);
    let bytes = std::fs::read(&torn).unwrap();
    std::fs::write(&torn, &bytes[..bytes.len() / 2]).unwrap();
    let st = load_newest_own(&dir, &gs, HASH).unwrap().unwrap();
    assert_eq!(st.round, 10);
    // The worker's newest is round 5; another job's files are not this job's.
    let w = process_id("worker", 0, 1);
    assert_eq!(load_newest_own(&dir, &w, HASH).unwrap().unwrap().round, 5);
    assert!(load_newest_own(&dir, &w, HASH ^ 1).unwrap().is_none());
    let _ = std::fs::remove_dir_all(dir);
}
