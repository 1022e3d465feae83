//! Command-line options of `geomx bench e2e` (flattened into `geomx bench`).

use std::path::PathBuf;

use super::scenario::MatrixParams;
use super::E2eOptions;
use crate::config::ShardStrategy;

/// Options of `geomx bench e2e`; the other benchmarks ignore them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct E2eArgs {
    /// e2e: WAN bandwidth of each data center, Mbit/s each way [default: 100].
    #[arg(long)]
    pub rate_mbit: Option<f64>,
    /// e2e: one-way WAN delay of each data center, ms [default: 50].
    #[arg(long)]
    pub delay_ms: Option<f64>,
    /// e2e: random loss probability on the WAN links [default: 0]. dgt: the only loss rate
    /// measured [default: 0.01, 0.05 and 0.10].
    #[arg(long)]
    pub loss: Option<f64>,
    /// e2e: run only these scenarios (comma-separated: flat, hips, hips-fp16, hips-bisparse,
    /// hips-mpq, hfa, hfa-diloco, hfa-bisparse, hfa-fp16, hfa-scaffold, hfa-fp16-scaffold,
    /// esync, mixed, dgt, dgt-fp16, isolated).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// e2e: WAN lab mode: off | netns | relay | auto [default: auto].
    #[arg(long)]
    pub wan: Option<String>,
    /// e2e: target test accuracy [default: 0.95; 0.90 with --quick].
    #[arg(long)]
    pub target: Option<f64>,
    /// e2e: wall-time cap per scenario, seconds [default: 420; 60 with --quick].
    #[arg(long)]
    pub cap_s: Option<f64>,
    /// e2e: rounds of the synchronous scenarios [default: 100; 60 with --quick]. dgt: measured
    /// rounds per series [default: 200; 8 with --quick].
    #[arg(long)]
    pub rounds: Option<u64>,
    /// e2e: HFA's local steps between LAN averagings [default: 5].
    #[arg(long)]
    pub hfa_k1: Option<u64>,
    /// e2e: HFA's LAN averagings between WAN exchanges [default: 2].
    #[arg(long)]
    pub hfa_k2: Option<u64>,
    /// e2e: test evaluation every this many rounds [default: 1].
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// e2e: how the digits are shared: by-class (each data center holds its own classes) or iid
    /// [default: by-class].
    #[arg(long, value_enum)]
    pub split: Option<SplitArg>,
    /// dgt: TCP congestion control of both transports' TCP connections; e2e: every scenario's
    /// `[transport] congestion_control`. E.g. cubic or bbr [default: the system's].
    #[arg(long)]
    pub congestion: Option<geomx_net::congestion::Algorithm>,
}

/// `--split`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitArg {
    /// Each data center holds a disjoint set of classes.
    ByClass,
    /// A seeded shuffle: every worker sees every class.
    Iid,
}

impl From<SplitArg> for ShardStrategy {
    fn from(s: SplitArg) -> Self {
        match s {
            SplitArg::ByClass => ShardStrategy::ByClass,
            SplitArg::Iid => ShardStrategy::Iid,
        }
    }
}

/// Default output folder.
pub const DEFAULT_OUT: &str = "e2e-results";

impl E2eArgs {
    /// The run these options describe: the full or quick matrix with the overrides applied.
    pub fn to_options(&self, quick: bool, out: Option<PathBuf>, command: String) -> E2eOptions {
        let mut p = if quick {
            MatrixParams::quick()
        } else {
            MatrixParams::full()
        };
        if let Some(v) = self.rate_mbit {
            p.wan.rate_mbit = v;
        }
        if let Some(v) = self.delay_ms {
            p.wan.delay_ms = v;
        }
        if let Some(v) = self.loss {
            p.wan.loss = v;
        }
        if let Some(v) = &self.wan {
            p.wan.mode = v.clone();
        }
        if let Some(v) = self.target {
            p.target_accuracy = v;
        }
        if let Some(v) = self.cap_s {
            p.cap_s = v;
        }
        if let Some(v) = self.rounds {
            p.rounds = v;
        }
        if let Some(v) = self.hfa_k1 {
            p.hfa_k1 = v;
        }
        if let Some(v) = self.hfa_k2 {
            p.hfa_k2 = v;
        }
        if let Some(v) = self.eval_every {
            p.eval_every = v;
        }
        if let Some(v) = self.split {
            p.split = v.into();
        }
        p.congestion = self.congestion.map(|a| a.to_string());
        E2eOptions {
            out: out.unwrap_or_else(|| PathBuf::from(DEFAULT_OUT)),
            params: p,
            only: self.only.clone(),
            exe: None,
            command,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: E2eArgs,
    }

    #[test]
    fn overrides_apply_on_the_chosen_size() {
        let t = T::parse_from([
            "t",
            "--rate-mbit",
            "50",
            "--delay-ms",
            "20",
            "--loss",
            "0.01",
            "--only",
            "flat,hips",
            "--wan",
            "relay",
            "--target",
            "0.9",
            "--split",
            "iid",
        ]);
        let o = t.a.to_options(false, None, "c".into());
        assert_eq!(o.out, PathBuf::from(DEFAULT_OUT));
        assert_eq!(o.params.wan.rate_mbit, 50.0);
        assert_eq!(o.params.wan.delay_ms, 20.0);
        assert_eq!(o.params.wan.loss, 0.01);
        assert_eq!(o.params.wan.mode, "relay");
        assert_eq!(o.params.target_accuracy, 0.9);
        assert_eq!(o.only, ["flat", "hips"]);
        assert_eq!(o.params.split, ShardStrategy::Iid);
        assert_eq!(o.params.hidden, MatrixParams::full().hidden);
        let q = T::parse_from(["t"])
            .a
            .to_options(true, Some("x".into()), "c".into());
        assert_eq!(q.params, MatrixParams::quick());
        assert_eq!(q.params.split, ShardStrategy::ByClass, "non-IID by default");
        assert_eq!(q.out, PathBuf::from("x"));
    }
}
