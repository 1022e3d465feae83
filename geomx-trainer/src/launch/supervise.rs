//! What `geomx launch` does when a child fails (`[resilience] restart`), the `--chaos` faults it
//! hands to children, and the fault records of the report.

use serde::{Deserialize, Serialize};

use crate::hips::plan::roles;
use crate::hips::round_log::{MemberChange, MemberEvent};

/// One fault of `--chaos`: which process, and what it does to itself when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChaosFault {
    /// Role of the target (only workers act on faults so far).
    pub role: String,
    /// Its data center.
    pub dc: u32,
    /// Its rank.
    pub rank: u32,
    /// The value of [`crate::hips::chaos::CHAOS_ENV`] its first incarnation gets.
    pub fault: String,
}

/// Parses `--chaos SPEC`: comma-separated `ACTION:ROLE:dcD:RANK@round=N[:POINT]`, e.g.
/// `kill:worker:dc1:0@round=200,stop=3s:worker:dc0:1@round=50:reply-wait` (ACTION and POINT as
/// [`crate::hips::chaos::SelfFault::parse`] takes them). A global server, which lives in the
/// central DC, may be written without its DC: `kill:global-server:0@round=500`. Roles are
/// written with `-` or `_`. `cut:dcD:DURATION@round=N` cuts the WAN link of DC D's site for
/// that long when its local server reaches round N (the DC's local server carries the cue, so
/// it takes no other fault).
pub fn parse_chaos(
    spec: &str,
    workers_per_dc: &[usize],
    global_servers: usize,
    central_dc: u32,
) -> Result<Vec<ChaosFault>, String> {
    let mut out: Vec<ChaosFault> = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = |why: &str| format!("--chaos {item:?}: {why}");
        let (target, at) = item
            .split_once('@')
            .ok_or_else(|| bad("expected ACTION:ROLE:dcD:RANK@round=N"))?;
        let parts: Vec<&str> = target.split(':').collect();
        let central = format!("dc{central_dc}");
        // A cut names the data center whose link goes dark; its local server announces it.
        let cut;
        let (action, role, dc, rank) = match parts[..] {
            ["cut", dc, length] => {
                cut = format!("cut={length}");
                (cut.as_str(), roles::LOCAL_SERVER.to_string(), dc, "0")
            }
            [action, role, dc, rank] => (action, role.replace('-', "_"), dc, rank),
            [action, role, rank] if role.replace('-', "_") == roles::GLOBAL_SERVER => (
                action,
                roles::GLOBAL_SERVER.to_string(),
                central.as_str(),
                rank,
            ),
            [action, roles::COORDINATOR] => (
                action,
                roles::COORDINATOR.to_string(),
                central.as_str(),
                "0",
            ),
            _ => return Err(bad("expected ACTION:ROLE:dcD:RANK before '@'")),
        };
        let role = role.as_str();
        let roles_hit = [
            roles::WORKER,
            roles::LOCAL_SERVER,
            roles::GLOBAL_SERVER,
            roles::COORDINATOR,
        ];
        if !roles_hit.contains(&role) {
            return Err(bad(
                "only workers, local servers, global servers and the coordinator take chaos \
                 faults",
            ));
        }
        // The coordinator counts no rounds: its fault strikes a time after the job runs.
        if (role == roles::COORDINATOR) != at.starts_with("after=") {
            return Err(bad(
                "the coordinator takes @after=DURATION (e.g. kill:coordinator@after=2s), the \
                 other roles @round=N",
            ));
        }
        let dc: u32 = dc
            .strip_prefix("dc")
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| bad("the data center is written dcN"))?;
        let rank: u32 = rank.parse().map_err(|_| bad("the rank is a number"))?;
        let n = match role {
            roles::WORKER => workers_per_dc.get(dc as usize).copied().unwrap_or(0),
            roles::LOCAL_SERVER => usize::from((dc as usize) < workers_per_dc.len()),
            roles::COORDINATOR => 1,
            _ if dc == central_dc => global_servers,
            _ => 0,
        };
        if rank as usize >= n {
            return Err(bad(&format!(
                "the job has no {role} (dc {dc}, rank {rank})"
            )));
        }
        let fault = format!("{action}@{at}");
        crate::hips::chaos::SelfFault::parse(&fault).map_err(|e| bad(&e))?;
        if out
            .iter()
            .any(|f| (f.role.as_str(), f.dc, f.rank) == (role, dc, rank))
        {
            return Err(bad("one fault per process"));
        }
        out.push(ChaosFault {
            role: role.to_string(),
            dc,
            rank,
            fault,
        });
    }
    Ok(out)
}

