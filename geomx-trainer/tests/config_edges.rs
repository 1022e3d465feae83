//! Bad configuration never crashes a process: every scalar field of the default configuration
//! and of every example is set, one at a time, to edge values (0, -1, huge integers, NaN and
//! infinities, empty strings, flipped booleans, odd arrays). Parsing and validation must not
//! panic and must name a real field when they refuse; an accepted configuration must resolve to
//! a job (`JobSpec::from_config`: data, model, placement) or be refused, again without a panic.
//! Overflow checks are on in the test profile, so an unchecked size product fails here.

use std::panic::{catch_unwind, AssertUnwindSafe};

use geomx_trainer::config::{Config, ConfigError};
use geomx_trainer::hips::{JobSpec, RunError};
use toml::Value;

/// One step of a path into a TOML document.
#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Index(usize),
}

/// The scalar (or scalar array) leaves of `v` under `at`: (dotted path, steps).
fn leaves(v: &Value, at: (String, Vec<Step>), out: &mut Vec<(String, Vec<Step>)>) {
    let (path, steps) = at;
    let child = |s: Step, p: String| {
        let mut steps = steps.clone();
        steps.push(s);
        (p, steps)
    };
    match v {
        Value::Table(t) => {
            for (k, x) in t {
                leaves(x, child(Step::Key(k.clone()), format!("{path}.{k}")), out);
            }
        }
        Value::Array(a) if a.iter().any(Value::is_table) => {
            for (i, x) in a.iter().enumerate() {
                leaves(x, child(Step::Index(i), format!("{path}[{i}]")), out);
            }
        }
        _ => out.push((path, steps)),
    }
}

fn at<'a>(v: &'a mut Value, steps: &[Step]) -> &'a mut Value {
    steps.iter().fold(v, |cur, s| match s {
        Step::Key(k) => &mut cur[k.as_str()],
        Step::Index(i) => &mut cur[*i],
    })
}

/// The edge values tried in place of `v`.
fn edges(v: &Value) -> Vec<Value> {
    let ints = [0i64, 1, -1, 65_536, 1 << 32, 1 << 40, i64::MAX].map(Value::Integer);
    let floats = [
        0.0,
        -1.0,
        1e-300,
        1e12,
        1e300,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ]
    .map(Value::Float);
    match v {
        Value::Integer(_) => ints.to_vec(),
        Value::Float(_) => floats.to_vec(),
        Value::String(_) => vec![Value::String(String::new()), Value::String("zzz".into())],
        Value::Boolean(b) => vec![Value::Boolean(!b)],
        Value::Array(_) => std::iter::once(Value::Array(vec![]))
            .chain(
                ints.into_iter()
                    .chain(floats)
                    .map(|x| Value::Array(vec![x])),
            )
            .chain([Value::Array(vec![Value::String(String::new())])])
            .collect(),
        _ => vec![],
    }
}

/// A synthetic data set this large is valid but takes minutes and gigabytes to generate.
fn big_synthetic(path: &str, v: &Value) -> bool {
    path.starts_with(".data.synthetic") && v.as_integer().is_some_and(|i| i >= 65_536)
}

/// Checks that a refusal names a field of the document's top-level sections.
fn names_a_field(field: &str, doc: &Value, what: &str) -> Result<(), String> {
    let top = field.split(['.', '[']).next().unwrap_or_default();
    match doc.get(top) {
        Some(_) => Ok(()),
        None => Err(format!("{what}: refused naming {field:?}, not a field")),
    }
}

/// Tries every edge value of every leaf of `base`; returns what went wrong.
fn try_edges(name: &str, base: &Config) -> Vec<String> {
    let doc: Value = toml::from_str(&base.to_toml_string().unwrap()).unwrap();
    let mut paths = Vec::new();
    leaves(&doc, (String::new(), Vec::new()), &mut paths);
    let mut failures = Vec::new();
    for (path, steps) in paths {
        for edge in edges(at(&mut doc.clone(), &steps)) {
            let what = format!("{name}: {path} = {edge}");
            let mut d = doc.clone();
            *at(&mut d, &steps) = edge.clone();
            let text = toml::to_string(&d).unwrap();
            let cfg = match catch_unwind(|| Config::from_toml_str(&text)) {
                Err(_) => {
                    failures.push(format!("{what}: parsing or validation panicked"));
                    continue;
                }
                Ok(Err(ConfigError::Invalid { field, .. })) => {
                    failures.extend(names_a_field(&field, &doc, &what).err());
                    continue;
                }
                Ok(Err(_)) => continue,
                Ok(Ok(cfg)) => cfg,
            };
            if big_synthetic(&path, &edge) {
                continue;
            }
            let job = catch_unwind(AssertUnwindSafe(|| {
                let _ = cfg.config_hash();
                JobSpec::from_config(&cfg).map(drop)
            }));
            match job {
                Err(_) => failures.push(format!("{what}: resolving the job panicked")),
                Ok(Err(RunError::Config(ConfigError::Invalid { field, .. }))) => {
                    failures.extend(names_a_field(&field, &doc, &what).err());
                }
                Ok(_) => {}
            }
        }
    }
    failures
}

