//! The configurations `ferry bench` compares: each the documented default migration policy of
//! a platform operators use today, applied to the same QEMU so that only the policy differs.
//! Sources (read 2026-11-26) are cited in docs/PERFORMANCE.md; the numbers below are theirs.

use std::time::Duration;

use ferry_migrate::plan::{self, PlanInputs};
use ferry_migrate::{Bandwidth, ControlPolicy, MigrationParams, Plan, TimeoutAction};

/// One configuration of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Config {
    /// QEMU 7.2's own defaults: max-bandwidth 128 MiB/s, downtime-limit 300 ms, no
    /// capabilities, no timeout (migration/options.c, qapi/migration.json).
    QemuDefaults,
    /// `virsh migrate --live`: libvirt sets max-bandwidth to its maximum (unlimited), leaves
    /// downtime at 300 ms, no timeout (src/qemu/qemu_migration.c).
    Virsh,
    /// OpenStack Nova's libvirt driver: unlimited bandwidth; downtime stepped 50 -> 500 ms in
    /// 10 steps every 75 s x data_gb; abort after 800 s x data_gb; no auto-converge or
    /// post-copy (nova/conf/libvirt.py, nova/virt/libvirt/migration.py).
    Nova,
    /// KubeVirt (v1.5+): unlimited, multifd with 8 channels, downtime 300 ms; abort after
    /// 150 s per started GB of RAM or 150 s without a new low of remaining data
    /// (pkg/virt-config, pkg/virt-launcher live migration monitor).
    KubeVirt,
    /// Proxmox VE (qemu-server 9.2): 16 GiB/s cap, downtime 100 ms doubled after every 6
    /// polls (1 s) where remaining memory grew, auto-converge and XBZRLE (cache 10 % of RAM,
    /// rounded up to a power of two) on, no timeout (PVE/QemuMigrate.pm).
    Proxmox,
    /// Ferry's auto policy: measured, predicted, chosen, escalated; its streams over TLS with
    /// the migration's own certificates, as every Ferry migration.
    FerryAuto,
    /// The same without TLS: what encryption costs, side by side (issue 12).
    FerryAutoPlain,
    /// Ferry's auto policy with post-copy permitted (the user's choice: from then on a
    /// network failure pauses the guest until the link is back).
    FerryAutoPostcopy,
    /// Experiments on busy guests (issue 17, point 4), not in the default matrix: Ferry auto
    /// with the throttle at full strength as soon as QEMU engages it...
    FerryAutoHard,
    /// ...the same with two multifd channels compressing with zstd...
    FerryAutoHardZstd,
    /// ...and the same with XBZRLE, its cache sized to the set the guest rewrites in a pass.
    FerryAutoHardXbzrle,
    /// Ferry auto with post-copy permitted, its page requests on their own channel.
    FerryAutoPostcopyPreempt,
    /// The same with post-copy's background stream paced below the link, so that the link's
    /// queue stays short for the pages the guest asks for.
    FerryAutoPostcopyPaced,
}

/// The default matrix.
pub const ALL: [Config; 8] = [
    Config::QemuDefaults,
    Config::Virsh,
    Config::Nova,
    Config::KubeVirt,
    Config::Proxmox,
    Config::FerryAuto,
    Config::FerryAutoPlain,
    Config::FerryAutoPostcopy,
];

/// Configurations only run when named (`--configs`).
pub const EXPERIMENTS: [Config; 5] = [
    Config::FerryAutoHard,
    Config::FerryAutoHardZstd,
    Config::FerryAutoHardXbzrle,
    Config::FerryAutoPostcopyPreempt,
    Config::FerryAutoPostcopyPaced,
];

/// The paced variant's post-copy stream, as a share of the probed link.
const PACED_SHARE: f64 = 0.75;

