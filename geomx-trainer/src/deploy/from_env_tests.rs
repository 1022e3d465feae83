//! Golden role tables per launcher, and the errors of wrong environments.

use super::*;

/// The vanilla HiPS job (examples/vanilla-hips.toml = the built-in default): central tier
/// (coordinator + 1 global server) in a separate site (DC index 2), then dc0 and dc1 with a local
/// server and 2 workers each.
const GOLDEN: [(Role, u32, u32); 8] = [
    (Role::Coordinator, 2, 0),
    (Role::GlobalServer, 2, 0),
    (Role::LocalServer, 0, 0),
    (Role::Worker, 0, 0),
    (Role::Worker, 0, 1),
    (Role::LocalServer, 1, 0),
    (Role::Worker, 1, 0),
    (Role::Worker, 1, 1),
];

/// (tier, index in tier) of each row of [`GOLDEN`].
const TIERS: [(Tier, usize); 8] = [
    (Tier::Central, 0),
    (Tier::Central, 1),
    (Tier::Dc(0), 0),
    (Tier::Dc(0), 1),
    (Tier::Dc(0), 2),
    (Tier::Dc(1), 0),
    (Tier::Dc(1), 1),
    (Tier::Dc(1), 2),
];

fn env(pairs: &[(&str, String)]) -> Env {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn cfg() -> Config {
    Config::default()
}

fn run(e: &Env) -> Assignment {
    let l = detect(e).unwrap_or_else(|err| panic!("{err}"));
    assign(&cfg(), e, l).unwrap_or_else(|err| panic!("{e:?}: {err}"))
}

fn err(e: &Env) -> DeployError {
    match detect(e) {
        Err(x) => x,
        Ok(l) => assign(&cfg(), e, l).expect_err("expected an error"),
    }
}

fn var_of(e: &DeployError) -> &str {
    match e {
        DeployError::Env { var, .. } => var,
        other => panic!("not an environment error: {other}"),
    }
}

fn row(a: &Assignment) -> (Role, u32, u32) {
    (a.task.role, a.task.dc, a.task.rank)
}

fn ep(host: &str, port: u16) -> Option<Endpoint> {
    Some(Endpoint {
        host: host.into(),
        port,
    })
}

fn check_golden(name: &str, rows: &[Assignment]) {
    let got: Vec<_> = rows.iter().map(row).collect();
    assert_eq!(got, GOLDEN, "{name}");
    for (i, a) in rows.iter().enumerate() {
        assert_eq!((a.tier, a.index), TIERS[i], "{name} task {i}");
        assert_eq!(a.flat, i, "{name} task {i}");
    }
}

#[test]
fn slurm_one_allocation() {
    let rows: Vec<_> = (0..8)
        .map(|i| {
            let node = if i < 4 { "node01" } else { "node02" };
            run(&env(&[
                ("SLURM_PROCID", i.to_string()),
                ("SLURM_NTASKS", "8".into()),
                ("SLURM_JOB_ID", "1234".into()),
                ("SLURM_JOB_NODELIST", "node[01-04,07]".into()),
                ("SLURM_STEP_NODELIST", "node[01-02]".into()),
                ("SLURM_LOCALID", (i % 4).to_string()),
                ("SLURMD_NODENAME", node.into()),
            ]))
        })
        .collect();
    check_golden("slurm", &rows);
    for (i, a) in rows.iter().enumerate() {
        assert_eq!(a.launcher, Launcher::Slurm);
        assert_eq!(a.coordinator, ep("node01", 21234), "task {i}");
        assert_eq!(a.local_rank, (i % 4) as u32);
    }
    // Without a step list, the allocation's first node.
    let a = run(&env(&[
        ("SLURM_PROCID", "3".into()),
        ("SLURM_NTASKS", "8".into()),
        ("SLURM_JOB_ID", "7".into()),
        ("SLURM_JOB_NODELIST", "a[1-2]-ib,b3".into()),
    ]));
    assert_eq!(a.coordinator, ep("a1-ib", 20007));
    assert_eq!(
        a.to_string(),
        "slurm task 3 (tier 0, index 1) is worker (dc 0, rank 0), coordinator a1-ib:20007, local \
         rank 0"
    );
}

/// The variables Slurm 22.05 sets in `srun --het-group=0-2` over a 3-component job (captured
/// from a real run): `SLURM_PROCID` counts over all components.
fn het_env(procid: usize) -> Env {
    env(&[
        ("SLURM_PROCID", procid.to_string()),
        ("SLURM_NTASKS", "8".into()),
        ("SLURM_JOB_ID", "1".into()),
        ("SLURM_HET_SIZE", "3".into()),
        ("SLURM_NTASKS_HET_GROUP_0", "2".into()),
        ("SLURM_NTASKS_HET_GROUP_1", "3".into()),
        ("SLURM_NTASKS_HET_GROUP_2", "3".into()),
        ("SLURM_JOB_NODELIST_HET_GROUP_0", "n0".into()),
        ("SLURM_JOB_NODELIST_HET_GROUP_1", "n1".into()),
        ("SLURM_JOB_NODELIST_HET_GROUP_2", "n2".into()),
        ("SLURM_JOB_NODELIST", "n[0-2]".into()),
        ("SLURM_STEP_NODELIST", "n[0-2]".into()),
        (
            "SLURM_LOCALID",
            [0, 1, 0, 1, 2, 0, 1, 2][procid].to_string(),
        ),
        (
            "SLURMD_NODENAME",
            ["n0", "n0", "n1", "n1", "n1", "n2", "n2", "n2"][procid].into(),
        ),
    ])
}

#[test]
fn slurm_heterogeneous_job_one_component_per_tier() {
    let rows: Vec<_> = (0..8).map(|i| run(&het_env(i))).collect();
    check_golden("slurm het", &rows);
    for a in &rows {
        assert_eq!(a.coordinator, ep("n0", 20001));
    }
    assert_eq!(rows[4].local_rank, 2);

    // Component sizes must be the tiers' sizes.
    let mut e = het_env(3);
    e.insert("SLURM_NTASKS_HET_GROUP_1".into(), "4".into());
    e.insert("SLURM_NTASKS".into(), "9".into());
    let x = err(&e);
    assert_eq!(var_of(&x), "SLURM_NTASKS_HET_GROUP_1");
    assert!(x.to_string().contains("4, expected 3"), "{x}");
    // One component per DC plus the central tier.
    let mut e = het_env(0);
    e.insert("SLURM_HET_SIZE".into(), "2".into());
    let x = err(&e);
    assert_eq!(var_of(&x), "SLURM_HET_SIZE");
    assert!(x.to_string().contains("2, expected 3"), "{x}");
    // A step over one component only (SLURM_PROCID would restart at 0 in each).
    let mut e = het_env(1);
    e.insert("SLURM_NTASKS".into(), "3".into());
    let x = err(&e);
    assert_eq!(var_of(&x), "SLURM_NTASKS");
    assert!(x.to_string().contains("--het-group=0-2"), "{x}");
    // The coordinator checks it runs where the others look for it.
    let mut e = het_env(0);
    e.insert("SLURMD_NODENAME".into(), "n1".into());
    let x = err(&e);
    assert_eq!(var_of(&x), "SLURMD_NODENAME");
    assert!(x.to_string().contains("expected \"n0\""), "{x}");
}

fn k8s_env(tier: &str, index: usize) -> Env {
    env(&[
        ("JOB_COMPLETION_INDEX", index.to_string()),
        ("GEOMX_TIER", tier.into()),
        (
            "GEOMX_COORDINATOR",
            "geomx-central-0.geomx-central:9092".into(),
        ),
        ("GEOMX_BIND_HOST", "10.1.2.3".into()),
    ])
}

#[test]
fn kubernetes_indexed_jobs_one_per_tier() {
    let rows: Vec<_> = TIERS
        .iter()
        .map(|(t, i)| run(&k8s_env(&t.to_string(), *i)))
        .collect();
    check_golden("indexed job", &rows);
    for a in &rows {
        assert_eq!(a.launcher, Launcher::IndexedJob);
        assert_eq!(a.coordinator, ep("geomx-central-0.geomx-central", 9092));
        assert_eq!(a.bind_host.as_deref(), Some("10.1.2.3"));
        assert_eq!(a.local_rank, 0);
    }
    // One Indexed Job over the whole job: the completion index is the flat index.
    let rows: Vec<_> = (0..8)
        .map(|i| {
            let mut e = k8s_env("", i);
            e.remove("GEOMX_TIER");
            run(&e)
        })
        .collect();
    check_golden("one indexed job", &rows);
    // The coordinator needs no address of its own: it binds its pod IP on the default port.
    let a = run(&env(&[
        ("JOB_COMPLETION_INDEX", "0".into()),
        ("GEOMX_TIER", "central".into()),
    ]));
    assert_eq!(a.task.role, Role::Coordinator);
    assert_eq!((a.coordinator.clone(), a.coordinator_port), (None, 9092));
}

#[test]
fn jobset_replicated_jobs() {
    let rows: Vec<_> = TIERS
        .iter()
        .map(|(t, i)| {
            let (rjob, job_index) = match t {
                Tier::Central => ("central", 0),
                Tier::Dc(d) => ("dc", *d),
            };
            run(&env(&[
                ("JOBSET_NAME", "gx".into()),
                ("JOBSET_REPLICATED_JOB", rjob.into()),
                ("JOBSET_JOB_INDEX", job_index.to_string()),
                ("JOB_COMPLETION_INDEX", i.to_string()),
            ]))
        })
        .collect();
    check_golden("jobset", &rows);
    for a in &rows {
        assert_eq!(a.launcher, Launcher::JobSet);
        assert_eq!(a.coordinator, ep("gx-central-0-0.gx", 9092));
    }
    let x = err(&env(&[
        ("JOBSET_NAME", "gx".into()),
        ("JOBSET_REPLICATED_JOB", "workers".into()),
        ("JOB_COMPLETION_INDEX", "0".into()),
    ]));
    assert_eq!(var_of(&x), "JOBSET_REPLICATED_JOB");
    assert!(
        x.to_string().contains("expected \"central\" or \"dc\""),
        "{x}"
    );
}

#[test]
fn leader_worker_set_groups() {
    let rows: Vec<_> = TIERS
        .iter()
        .map(|(t, i)| {
            let mut e = env(&[
                ("LWS_WORKER_INDEX", i.to_string()),
                ("LWS_GROUP_INDEX", t.position().to_string()),
                (
                    "LWS_GROUP_SIZE",
                    if *t == Tier::Central { "2" } else { "3" }.into(),
                ),
                (
                    "LWS_LEADER_ADDRESS",
                    format!("gx-{}.gx.default", t.position()),
                ),
            ]);
            if *t != Tier::Central {
                // The DC groups' leaders are local servers: they are told where the coordinator is.
                e.insert("GEOMX_COORDINATOR".into(), "gx-0.gx.default:9092".into());
            }
            run(&e)
        })
        .collect();
    check_golden("lws", &rows);
    for a in &rows {
        assert_eq!(a.launcher, Launcher::Lws);
        // The central group's leader is the coordinator.
        assert_eq!(a.coordinator, ep("gx-0.gx.default", 9092));
    }
    // GEOMX_TIER names the tier of a LeaderWorkerSet per tier.
    let a = run(&env(&[
        ("LWS_WORKER_INDEX", "2".into()),
        ("LWS_GROUP_SIZE", "3".into()),
        ("GEOMX_TIER", "1".into()),
        ("GEOMX_COORDINATOR", "c:1".into()),
    ]));
    assert_eq!(row(&a), GOLDEN[7]);
}

#[test]
fn torchrun_ranks() {
    let rows: Vec<_> = (0..8)
        .map(|i| {
            run(&env(&[
                ("RANK", i.to_string()),
                ("WORLD_SIZE", "8".into()),
                ("LOCAL_RANK", (i % 3).to_string()),
                ("MASTER_ADDR", "trainer-0".into()),
                ("MASTER_PORT", "29500".into()),
                ("TORCHELASTIC_USE_AGENT_STORE", "True".into()),
            ]))
        })
        .collect();
    check_golden("torchrun", &rows);
    for (i, a) in rows.iter().enumerate() {
        assert_eq!(a.launcher, Launcher::Torchrun);
        // torchrun's agent holds MASTER_PORT for its own store: the coordinator takes the next.
        assert_eq!(a.coordinator, ep("trainer-0", 29501));
        assert_eq!(a.local_rank, (i % 3) as u32);
    }
    // Without the agent (a PyTorchJob starting the processes itself), MASTER_PORT as it is.
    let a = run(&env(&[
        ("RANK", "5".into()),
        ("WORLD_SIZE", "8".into()),
        ("MASTER_ADDR", "10.0.0.1".into()),
        ("MASTER_PORT", "23456".into()),
    ]));
    assert_eq!(a.coordinator, ep("10.0.0.1", 23456));
    let x = err(&env(&[
        ("RANK", "1".into()),
        ("WORLD_SIZE", "8".into()),
        ("MASTER_ADDR", "m".into()),
        ("MASTER_PORT", "65535".into()),
        ("TORCHELASTIC_USE_AGENT_STORE", "True".into()),
    ]));
    assert_eq!(var_of(&x), "MASTER_PORT");
    // A missing MASTER_ADDR is a missing coordinator.
    let x = err(&env(&[("RANK", "1".into()), ("WORLD_SIZE", "8".into())]));
    assert_eq!(var_of(&x), "GEOMX_COORDINATOR");
}

#[test]
fn more_tasks_than_roles_is_an_error_naming_the_count() {
    let x = err(&env(&[
        ("SLURM_PROCID", "8".into()),
        ("SLURM_NTASKS", "9".into()),
        ("SLURM_JOB_NODELIST", "vm".into()),
    ]));
    assert_eq!(
        x.to_string(),
        "SLURM_NTASKS: 9, expected 8 (the job file has 8 processes: 1 coordinator, 1 global \
         server, 2 local servers, 4 workers)"
    );
    let x = err(&env(&[("RANK", "0".into()), ("WORLD_SIZE", "4".into())]));
    assert_eq!(var_of(&x), "WORLD_SIZE");
    assert!(
        x.to_string().starts_with("WORLD_SIZE: 4, expected 8"),
        "{x}"
    );
    let x = err(&env(&[
        ("SLURM_PROCID", "8".into()),
        ("SLURM_NTASKS", "8".into()),
    ]));
    assert_eq!(var_of(&x), "SLURM_PROCID");
    assert!(x.to_string().contains("8, expected below 8"), "{x}");
    let x = err(&env(&[("JOB_COMPLETION_INDEX", "8".into())]));
    assert_eq!(var_of(&x), "JOB_COMPLETION_INDEX");
    let mut e = k8s_env("0", 3);
    e.remove("GEOMX_BIND_HOST");
    let x = err(&e);
    assert_eq!(
        x.to_string(),
        "JOB_COMPLETION_INDEX: 3, expected below 3 (tier 0 has 3 processes: data center \"dc0\"'s \
         local server and 2 worker(s); set its completions to 3)"
    );
    let x = err(&k8s_env("2", 0));
    assert_eq!(var_of(&x), "GEOMX_TIER");
    let x = err(&k8s_env("dc0", 0));
    assert_eq!(
        x.to_string(),
        "GEOMX_TIER: \"dc0\", expected \"central\" or a data-center index"
    );
    let x = err(&env(&[
        ("LWS_WORKER_INDEX", "0".into()),
        ("LWS_GROUP_SIZE", "4".into()),
        ("GEOMX_TIER", "1".into()),
        ("GEOMX_COORDINATOR", "c:1".into()),
    ]));
    assert_eq!(var_of(&x), "LWS_GROUP_SIZE");
    assert!(x.to_string().contains("4, expected 3"), "{x}");
}

#[test]
fn a_missing_coordinator_is_an_error_not_a_wait() {
    let mut e = k8s_env("1", 2);
    e.remove("GEOMX_COORDINATOR");
    let x = err(&e);
    assert_eq!(var_of(&x), "GEOMX_COORDINATOR");
    assert!(
        x.to_string()
            .contains("expected the coordinator's HOST:PORT"),
        "{x}"
    );
    let x = err(&env(&[
        ("LWS_WORKER_INDEX", "0".into()),
        ("LWS_GROUP_SIZE", "3".into()),
        ("LWS_GROUP_INDEX", "1".into()),
        ("LWS_LEADER_ADDRESS", "gx-1.gx".into()),
    ]));
    assert_eq!(var_of(&x), "GEOMX_COORDINATOR");
    let x = err(&env(&[
        ("SLURM_PROCID", "2".into()),
        ("SLURM_NTASKS", "8".into()),
    ]));
    assert_eq!(var_of(&x), "GEOMX_COORDINATOR");
    let x = err(&env(&[
        ("JOB_COMPLETION_INDEX", "3".into()),
        ("GEOMX_COORDINATOR", "no-port".into()),
    ]));
    assert_eq!(
        x.to_string(),
        "GEOMX_COORDINATOR: \"no-port\", expected HOST:PORT"
    );
}

#[test]
fn two_launchers_at_once_need_geomx_launcher() {
    let mut e = env(&[
        ("SLURM_PROCID", "1".into()),
        ("SLURM_NTASKS", "8".into()),
        ("SLURM_JOB_NODELIST", "vm".into()),
        ("RANK", "3".into()),
        ("WORLD_SIZE", "8".into()),
        ("MASTER_ADDR", "m".into()),
    ]);
    let x = detect(&e).unwrap_err();
    assert_eq!(
        x.to_string(),
        "GEOMX_LAUNCHER: not set, but variables of 2 launchers are present (SLURM_PROCID for \
         slurm, RANK/WORLD_SIZE for torchrun); expected one of slurm, torchrun to say which one \
         started this process"
    );
    e.insert("GEOMX_LAUNCHER".into(), "torchrun".into());
    let a = run(&e);
    assert_eq!((a.launcher, row(&a)), (Launcher::Torchrun, GOLDEN[3]));
    e.insert("GEOMX_LAUNCHER".into(), "slurm".into());
    assert_eq!(run(&e).flat, 1);
    e.insert("GEOMX_LAUNCHER".into(), "pbs".into());
    let x = detect(&e).unwrap_err();
    assert_eq!(
        x.to_string(),
        "GEOMX_LAUNCHER: \"pbs\", expected one of slurm, k8s, jobset, lws, torchrun, dmlc"
    );
    // A JobSet's pods carry JOB_COMPLETION_INDEX too: that is one launcher.
    let e = env(&[
        ("JOBSET_NAME", "gx".into()),
        ("JOB_COMPLETION_INDEX", "0".into()),
    ]);
    assert_eq!(detect(&e).unwrap(), Launcher::JobSet);
    let x = detect(&env(&[("PATH", "/bin".into())])).unwrap_err();
    assert_eq!(var_of(&x), "GEOMX_LAUNCHER");
    assert!(x.to_string().contains("SLURM_PROCID (slurm)"), "{x}");
    assert_eq!(
        detect(&env(&[("DMLC_ROLE", "worker".into())])).unwrap(),
        Launcher::Dmlc
    );
}

#[test]
fn explicit_addresses_override_the_conventions() {
    let base = [
        ("SLURM_PROCID", "2".to_string()),
        ("SLURM_NTASKS", "8".into()),
        ("SLURM_JOB_ID", "99".into()),
        ("SLURM_JOB_NODELIST", "node[01-02]".into()),
    ];
    let mut e = env(&base);
    assert_eq!(run(&e).coordinator, ep("node01", 20099));
    e.insert("GEOMX_COORDINATOR_PORT".into(), "4000".into());
    assert_eq!(run(&e).coordinator, ep("node01", 4000));
    e.insert("GEOMX_COORDINATOR".into(), "[fd00::1]:5000".into());
    assert_eq!(run(&e).coordinator, ep("fd00::1", 5000));
    assert_eq!(run(&e).coordinator.unwrap().to_string(), "[fd00::1]:5000");
    // The job file's fixed address, then its base port.
    let mut c = cfg();
    c.cluster.coordinator = Some("head:6000".into());
    let e = env(&base);
    assert_eq!(
        assign(&c, &e, Launcher::Slurm).unwrap().coordinator,
        ep("head", 6000)
    );
    c.cluster.coordinator = None;
    c.cluster.base_port = 7000;
    assert_eq!(
        assign(&c, &e, Launcher::Slurm).unwrap().coordinator,
        ep("node01", 7000)
    );
}

#[test]
fn endpoints_parse() {
    assert_eq!(Endpoint::parse("h:1"), ep("h", 1));
    assert_eq!(Endpoint::parse("[::1]:2"), ep("::1", 2));
    for bad in ["h", ":1", "h:", "h:70000", "::1:2", "[::1]2", "h:x"] {
        assert_eq!(Endpoint::parse(bad), None, "{bad:?}");
    }
}