/// A process that failed while the job ran, and what became of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultRecord {
    /// The process, e.g. `worker (dc 1, rank 0)`.
    pub process: String,
    /// Role, data center and rank.
    pub role: String,
    /// Data center.
    pub dc: u32,
    /// Rank.
    pub rank: u32,
    /// How it ended (`killed by signal 9`, `exit code 2`).
    pub cause: String,
    /// Seconds from the launch to the launcher seeing it end.
    pub at_s: f64,
    /// When the fault struck, milliseconds since the Unix epoch: the time a `--chaos` fault
    /// reported, otherwise when the launcher saw the process end.
    pub unix_ms: u64,
    /// Whether the launcher started it again.
    pub restarted: bool,
    /// Seconds from the fault to its local server dropping it from the rounds (0 when the
    /// server saw it before the launcher did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detected_after_s: Option<f64>,
    /// Seconds from the fault to its next incarnation counting again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejoined_after_s: Option<f64>,
    /// The round being collected when it was dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_round: Option<u64>,
    /// The round it counted again from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejoined_round: Option<u64>,
    /// Rounds that ran without it (all rounds to the end when it never rejoined).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounds_reduced: Option<u64>,
}

impl FaultRecord {
    /// The record of a `cut:dcD:…` fault: DC `dc`'s WAN link cut for `len`, `at_s` seconds into
    /// the launch, at `unix_ms`. It is matched with the local server's events: a cut longer
    /// than the detection time loses the DC like a lost local server.
    pub fn link_cut(dc: u32, len: std::time::Duration, at_s: f64, unix_ms: u64) -> Self {
        Self {
            process: format!("WAN link (dc {dc})"),
            role: roles::LOCAL_SERVER.into(),
            dc,
            rank: 0,
            cause: format!("link cut for {:.3} s", len.as_secs_f64()),
            at_s,
            unix_ms,
            restarted: false,
            detected_after_s: None,
            rejoined_after_s: None,
            lost_round: None,
            rejoined_round: None,
            rounds_reduced: None,
        }
    }
}

/// Completes the records of cut links: a cut that outlasted the detection time lost the DC, and
/// its local server then failed, was restarted and rejoined; that rejoin went to the local
/// server's own record by [`match_events`]. The cut's record gets it too, so that it tells how
/// long the DC was away and how many rounds ran without it.
pub fn complete_cuts(faults: &mut [FaultRecord]) {
    for i in 0..faults.len() {
        let f = &faults[i];
        if !f.cause.starts_with("link cut") || f.rejoined_round.is_some() {
            continue;
        }
        let Some(lost) = f.lost_round else { continue };
        let key = (f.role.clone(), f.dc, f.rank);
        let Some(g) = faults[i + 1..]
            .iter()
            .take_while(|g| {
                !g.cause.starts_with("link cut")
                    || (&g.role, g.dc, g.rank) != (&key.0, key.1, key.2)
            })
            .find(|g| {
                (&g.role, g.dc, g.rank) == (&key.0, key.1, key.2) && g.rejoined_round.is_some()
            })
        else {
            continue;
        };
        let (back, back_ms) = (
            g.rejoined_round,
            g.rejoined_after_s.map(|s| g.unix_ms as f64 / 1e3 + s),
        );
        let f = &mut faults[i];
        f.rejoined_round = back;
        f.rejoined_after_s = back_ms.map(|t| t - f.unix_ms as f64 / 1e3);
        f.rounds_reduced = back.map(|b| b.saturating_sub(lost));
    }
}