/// The hard throttle of the experiments: from the first time QEMU throttles, the vCPU runs
/// 10 ms of every 200 (QEMU sleeps it p/(100-p) x 10 ms): a guest whose writing is paced
/// (not CPU-bound) is only slowed when little CPU is left to it, and a sleep of 190 ms keeps
/// its replies within the 300 ms target.
const HARD_THROTTLE_PCT: u8 = 95;

/// What a configuration is derived from, measured in the same run.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    pub ram_bytes: u64,
    pub link_bps: f64,
    pub dirty_rate_bps: Option<f64>,
    pub host_cpus: u32,
    pub guest_vcpus: u32,
    /// Lab budgets are the platforms' per-GiB budgets times this (see PERFORMANCE.md).
    pub time_scale: f64,
    /// What QEMU got through on this link in the run's earlier migrations, as the server
    /// learns it per host pair (Ferry auto's plan uses it).
    pub learned_rate_bps: Option<f64>,
    /// How far QEMU's pause ran past its last pages on this link in the run's earlier
    /// migrations, as the server learns it per host pair (the plan's expected pause).
    pub learned_switchover_ms: Option<f64>,
    /// The fastest rate QEMU got through from the source in the run's earlier migrations on
    /// any link, as the server keeps it per source host (a new pair's plan is bounded by it).
    pub source_rate_bps: Option<f64>,
}