#[test]
fn edge_values_in_every_field_are_refused_by_name_or_run_never_a_panic() {
    let mut bases = vec![("default".to_string(), Config::default())];
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    for p in files {
        // The libtorch examples validate only in a build with the `tch` feature.
        match Config::load(&p) {
            Ok(c) => bases.push((p.file_name().unwrap().to_string_lossy().into_owned(), c)),
            Err(e) => println!("skipping {}: {e}", p.display()),
        }
    }
    assert!(bases.len() >= 10, "the examples were found");
    let failures: Vec<String> = std::thread::scope(|s| {
        let runs: Vec<_> = bases
            .iter()
            .map(|(name, base)| s.spawn(|| try_edges(name, base)))
            .collect();
        runs.into_iter()
            .flat_map(|r| r.join().unwrap_or_else(|_| vec!["a run panicked".into()]))
            .collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The `DMLC_*` variables `Config::from_dmlc_env` maps (and ours), with the values of a global
/// server, a local server and a worker of a two-DC job.
fn dmlc_bases() -> Vec<Vec<(&'static str, &'static str)>> {
    let common = [
        ("DMLC_PS_GLOBAL_ROOT_URI", "127.0.0.1"),
        ("DMLC_PS_GLOBAL_ROOT_PORT", "9092"),
        ("DMLC_NUM_GLOBAL_SERVER", "1"),
        ("DMLC_NUM_GLOBAL_WORKER", "2"),
        ("DMLC_NUM_ALL_WORKER", "4"),
        ("DMLC_PS_ROOT_URI", "127.0.0.1"),
        ("DMLC_PS_ROOT_PORT", "9094"),
        ("DMLC_NUM_SERVER", "1"),
        ("DMLC_NUM_WORKER", "2"),
        ("PS_VERBOSE", "1"),
        ("DMLC_INTERFACE", "eth0"),
        ("DMLC_NODE_HOST", "10.0.0.7"),
        ("PORT", "9300"),
        ("DMLC_ENABLE_CENTRAL_WORKER", "0"),
        ("MXNET_KVSTORE_BIGARRAY_BOUND", "1000000"),
        ("GEOMX_DC", "1"),
        ("GEOMX_RANK", "0"),
    ];
    [
        ("DMLC_ROLE_GLOBAL", "global_server"),
        ("DMLC_ROLE", "server"),
        ("DMLC_ROLE", "worker"),
    ]
    .into_iter()
    .map(|role| common.iter().copied().chain([role]).collect())
    .collect()
}

#[test]
fn edge_values_in_every_dmlc_variable_are_refused_by_name_or_run_never_a_panic() {
    let values = [
        "",
        " ",
        "0",
        "1",
        "-1",
        "65536",
        "65537",
        "4294967296",
        "18446744073709551615",
        "99999999999999999999999",
        "1e9",
        "nan",
        "zzz",
        "::1",
        "[::1]:1",
    ];
    let mut failures = Vec::new();
    for base in dmlc_bases() {
        let names: Vec<&str> = base.iter().map(|(k, _)| *k).collect();
        for (var, _) in &base {
            for value in values {
                let mut env: std::collections::HashMap<String, String> = base
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                env.insert(var.to_string(), value.to_string());
                let what = format!("{} with {var} = {value:?}", base.last().unwrap().1);
                let cfg = match catch_unwind(|| Config::from_dmlc_env(&env)) {
                    Err(_) => {
                        failures.push(format!("{what}: mapping the variables panicked"));
                        continue;
                    }
                    Ok(Err(ConfigError::Env { var: named, .. })) => {
                        // Without its global role a process's role is DMLC_ROLE's.
                        let known = named == "DMLC_*"
                            || named.starts_with("DMLC_ROLE")
                            || names.contains(&named.as_str());
                        if !known {
                            failures.push(format!("{what}: refused naming {named:?}"));
                        }
                        continue;
                    }
                    Ok(Err(e)) => {
                        failures.push(format!("{what}: refused with no variable named: {e}"));
                        continue;
                    }
                    Ok(Ok((cfg, _))) => cfg,
                };
                let job = catch_unwind(AssertUnwindSafe(|| JobSpec::from_config(&cfg).map(drop)));
                if job.is_err() {
                    failures.push(format!("{what}: resolving the job panicked"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