/// Completes each fault with its server's events (a worker's local server, a local server's
/// global servers): the first loss of that process seen after the fault, and the rejoin after
/// that loss. `rounds` is the job's length.
pub fn match_events(faults: &mut [FaultRecord], events: &[MemberEvent], rounds: u64) {
    let mut used = vec![false; events.len()];
    // A process's next fault ends the window of its previous one once the process came back in
    // between; a restart that failed before it counted again is part of the same outage.
    let until: Vec<u64> = (0..faults.len())
        .map(|i| {
            let f = &faults[i];
            let same = |role: &str, dc, rank| (role, dc, rank) == (f.role.as_str(), f.dc, f.rank);
            faults[i + 1..]
                .iter()
                .filter(|g| same(&g.role, g.dc, g.rank))
                .find(|g| {
                    events.iter().any(|e| {
                        same(&e.role, e.dc, e.rank)
                            && e.change == MemberChange::Rejoined
                            && (f.unix_ms..g.unix_ms).contains(&e.unix_ms)
                    })
                })
                .map_or(u64::MAX, |g| g.unix_ms)
        })
        .collect();
    for (f, until) in faults.iter_mut().zip(until) {
        // The server may see the loss a little before the launcher does.
        let from = f.unix_ms.saturating_sub(1_000);
        let mine = |e: &MemberEvent, change| {
            e.role == f.role
                && (e.dc, e.rank, e.change) == (f.dc, f.rank, change)
                && e.unix_ms >= from
        };
        // A worker whose local server died has no loss event of its own: only its rejoin.
        let lost = (0..events.len()).find(|&i| !used[i] && mine(&events[i], MemberChange::Lost));
        let secs = |ms: u64| ms.saturating_sub(f.unix_ms) as f64 / 1e3;
        let after = match lost {
            Some(li) => {
                used[li] = true;
                f.detected_after_s = Some(secs(events[li].unix_ms));
                f.lost_round = Some(events[li].round);
                events[li].unix_ms
            }
            None => from,
        };
        // The rejoin its loss's observer saw: a global server is lost and found again by every
        // DC, each at the round it was collecting, and one DC may be a round ahead of another.
        let seen_by = lost.map(|li| events[li].seen_by.as_str());
        let back = (0..events.len()).find(|&i| {
            !used[i]
                && mine(&events[i], MemberChange::Rejoined)
                && seen_by.is_none_or(|s| s == events[i].seen_by)
                && (after..until).contains(&events[i].unix_ms)
        });
        match (back, f.lost_round) {
            (Some(bi), lost_round) => {
                used[bi] = true;
                f.rejoined_after_s = Some(secs(events[bi].unix_ms));
                f.rejoined_round = Some(events[bi].round);
                f.rounds_reduced = lost_round.map(|l| events[bi].round.saturating_sub(l));
            }
            (None, Some(l)) => f.rounds_reduced = Some(rounds.saturating_sub(l)),
            (None, None) => {}
        }
    }
}