impl Config {
    pub fn name(self) -> &'static str {
        match self {
            Config::QemuDefaults => "qemu-defaults",
            Config::Virsh => "virsh",
            Config::Nova => "nova",
            Config::KubeVirt => "kubevirt",
            Config::Proxmox => "proxmox",
            Config::FerryAuto => "ferry-auto",
            Config::FerryAutoPlain => "ferry-auto-plain",
            Config::FerryAutoPostcopy => "ferry-auto-postcopy",
            Config::FerryAutoHard => "ferry-auto-hard",
            Config::FerryAutoHardZstd => "ferry-auto-hard-zstd",
            Config::FerryAutoHardXbzrle => "ferry-auto-hard-xbzrle",
            Config::FerryAutoPostcopyPreempt => "ferry-auto-postcopy-preempt",
            Config::FerryAutoPostcopyPaced => "ferry-auto-postcopy-paced",
        }
    }

    pub fn parse(s: &str) -> Option<Config> {
        ALL.into_iter().chain(EXPERIMENTS).find(|c| c.name() == s)
    }

    /// Ferry's auto policy or a variant of it: the dirty rate is measured for its plan.
    pub fn is_ferry(self) -> bool {
        matches!(
            self,
            Config::FerryAuto
                | Config::FerryAutoPlain
                | Config::FerryAutoPostcopy
                | Config::FerryAutoHard
                | Config::FerryAutoHardZstd
                | Config::FerryAutoHardXbzrle
                | Config::FerryAutoPostcopyPreempt
                | Config::FerryAutoPostcopyPaced
        )
    }

    /// Whether its streams run over TLS: Ferry's, as every Ferry migration, except the plain
    /// column that shows what encryption costs; the platforms' as they ship (plain TCP).
    pub fn encrypted(self) -> bool {
        self.is_ferry() && self != Config::FerryAutoPlain
    }

    /// The engine parameters of this configuration, and the plan behind them (Ferry auto);
    /// every one runs with QEMU's announce defaults.
    pub fn params(self, ctx: &Context) -> (MigrationParams, Option<Plan>) {
        let base = MigrationParams {
            announce: None,
            policy: ControlPolicy::Fixed,
            ..MigrationParams::default()
        };
        let gib = ctx.ram_bytes as f64 / (1u64 << 30) as f64;
        let scaled = |secs: f64| Duration::from_secs_f64(secs * ctx.time_scale);
        match self {
            Config::QemuDefaults => (
                MigrationParams {
                    bandwidth: Bandwidth::Limited(128 << 20),
                    ..base
                },
                None,
            ),
            Config::Virsh => (base, None),
            Config::Nova => {
                // data_gb = max(2, RAM GiB) on shared storage.
                let data_gb = gib.max(2.0);
                (
                    MigrationParams {
                        downtime_limit_ms: 50,
                        policy: ControlPolicy::DowntimeSteps {
                            max_ms: 500,
                            steps: 10,
                            delay_ms: scaled(75.0 * data_gb).as_millis() as u64,
                        },
                        completion_timeout: Some(scaled(800.0 * data_gb)),
                        ..base
                    },
                    None,
                )
            }
            Config::KubeVirt => {
                let started_gb = (ctx.ram_bytes as f64 / 1e9).ceil();
                (
                    MigrationParams {
                        multifd_channels: Some(8),
                        policy: ControlPolicy::ProgressTimeout {
                            timeout_ms: scaled(150.0).as_millis() as u64,
                        },
                        completion_timeout: Some(scaled(150.0 * started_gb)),
                        ..base
                    },
                    None,
                )
            }
            Config::Proxmox => (
                MigrationParams {
                    bandwidth: Bandwidth::Limited(16 << 30),
                    downtime_limit_ms: 100,
                    auto_converge: true,
                    xbzrle_cache_bytes: Some((ctx.ram_bytes / 10).next_power_of_two()),
                    policy: ControlPolicy::DoubleOnGrowth {
                        growths: 6,
                        poll_ms: 1000,
                    },
                    ..base
                },
                None,
            ),
            Config::FerryAuto
            | Config::FerryAutoPlain
            | Config::FerryAutoPostcopy
            | Config::FerryAutoHard
            | Config::FerryAutoHardZstd
            | Config::FerryAutoHardXbzrle
            | Config::FerryAutoPostcopyPreempt
            | Config::FerryAutoPostcopyPaced => {
                let postcopy = matches!(
                    self,
                    Config::FerryAutoPostcopy
                        | Config::FerryAutoPostcopyPreempt
                        | Config::FerryAutoPostcopyPaced
                );
                // The lab scale applies to the per-GiB rule; the plan's own floor (a number
                // of full copies at link speed) is physics and stays.
                let inputs = PlanInputs {
                    ram_bytes: ctx.ram_bytes,
                    dirty_rate_bps: ctx.dirty_rate_bps,
                    link_bps: Some(ctx.link_bps),
                    host_cpus: ctx.host_cpus,
                    guest_vcpus: ctx.guest_vcpus,
                    downtime_ms: None,
                    postcopy_permitted: postcopy,
                    budget: None,
                    budget_scale: ctx.time_scale,
                    timeout_action: if postcopy {
                        TimeoutAction::Postcopy
                    } else {
                        TimeoutAction::Abort
                    },
                    disk_bytes: 0,
                    learned_rate_bps: ctx.learned_rate_bps,
                    learned_switchover_ms: ctx.learned_switchover_ms,
                    source_rate_bps: ctx.source_rate_bps,
                };
                let (mut params, plan) = plan::plan(&inputs, &MigrationParams::default());
                self.experiment(&mut params, &plan, ctx);
                (params, Some(plan))
            }
        }
    }
}

