//! The configurations `ferry bench` compares: each the documented default migration policy of
//! a platform operators use today, applied to the same QEMU so that only the policy differs.
//! Sources (read 2026-11-26) are cited in docs/PERFORMANCE.md; the numbers below are theirs.

use std::time::Duration;

use ferry_migrate::plan::{self, PlanInputs};
use ferry_migrate::{Bandwidth, ControlPolicy, MigrationParams, TimeoutAction};

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
    /// Ferry's auto policy: measured, predicted, chosen, escalated.
    FerryAuto,
}

pub const ALL: [Config; 6] = [
    Config::QemuDefaults,
    Config::Virsh,
    Config::Nova,
    Config::KubeVirt,
    Config::Proxmox,
    Config::FerryAuto,
];

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
        }
    }

    pub fn parse(s: &str) -> Option<Config> {
        ALL.into_iter().find(|c| c.name() == s)
    }

    /// The engine parameters of this configuration; every one runs on plain TCP with QEMU's
    /// announce defaults.
    pub fn params(self, ctx: &Context) -> (MigrationParams, Option<String>) {
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
            Config::FerryAuto => {
                // The lab scale applies to the per-GiB rule; the plan's own floor (a number
                // of full copies at link speed) is physics and stays.
                let inputs = PlanInputs {
                    ram_bytes: ctx.ram_bytes,
                    dirty_rate_bps: ctx.dirty_rate_bps,
                    link_bps: Some(ctx.link_bps),
                    host_cpus: ctx.host_cpus,
                    guest_vcpus: ctx.guest_vcpus,
                    downtime_ms: None,
                    postcopy_permitted: false,
                    budget: None,
                    budget_scale: ctx.time_scale,
                    timeout_action: TimeoutAction::Abort,
                    disk_bytes: 0,
                };
                let (params, plan) = plan::plan(&inputs, &MigrationParams::default());
                (params, Some(plan.summary()))
            }
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
        let (f, summary) = Config::FerryAuto.params(&ctx());
        assert!(f.auto_converge, "a guest writing 2x the link is armed");
        assert!(summary.unwrap().starts_with("plan:"));
        for c in ALL {
            c.params(&ctx()).0.validate().unwrap();
        }
    }
}