/// Checks that each round-triggered fault names a round its process reaches. Under HFA a local
/// server sees every `per_local`-th training round (k1) and a global server every `per_global`-th
/// (k1 · k2); a worker starts every round but pushes only at the end of each k1-th
/// (`mid-push`, `reply-wait`: rounds k1 − 1, 2·k1 − 1, …), a local server upward at the end of
/// each (k1 · k2)-th. A fault between them would never strike.
pub fn check_chaos_rounds(
    faults: &[ChaosFault],
    per_local: u64,
    per_global: u64,
) -> Result<(), String> {
    use crate::hips::chaos::{Point, SelfFault};
    for f in faults {
        let Ok(fault) = SelfFault::parse(&f.fault) else {
            continue;
        };
        // (step, offset): the rounds the process reaches are offset + n · step.
        let (step, offset) = match (f.role.as_str(), fault.point) {
            (roles::LOCAL_SERVER, Point::MidPush | Point::ReplyWait) => {
                (per_global, per_global - 1)
            }
            (roles::LOCAL_SERVER, _) => (per_local, 0),
            (roles::GLOBAL_SERVER, _) => (per_global, 0),
            (roles::WORKER, Point::MidPush | Point::ReplyWait) => (per_local, per_local - 1),
            _ => (1, 0),
        };
        if fault.after.is_none() && step > 1 && fault.round % step != offset {
            return Err(format!(
                "{} (dc {}, rank {}) would never reach {:?} of round {}: it reaches rounds \
                 {offset} + n · {step} (HFA's k1 = {per_local}, k1 · k2 = {per_global})",
                f.role, f.dc, f.rank, fault.point, fault.round
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_hfa_a_server_fault_must_name_a_round_the_server_reaches() {
        let f = parse_chaos(
            "kill:worker:dc0:0@round=3,cut:dc1:5s@round=1000,kill:global-server:0@round=40",
            &[2, 2],
            1,
            2,
        )
        .unwrap();
        check_chaos_rounds(&f, 1, 1).unwrap();
        check_chaos_rounds(&f, 5, 20).unwrap();
        let e = check_chaos_rounds(&f, 5, 30).unwrap_err();
        assert!(
            e.contains("global_server") && e.contains("0 + n · 30"),
            "{e}"
        );
        let e = check_chaos_rounds(&f, 3, 3).unwrap_err();
        assert!(
            e.contains("local_server (dc 1") && e.contains("round 1000"),
            "{e}"
        );
        // A worker pushes at the end of rounds k1 − 1, 2·k1 − 1, …
        let w = parse_chaos("kill:worker:dc0:0@round=1499:mid-push", &[2, 2], 1, 2).unwrap();
        check_chaos_rounds(&w, 5, 20).unwrap();
        // A local server pushes upward at the end of rounds k1·k2 − 1, 2·k1·k2 − 1, …
        let l = parse_chaos("kill:local-server:dc1:0@round=39:mid-push", &[2, 2], 1, 2).unwrap();
        check_chaos_rounds(&l, 5, 20).unwrap();
        check_chaos_rounds(&l, 1, 1).unwrap();
        let l = parse_chaos("kill:local-server:dc1:0@round=40:reply-wait", &[2, 2], 1, 2).unwrap();
        let e = check_chaos_rounds(&l, 5, 20).unwrap_err();
        assert!(e.contains("19 + n · 20"), "{e}");
        let w = parse_chaos("stop=1s:worker:dc0:0@round=1500:reply-wait", &[2], 1, 1).unwrap();
        let e = check_chaos_rounds(&w, 5, 20).unwrap_err();
        assert!(e.contains("4 + n · 5"), "{e}");
        check_chaos_rounds(&w, 1, 1).unwrap();
    }

    #[test]
    fn chaos_specs_parse_and_bad_ones_name_the_item() {
        let f = parse_chaos(
            "kill:worker:dc1:0@round=20, kill:worker:dc0:1@round=5, \
             stop=2s:worker:dc0:0@round=7:mid-push, kill:local_server:dc1:0@round=9, \
             kill:global-server:0@round=11:reply-wait",
            &[2, 2],
            1,
            0,
        )
        .unwrap();
        assert_eq!(f.len(), 5);
        assert_eq!(
            (f[4].role.as_str(), f[4].dc, f[4].rank, f[4].fault.as_str()),
            ("global_server", 0, 0, "kill@round=11:reply-wait")
        );
        let c = parse_chaos("stop=3s:coordinator@after=1500ms", &[1], 1, 0).unwrap();
        assert_eq!(
            (c[0].role.as_str(), c[0].fault.as_str()),
            ("coordinator", "stop=3s@after=1500ms")
        );
        let c = parse_chaos("cut:dc1:5s@round=80", &[2, 2], 1, 0).unwrap();
        assert_eq!(
            (c[0].role.as_str(), c[0].dc, c[0].rank, c[0].fault.as_str()),
            ("local_server", 1, 0, "cut=5s@round=80")
        );
        let g = parse_chaos("kill:global_server:dc2:1@round=3", &[1, 1, 1], 2, 2).unwrap();
        assert_eq!((g[0].dc, g[0].rank), (2, 1));
        assert_eq!(f[2].fault, "stop=2s@round=7:mid-push");
        assert_eq!((f[3].role.as_str(), f[3].dc), ("local_server", 1));
        assert_eq!(
            (f[0].dc, f[0].rank, f[0].fault.as_str()),
            (1, 0, "kill@round=20")
        );
        for bad in [
            "kill:worker:dc2:0@round=1",
            "kill:local_server:dc0:1@round=1",
            "kill:worker:dc0:0@round=1:never",
            "kill:worker:dc0:2@round=1",
            "kill:global-server:1@round=1",
            "kill:global-server:dc1:0@round=1",
            "kill:coordinator:0@round=1",
            "kill:coordinator@round=1",
            "kill:worker:dc0:0@after=1s",
            "kill:coordinator@after=forever",
            "kill:worker:1:0@round=1",
            "stop:worker:dc0:0@round=1",
            "kill:worker:dc0:0@round=1:never",
            "kill:worker:dc0:0",
            "kill:worker:dc0:0@round=1,kill:worker:dc0:0@round=2",
            "cut:dc2:5s@round=1",
            "cut:dc1:forever@round=1",
            "cut:dc1:5s@after=1s",
            "cut:dc1:5s@round=1,kill:local_server:dc1:0@round=9",
        ] {
            let e = parse_chaos(bad, &[2, 2], 1, 0).unwrap_err();
            assert!(e.starts_with("--chaos"), "{e}");
        }
        assert!(parse_chaos("", &[1], 1, 0).unwrap().is_empty());
    }

    #[test]
    fn a_cut_that_lost_its_dc_gets_the_restarted_local_servers_rejoin() {
        let cut = FaultRecord {
            lost_round: Some(100),
            detected_after_s: Some(1.0),
            rounds_reduced: Some(1400),
            ..FaultRecord::link_cut(1, std::time::Duration::from_secs(3), 1.6, 10_000)
        };
        let exit = FaultRecord {
            process: "local_server (dc 1, rank 0)".into(),
            cause: "exit code 2".into(),
            unix_ms: 11_800,
            restarted: true,
            rejoined_after_s: Some(1.2),
            rejoined_round: Some(253),
            ..FaultRecord::link_cut(1, std::time::Duration::ZERO, 3.4, 11_800)
        };
        let other = FaultRecord {
            dc: 2,
            ..exit.clone()
        };
        let mut faults = vec![cut.clone(), other, exit];
        complete_cuts(&mut faults);
        let c = &faults[0];
        assert_eq!(c.rejoined_round, Some(253));
        assert_eq!(c.rounds_reduced, Some(153));
        assert!((c.rejoined_after_s.unwrap() - 3.0).abs() < 1e-9, "{c:?}");
        // A short cut lost nothing: nothing to complete.
        let mut short = vec![FaultRecord {
            lost_round: None,
            ..cut
        }];
        complete_cuts(&mut short);
        assert_eq!(short[0].rejoined_round, None);
    }

    fn fault(dc: u32, rank: u32, unix_ms: u64) -> FaultRecord {
        FaultRecord {
            process: format!("worker (dc {dc}, rank {rank})"),
            role: roles::WORKER.into(),
            dc,
            rank,
            cause: "killed by signal 9".into(),
            at_s: 1.0,
            unix_ms,
            restarted: true,
            detected_after_s: None,
            rejoined_after_s: None,
            lost_round: None,
            rejoined_round: None,
            rounds_reduced: None,
        }
    }

    fn ev(rank: u32, change: MemberChange, round: u64, unix_ms: u64) -> MemberEvent {
        MemberEvent {
            role: roles::WORKER.into(),
            dc: 1,
            rank,
            change,
            round,
            unix_ms,
            reason: String::new(),
            seen_by: String::new(),
        }
    }

    #[test]
    fn faults_are_matched_with_their_loss_and_rejoin() {
        let mut faults = vec![
            fault(1, 0, 10_000),
            fault(1, 0, 20_000),
            fault(1, 1, 30_000),
            fault(1, 1, 40_000),
        ];
        let events = vec![
            ev(0, MemberChange::Lost, 7, 9_990),
            ev(0, MemberChange::Rejoined, 9, 10_600),
            ev(0, MemberChange::Lost, 15, 20_050),
            ev(0, MemberChange::Rejoined, 16, 20_900),
            ev(1, MemberChange::Lost, 30, 30_100),
            ev(1, MemberChange::Rejoined, 44, 40_500),
        ];
        match_events(&mut faults, &events, 40);
        assert_eq!(faults[0].detected_after_s, Some(0.0));
        assert_eq!(
            (faults[0].lost_round, faults[0].rejoined_round),
            (Some(7), Some(9))
        );
        assert_eq!(faults[0].rounds_reduced, Some(2));
        assert_eq!(faults[1].detected_after_s, Some(0.05));
        assert_eq!(faults[1].rejoined_after_s, Some(0.9));
        // The fourth fault (no loss event: its server saw no member) is a restart that failed
        // before it counted again: the rejoin at 40.5 s ends the third fault's outage.
        assert_eq!(faults[2].rejoined_round, Some(44));
        assert_eq!(faults[2].rounds_reduced, Some(14));
        assert_eq!(faults[3].detected_after_s, None);
        assert_eq!(faults[3].rejoined_after_s, None);
        assert_eq!(faults[3].rounds_reduced, None);
    }

    #[test]
    fn a_global_servers_loss_and_rejoin_are_paired_per_observing_dc() {
        // Stopped while it answered round 600 (HFA, 20 rounds per global round): dc1 had its
        // reply and pushes the next global round, dc0 and dc2 wait for it (round 580). dc1
        // finds the restart first. Every DC rejoined at the round it lost: no round ran
        // without the global server.
        let mut faults = vec![FaultRecord {
            process: "global_server (dc 3, rank 0)".into(),
            role: roles::GLOBAL_SERVER.into(),
            dc: 3,
            ..fault(3, 0, 10_000)
        }];
        let seen = |dc: u32, change, round, unix_ms| MemberEvent {
            role: roles::GLOBAL_SERVER.into(),
            dc: 3,
            seen_by: format!("local_server (dc {dc}, rank 0)"),
            ..ev(0, change, round, unix_ms)
        };
        let events = vec![
            seen(0, MemberChange::Lost, 580, 11_000),
            seen(2, MemberChange::Lost, 580, 11_001),
            seen(1, MemberChange::Lost, 600, 11_004),
            seen(1, MemberChange::Rejoined, 600, 12_800),
            seen(0, MemberChange::Rejoined, 580, 12_810),
            seen(2, MemberChange::Rejoined, 580, 12_812),
        ];
        match_events(&mut faults, &events, 3000);
        let f = &faults[0];
        assert_eq!((f.lost_round, f.rejoined_round), (Some(580), Some(580)));
        assert_eq!(f.rounds_reduced, Some(0));
        assert_eq!(f.rejoined_after_s, Some(2.81));
    }
}