impl Config {
    /// The experiments' changes to Ferry auto's plan, for a guest the plan throttles (others
    /// are left as planned).
    fn experiment(self, params: &mut MigrationParams, plan: &Plan, ctx: &Context) {
        if matches!(
            self,
            Config::FerryAutoPostcopyPreempt | Config::FerryAutoPostcopyPaced
        ) {
            params.postcopy_preempt = params.postcopy;
            if self == Config::FerryAutoPostcopyPaced && params.postcopy {
                params.postcopy_bandwidth = Some((ctx.link_bps * PACED_SHARE) as u64);
            }
            return;
        }
        if !params.auto_converge || !EXPERIMENTS.contains(&self) {
            return;
        }
        params.throttle_initial_pct = HARD_THROTTLE_PCT;
        params.throttle_increment_pct = 1;
        params.max_throttle_pct = HARD_THROTTLE_PCT;
        params.xbzrle_cache_bytes = None;
        match self {
            Config::FerryAutoHardZstd => {
                params.multifd_channels = Some(2);
                params.multifd_compression = Some("zstd".into());
            }
            Config::FerryAutoHardXbzrle => {
                // What the guest rewrites while one pass of its RAM is sent, at most its RAM.
                let pass_s = ctx.ram_bytes as f64 / plan.prediction.rate_bps.max(1.0);
                let rewritten = (plan.prediction.dirty_rate_bps * pass_s) as u64;
                params.xbzrle_cache_bytes = Some(
                    rewritten
                        .clamp(1 << 20, ctx.ram_bytes)
                        .next_power_of_two()
                        .min(ctx.ram_bytes.next_power_of_two()),
                );
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        Context {
            ram_bytes: 512 << 20,
            link_bps: 125e6,
            dirty_rate_bps: Some(250e6),
            host_cpus: 2,
            guest_vcpus: 1,
            time_scale: 0.05,
            learned_rate_bps: None,
            learned_switchover_ms: None,
            source_rate_bps: None,
        }
    }

    #[test]
    fn names_round_trip() {
        for c in ALL {
            assert_eq!(Config::parse(c.name()), Some(c));
        }
    }

    #[test]
    fn platform_defaults_are_encoded_as_documented() {
        let (q, _) = Config::QemuDefaults.params(&ctx());
        assert_eq!(q.bandwidth, Bandwidth::Limited(128 << 20));
        assert_eq!(q.downtime_limit_ms, 300);
        assert!(q.completion_timeout.is_none() && !q.auto_converge);
        let (n, _) = Config::Nova.params(&ctx());
        // 512 MiB: data_gb = 2, so 1600 s x 0.05 = 80 s and a step every 7.5 s.
        assert_eq!(n.completion_timeout, Some(Duration::from_secs(80)));
        assert_eq!(
            n.policy,
            ControlPolicy::DowntimeSteps {
                max_ms: 500,
                steps: 10,
                delay_ms: 7500
            }
        );
        let (k, _) = Config::KubeVirt.params(&ctx());
        assert_eq!(k.multifd_channels, Some(8));
        assert_eq!(k.completion_timeout, Some(Duration::from_millis(7500)));
        let (p, _) = Config::Proxmox.params(&ctx());
        assert_eq!(p.xbzrle_cache_bytes, Some(64 << 20));
        assert!(p.auto_converge);
        assert!(p.completion_timeout.is_none());
        let (f, plan) = Config::FerryAuto.params(&ctx());
        assert!(f.auto_converge, "a guest writing 2x the link is armed");
        assert!(plan.unwrap().summary().starts_with("plan:"));
        // What QEMU got through before is what Ferry auto plans with.
        let learned = Context {
            learned_rate_bps: Some(100e6),
            ..ctx()
        };
        let plan = Config::FerryAuto.params(&learned).1.unwrap();
        assert_eq!(plan.prediction.rate_bps, 100e6);
        assert_eq!(
            Config::Virsh.params(&learned).1,
            None,
            "no plan but Ferry's"
        );
        for c in ALL.into_iter().chain(EXPERIMENTS) {
            c.params(&ctx()).0.validate().unwrap();
        }
        let (pc, plan) = Config::FerryAutoPostcopy.params(&ctx());
        assert!(pc.postcopy && pc.auto_converge);
        assert!(plan
            .unwrap()
            .strategy
            .iter()
            .any(|s| s.contains("after the first pass")));
        let (hard, _) = Config::FerryAutoHardXbzrle.params(&ctx());
        assert_eq!(hard.throttle_initial_pct, 95);
        // 512 MiB at 62.5 MB/s (half the probe) takes 8.6 s, while the guest rewrites 250 MB/s:
        // the whole RAM.
        assert_eq!(hard.xbzrle_cache_bytes, Some(512 << 20));
        let (z, _) = Config::FerryAutoHardZstd.params(&ctx());
        assert_eq!(z.multifd_compression.as_deref(), Some("zstd"));
    }
}
