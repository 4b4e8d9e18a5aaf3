//! The CLI's table output, pinned as exact strings: a changed column is a visible diff here
//! before it breaks someone's `awk`.

use chrono::{DateTime, TimeZone, Utc};
use ferry_api::hosts::{Datastore, DatastoreMount, Host, HostFacts, HostState};
use ferry_api::instances::{BootSpec, Instance, InstanceSpec, InstanceState, NicSpec};
use ferry_api::migrations::{
    LogLine, Migration, MigrationKind, MigrationOptions, MigrationState, MigrationStats,
};
use ferry_api::ErrorBody;
use ferry_cli::error::{exit, render_error, CliError};
use ferry_cli::output::{self, Table};
use ferry_migrate::{Phase, Progress};
use uuid::Uuid;

fn t(s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, 1, 12, 0, 0).unwrap() + chrono::Duration::seconds(s.into())
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn host(name: &str, state: HostState, facts: bool) -> Host {
    Host {
        name: name.into(),
        agent_url: "http://127.0.0.1:7411".into(),
        enabled: state == HostState::Online,
        state,
        last_heartbeat: Some(t(0)),
        facts: facts.then(|| HostFacts {
            name: name.into(),
            cpu_vendor: "GenuineIntel".into(),
            cpu_model: "Xeon".into(),
            cpu_flags: vec!["sse2".into(), "avx".into()],
            cores: 2,
            ram_total_mib: 24064,
            ram_free_mib: 512,
            ram_reserve_mib: 0,
            accel: "tcg".into(),
            qemu_version: "7.2.0".into(),
            machine_types: vec!["pc".into()],
            firmware: vec!["bios".into()],
            datastores: vec![],
            networks: vec![],
            migration_addr: "10.78.0.11".into(),
            migration_ports: "49152-49215".into(),
            agent_version: "0.1.0".into(),
        }),
        instances: 1,
    }
}

fn instance() -> Instance {
    Instance {
        id: id(0xabcdef12_0000_0000_0000_000000000001),
        name: "vm1".into(),
        host: "hv1".into(),
        state: InstanceState::Running,
        generation: 3,
        spec: InstanceSpec {
            memory_mib: 2048,
            vcpus: 2,
            cpu_model: "qemu64".into(),
            machine: "pc".into(),
            boot: BootSpec {
                kernel: Some("/k".into()),
                initrd: Some("/i".into()),
                cmdline: "console=ttyS0".into(),
                ..BootSpec::default()
            },
            disks: vec![],
            nics: vec![NicSpec {
                network: "lab".into(),
                mac: "52:54:00:00:00:01".into(),
                ipv4: None,
                gateway: None,
            }],
        },
        migration: Some(id(0x12345678_9000_0000_0000_000000000000)),
        guest: Some(ferry_api::instances::GuestInfo {
            os: Some("Debian GNU/Linux 12 (bookworm)".into()),
            os_id: Some("debian".into()),
            kernel: Some("6.1.0-57-cloud-amd64".into()),
            agent_version: Some("7.2.0".into()),
            interfaces: vec![ferry_api::instances::GuestInterface {
                name: "ens4".into(),
                mac: Some("52:54:00:00:00:01".into()),
                addresses: vec!["10.77.0.100/24".into(), "fe80::5054:ff:fe00:1/64".into()],
            }],
            seen_at: t(60),
        }),
        warnings: vec![],
        created_at: t(0),
        updated_at: t(61),
    }
}

fn progress() -> Progress {
    Progress {
        phase: Phase::Precopy,
        elapsed_ms: 1500,
        percent: 42.25,
        transferred_bytes: 100 << 20,
        remaining_bytes: 150 << 20,
        total_bytes: 256 << 20,
        iteration: 2,
        throughput_bps: 812.0 * 1024.0 * 1024.0,
        dirty_rate_bps: 0.0,
        eta_ms: Some(1200),
        expected_downtime_ms: None,
        total_time_ms: None,
        downtime_ms: None,
        cpu_throttle_percent: None,
        disks: Vec::new(),
        revision: None,
    }
}

fn migration(state: MigrationState) -> Migration {
    let done = state == MigrationState::Completed;
    Migration {
        id: id(0x12345678_9000_0000_0000_000000000000),
        instance_id: instance().id,
        instance_name: "vm1".into(),
        kind: MigrationKind::Live,
        source: "hv1".into(),
        destination: "hv2".into(),
        state,
        options: MigrationOptions {
            bandwidth_mib_s: Some(100),
            auto_converge: true,
            ..MigrationOptions::default()
        },
        created_at: t(0),
        preparing_at: Some(t(1)),
        migrating_at: Some(t(2)),
        completing_at: done.then(|| t(3)),
        finished_at: done.then(|| t(3)),
        error: None,
        progress: Some(progress()),
        stats: done.then_some(MigrationStats {
            total_ms: 1500,
            qemu_pause_ms: 11,
            bytes_transferred: 300 << 20,
            iterations: 3,
        }),
        cancel_requested: false,
        plan: None,
        copies: vec![],
        cleaned_up_at: None,
        impact: None,
        qemu_settings: None,
    }
}

#[test]
fn table_pads_columns_and_trims_line_ends() {
    let mut table = Table::new(&["A", "LONG HEADER", "C"]);
    table.row(vec!["wide cell".into(), "x".into(), "".into()]);
    table.row(vec!["y".into(), "z".into(), "end".into()]);
    assert_eq!(
        table.render(),
        "A          LONG HEADER  C\n\
         wide cell  x\n\
         y          z            end"
    );
}

#[test]
fn hosts_table() {
    let hosts = [
        host("hv1", HostState::Online, true),
        host("hv2", HostState::Offline, false),
    ];
    assert_eq!(
        output::hosts_table(&hosts, t(75)),
        "NAME  STATE    ENABLED  INSTANCES  ACCEL  CORES  RAM FREE/TOTAL      MIGRATION ADDR  LAST SEEN\n\
         hv1   online   yes      1          tcg    2      512 MiB / 23.5 GiB  10.78.0.11      1m ago\n\
         hv2   offline  no       1          -      -      -                   -               1m ago"
    );
}

#[test]
fn datastores_table_shows_shared_storage_once_with_its_mounts() {
    let mount = |host: &str, path: &str| DatastoreMount {
        host: host.into(),
        path: path.into(),
        total_bytes: 100 << 30,
        free_bytes: 40 << 30,
    };
    let stores = [
        Datastore {
            name: "local".into(),
            identity: None,
            shared: false,
            total_bytes: 100 << 30,
            free_bytes: 40 << 30,
            mounts: vec![mount("hv1", "/srv/ferry")],
            problem: None,
        },
        Datastore {
            name: "nfs".into(),
            identity: Some("nfs-1".into()),
            shared: true,
            total_bytes: 1 << 40,
            free_bytes: 512 << 30,
            mounts: vec![mount("hv1", "/mnt/nfs"), mount("hv2", "/mnt/nfs")],
            problem: Some("hosts name this storage differently".into()),
        },
    ];
    assert_eq!(
        output::datastores_table(&stores),
        "NAME   SHARED  FREE/TOTAL                IDENTITY  MOUNTS\n\
         local  no      40.00 GiB / 100.00 GiB    -         hv1:/srv/ferry\n\
         nfs    yes     512.00 GiB / 1024.00 GiB  nfs-1     hv1:/mnt/nfs, hv2:/mnt/nfs\n\
         warning: datastore nfs: hosts name this storage differently"
    );
}

#[test]
fn instances_table_shortens_ids() {
    assert_eq!(
        output::instances_table(&[instance()]),
        "ID        NAME  HOST  STATE    GEN  MEMORY   VCPUS  MIGRATION\n\
         abcdef12  vm1   hv1   running  3    2.0 GiB  2      12345678"
    );
}

#[test]
fn instance_detail_shows_the_full_id() {
    let i = instance();
    let text = output::instance_detail(&i);
    eprintln!("{text}");
    assert!(
        text.starts_with(
            "id               abcdef12-0000-0000-0000-000000000001\nname             vm1\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("\nnics             lab (52:54:00:00:00:01)\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "\nguest os         Debian GNU/Linux 12 (bookworm), kernel 6.1.0-57-cloud-amd64\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("\nguest addresses  ens4: 10.77.0.100/24, fe80::5054:ff:fe00:1/64\n"),
        "{text}"
    );
    // A NIC with a static address from Ferry says so beside what the guest reports.
    let mut fixed = i.clone();
    fixed.spec.nics[0].ipv4 = Some("10.77.0.100/24".into());
    fixed.spec.nics[0].gateway = Some("10.77.0.1".into());
    let text = output::instance_detail(&fixed);
    assert!(
        text.contains(
            "\nnics             lab (52:54:00:00:00:01, static 10.77.0.100/24 via 10.77.0.1)\n"
        ),
        "{text}"
    );
}

#[test]
fn migrations_table() {
    let list = [
        migration(MigrationState::Migrating),
        migration(MigrationState::Completed),
    ];
    assert_eq!(
        output::migrations_table(&list),
        "ID        INSTANCE  KIND  FROM  TO   STATE      PROGRESS  QEMU PAUSE  CREATED\n\
         12345678  vm1       live  hv1   hv2  migrating  42%       -           2025-03-01 12:00:00\n\
         12345678  vm1       live  hv1   hv2  completed  100%      11 ms       2025-03-01 12:00:00"
    );
}

#[test]
fn migration_detail_of_a_completed_job() {
    assert_eq!(
        output::migration_detail(&migration(MigrationState::Completed)),
        "id            12345678-9000-0000-0000-000000000000\n\
         instance      vm1 (abcdef12-0000-0000-0000-000000000001)\n\
         kind          live\n\
         from          hv1\n\
         to            hv2\n\
         state         completed\n\
         options       bandwidth 100 MiB/s, policy auto, auto-converge\n\
         created       2025-03-01 12:00:00\n\
         preparing     2025-03-01 12:00:01\n\
         migrating     2025-03-01 12:00:02\n\
         completing    2025-03-01 12:00:03\n\
         finished      2025-03-01 12:00:03\n\
         total time    1.5 s\n\
         QEMU's pause  11 ms\n\
         transferred   300.0 MiB\n\
         iterations    3"
    );
}

#[test]
fn migration_detail_of_a_failed_job_shows_error_and_hint() {
    let mut m = migration(MigrationState::Failed);
    m.error = Some(ErrorBody::new(
        "cpu-incompatible",
        "hv2 lacks avx512f",
        "pick another host",
    ));
    let text = output::migration_detail(&m);
    assert!(
        text.ends_with(
            "error      [cpu-incompatible] hv2 lacks avx512f\nhint       pick another host"
        ),
        "{text}"
    );
    // A live job shows its latest sample; a finished one does not.
    assert!(!text.contains("progress"));
    let live = output::migration_detail(&migration(MigrationState::Migrating));
    assert!(live
        .contains("progress   precopy 42.2%  812.0 MiB/s  remaining 150.0 MiB  iter 2  ETA 1.2 s"));
}

#[test]
fn a_revised_prediction_is_shown_live_and_after_the_end() {
    let mut p = progress();
    p.revision = Some(ferry_migrate::control::Revision {
        round: 2,
        at_ms: 1400,
        total_ms: Some(2700),
        pause_ms: Some(12),
        rate_bps: 812.0 * 1024.0 * 1024.0,
        dirty_rate_bps: 3.0 * 1024.0 * 1024.0,
    });
    assert_eq!(
        output::progress_message(&p),
        "precopy 42.2%  812.0 MiB/s  remaining 150.0 MiB  iter 2  ETA 1.2 s  total 2.7 s"
    );
    let mut m = migration(MigrationState::Completed);
    m.progress = Some(p.clone());
    let text = output::migration_detail(&m);
    let line = text.lines().find(|l| l.starts_with("prediction "));
    assert_eq!(
        line.map(|l| l["prediction".len()..].trim_start()),
        Some("total 2.7 s, pause 12 ms (revised at round 2, 1.4 s in: QEMU sending 812.0 MiB/s, the guest dirtying 3.0 MiB/s)"),
        "{text}"
    );
    p.revision.as_mut().unwrap().total_ms = None;
    assert!(
        output::revision_line(p.revision.as_ref().unwrap()).starts_with("no end at these rates")
    );
}

#[test]
fn progress_message_without_eta() {
    let mut p = progress();
    p.eta_ms = None;
    assert_eq!(
        output::progress_message(&p),
        "precopy 42.2%  812.0 MiB/s  remaining 150.0 MiB  iter 2  ETA -"
    );
}

#[test]
fn logs_are_time_level_message() {
    let lines = [
        LogLine {
            seq: 1,
            at: t(0),
            level: "info".into(),
            message: "starting".into(),
        },
        LogLine {
            seq: 2,
            at: t(1),
            level: "warn".into(),
            message: "slow".into(),
        },
    ];
    assert_eq!(
        output::logs(&lines),
        "12:00:00.000  INFO   starting\n12:00:01.000  WARN   slow"
    );
}

#[test]
fn json_is_the_api_object() {
    let m = migration(MigrationState::Completed);
    let text = output::json(&m);
    let back: Migration = serde_json::from_str(&text).unwrap();
    assert_eq!(back, m);
    assert!(text.contains("\n  \"state\": \"completed\""));
}

#[test]
fn units() {
    assert_eq!(output::fmt_bytes(512), "512 B");
    assert_eq!(output::fmt_bytes(1536), "1.5 KiB");
    assert_eq!(output::fmt_bytes(3 << 30), "3.00 GiB");
    assert_eq!(output::fmt_ms(999), "999 ms");
    assert_eq!(output::fmt_ms(61_000), "1m01s");
    assert_eq!(output::fmt_mib(1024), "1.0 GiB");
    assert_eq!(output::fmt_age(t(100_000), &t(0)), "1d ago");
}

#[test]
fn errors_render_as_code_message_hint_with_exit_codes() {
    let unreachable = CliError::Api(ferry_api::ApiError::Unreachable {
        url: "http://x/v1/hosts".into(),
        detail: "refused".into(),
    });
    assert_eq!(unreachable.exit_code(), exit::UNREACHABLE);
    assert!(unreachable
        .render()
        .starts_with("error[unreachable]: cannot reach http://x/v1/hosts"));
    let status = |status| {
        CliError::Api(ferry_api::ApiError::Status {
            status,
            body: ErrorBody::new("x", "m", "h"),
        })
    };
    assert_eq!(status(401).exit_code(), exit::AUTH);
    assert_eq!(status(403).exit_code(), exit::AUTH);
    assert_eq!(status(404).exit_code(), exit::ERROR);
    assert_eq!(status(500).exit_code(), exit::ERROR);
    assert_eq!(
        render_error(&ErrorBody::new(
            "instance-not-found",
            "there is no instance 'x'",
            "list them with `ferry instance list`"
        )),
        "error[instance-not-found]: there is no instance 'x'\n  hint: list them with `ferry instance list`"
    );
}

#[test]
fn a_cold_job_shows_its_disk_copies_and_the_cleanup() {
    use ferry_api::instances::{DiskFormat, ImageRef};
    use ferry_api::migrations::{DiskCopy, DiskCopyState};
    let mut m = migration(MigrationState::Completed);
    m.kind = MigrationKind::Cold;
    m.stats = None;
    m.copies = vec![DiskCopy {
        disk: "disk0".into(),
        image: ImageRef {
            datastore: "local".into(),
            file: "vm1-disk0.qcow2".into(),
        },
        target: None,
        format: DiskFormat::Qcow2,
        size_bytes: 1 << 30,
        state: DiskCopyState::Copied,
        done_bytes: 1 << 30,
        remaining_bytes: 0,
        rate_bps: 0.0,
        elapsed_ms: 900,
        sha256: Some("0123456789abcdef0123456789abcdef".into()),
        source_kept: true,
        target_kept: false,
        bitmap: None,
    }];
    let text = output::migration_detail(&m);
    assert!(
        text.contains(
            "\ndisk copy   disk0 local:vm1-disk0.qcow2 copied 1.00 GiB sha256 0123456789abcdef (source copy kept)\n"
        ),
        "{text}"
    );
    assert!(
        text.ends_with(
            "\ncleanup     1 source copy(ies) kept on hv1; remove with `ferry migration cleanup 12345678`"
        ),
        "{text}"
    );
    m.copies[0].source_kept = false;
    m.cleaned_up_at = Some(Utc.with_ymd_and_hms(2025, 3, 2, 8, 0, 0).unwrap());
    let text = output::migration_detail(&m);
    assert!(
        text.ends_with("\ncleanup     done 2025-03-02 08:00:00; the source copies are removed"),
        "{text}"
    );
    m.copies[0].state = DiskCopyState::Copying;
    m.copies[0].done_bytes = 256 << 20;
    m.copies[0].remaining_bytes = 768 << 20;
    m.copies[0].rate_bps = 100.0 * 1048576.0;
    assert!(
        output::disk_copy_line(&m.copies[0])
            .contains("copying 256.0 MiB of 1.00 GiB, 768.0 MiB left"),
        "{}",
        output::disk_copy_line(&m.copies[0])
    );
    let p = Progress {
        phase: Phase::DiskCopy,
        iteration: 1,
        ..progress()
    };
    assert_eq!(
        output::progress_message(&p),
        "copying disks 42.2%  812.0 MiB/s  remaining 150.0 MiB  disk 1  ETA 1.2 s"
    );
}

#[test]
fn a_copy_to_another_datastore_shows_its_target() {
    use ferry_api::instances::{DiskFormat, ImageRef};
    use ferry_api::migrations::{DiskCopy, DiskCopyState};
    let mut m = migration(MigrationState::Migrating);
    m.copies = vec![DiskCopy {
        disk: "disk0".into(),
        image: ImageRef {
            datastore: "local".into(),
            file: "vm1-disk0.qcow2".into(),
        },
        target: Some(ImageRef {
            datastore: "local2".into(),
            file: "vm1-disk0.qcow2".into(),
        }),
        format: DiskFormat::Qcow2,
        size_bytes: 1 << 30,
        state: DiskCopyState::Copying,
        done_bytes: 256 << 20,
        remaining_bytes: 768 << 20,
        rate_bps: 100.0 * 1048576.0,
        elapsed_ms: 900,
        sha256: None,
        source_kept: true,
        target_kept: false,
        bitmap: None,
    }];
    let text = output::migration_detail(&m);
    assert!(
        text.contains(
            "\ndisk copy  disk0 local:vm1-disk0.qcow2 -> local2:vm1-disk0.qcow2 copying \
             256.0 MiB of 1.00 GiB, 768.0 MiB left, 100.0 MiB/s (source copy kept)\n"
        ),
        "{text}"
    );
}

/// A live block migration's sample while its disks copy: disk0 at 40 %, disk1 in sync, 256
/// MiB of memory waiting.
fn block_progress() -> Progress {
    use ferry_migrate::{DiskProgress, DiskState};
    let disks = vec![
        DiskProgress {
            disk: "disk0".into(),
            state: DiskState::Copying,
            copied_bytes: 4 << 30,
            remaining_bytes: 6 << 30,
            total_bytes: 10 << 30,
            rate_bps: 100.0 * 1048576.0,
            resumed: false,
            passes: 0,
            whole_disk_mirror: false,
        },
        DiskProgress {
            disk: "disk1".into(),
            state: DiskState::Synced,
            copied_bytes: 2 << 30,
            remaining_bytes: 0,
            total_bytes: 2 << 30,
            rate_bps: 1.5 * 1048576.0,
            resumed: false,
            passes: 0,
            whole_disk_mirror: false,
        },
    ];
    Progress::disk_copy(1500, disks, 256 << 20)
}

#[test]
fn a_block_migration_shows_each_disk() {
    let p = block_progress();
    // 4 + 2 of 10 + 2 GiB + 256 MiB are done.
    assert_eq!(
        output::progress_message(&p),
        "copying disks 49.0%  101.5 MiB/s  remaining 6.00 GiB disks + 256.0 MiB memory  \
         ETA 1m03s"
    );
    assert_eq!(
        output::disk_progress_lines(&p.disks),
        [
            "disk0  copying  4.00 GiB / 10.00 GiB (40%)  6.00 GiB left  100.0 MiB/s",
            "disk1  synced   2.00 GiB / 2.00 GiB (100%)  0 B left       1.5 MiB/s",
        ]
    );
    // Under the live bar, one indented line each.
    assert_eq!(
        output::progress_disks_text(&p),
        "\n  disk0  copying  4.00 GiB / 10.00 GiB (40%)  6.00 GiB left  100.0 MiB/s\
         \n  disk1  synced   2.00 GiB / 2.00 GiB (100%)  0 B left       1.5 MiB/s"
    );
    assert_eq!(output::progress_disks_text(&progress()), "");

    let mut m = migration(MigrationState::Migrating);
    m.options.disk_map = [("disk0".to_string(), "local2".to_string())].into();
    m.progress = Some(p);
    let text = output::migration_detail(&m);
    assert!(
        text.contains(
            "\noptions    bandwidth 100 MiB/s, policy auto, auto-converge, \
             map-disk disk0=local2\n"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "\nprogress   copying disks 49.0%  101.5 MiB/s  remaining 6.00 GiB disks + 256.0 MiB \
             memory  ETA 1m03s\n\
             disks      disk0  copying  4.00 GiB / 10.00 GiB (40%)  6.00 GiB left  100.0 MiB/s\n\
             \x20          disk1  synced   2.00 GiB / 2.00 GiB (100%)  0 B left       1.5 MiB/s"
        ),
        "{text}"
    );

    // Once the memory moves, the disks (in sync) are still listed under the memory line.
    let mut p = progress().with_disks(block_progress().disks);
    p.disks[0].state = ferry_migrate::DiskState::Synced;
    p.disks[0].copied_bytes = 10 << 30;
    p.disks[0].remaining_bytes = 0;
    m.progress = Some(p);
    let text = output::migration_detail(&m);
    assert!(text.contains("\nprogress   precopy "), "{text}");
    assert!(
        text.contains("\ndisks      disk0  synced  10.00 GiB / 10.00 GiB (100%)  0 B left"),
        "{text}"
    );

    // The JSON stays the API object, disks included.
    let json = output::json(&m);
    assert!(
        json.contains("\"disk_map\": {\n      \"disk0\": \"local2\""),
        "{json}"
    );
    assert!(json.contains("\"state\": \"synced\""), "{json}");
    let back: Migration = serde_json::from_str(&json).unwrap();
    assert_eq!(back, m);
}

#[test]
fn a_throttled_job_shows_what_the_guest_lived_through() {
    let mut m = migration(MigrationState::Completed);
    let mut impact = ferry_migrate::GuestImpact::new(2);
    for (at, t) in [(0, None), (2000, Some(89)), (4000, Some(99))] {
        let mut p = ferry_migrate::Progress::disk_copy(at, Vec::new(), 0);
        p.phase = ferry_migrate::Phase::Precopy;
        p.cpu_throttle_percent = t;
        impact.observe(&p);
    }
    let mut end = ferry_migrate::Progress::disk_copy(19000, Vec::new(), 0);
    end.phase = ferry_migrate::Phase::Completed;
    end.downtime_ms = Some(11);
    impact.observe(&end);
    m.impact = Some(impact);
    let text = output::migration_detail(&m);
    for needle in [
        "QEMU's pause   11 ms",
        "guest          QEMU's pause 11 ms; vCPU throttle peak 99 %, 17.0 s above 50 %",
        "vCPU throttle  89 % at 2.0 s, 99 % at 4.0 s, 0 % at 19.0 s",
        "observed gap   not measured",
    ] {
        assert!(text.contains(needle), "{needle:?} missing:\n{text}");
    }
    assert!(!text.contains("downtime"), "{text}");
    // Live, the progress line names the throttle.
    let mut p = ferry_migrate::Progress::disk_copy(5000, Vec::new(), 0);
    p.phase = ferry_migrate::Phase::Precopy;
    p.cpu_throttle_percent = Some(99);
    assert!(output::progress_message(&p).ends_with("vCPUs throttled 99%"));
}

#[test]
fn watch_draws_a_bar_only_when_stdout_and_stderr_are_terminals() {
    use ferry_cli::commands::migrate::{watch_style, WatchStyle};
    assert_eq!(watch_style(true, true), WatchStyle::Bar);
    assert_eq!(watch_style(false, true), WatchStyle::Lines, "stdout piped");
    assert_eq!(
        watch_style(true, false),
        WatchStyle::Lines,
        "stderr redirected"
    );
    assert_eq!(watch_style(false, false), WatchStyle::Lines);
}

#[test]
fn a_watch_line_is_one_line_with_time_state_and_figures() {
    use ferry_cli::commands::migrate::watch_line;
    use std::time::Duration;
    let line = watch_line(
        Duration::from_millis(2500),
        MigrationState::Migrating,
        Some(&progress()),
    );
    assert!(!line.contains('\n') && !line.contains('\r'), "{line:?}");
    assert!(!line.contains('\x1b'), "{line:?}");
    assert!(line.starts_with("[   2.5s] migrating "), "{line}");
    assert!(line.contains("precopy 42.2%"), "{line}");
    assert!(line.contains("iter 2"), "{line}");
    let state_only = watch_line(Duration::from_secs(1), MigrationState::Preparing, None);
    assert_eq!(state_only, "[   1.0s] preparing");
    let mut with_disk = progress();
    with_disk.phase = Phase::DiskCopy;
    with_disk.disks = vec![ferry_migrate::DiskProgress {
        disk: "disk0".into(),
        state: ferry_migrate::DiskState::Copying,
        copied_bytes: 1 << 20,
        remaining_bytes: 1 << 20,
        total_bytes: 2 << 20,
        rate_bps: 1048576.0,
        resumed: false,
        passes: 0,
        whole_disk_mirror: false,
    }];
    let line = watch_line(Duration::ZERO, MigrationState::Migrating, Some(&with_disk));
    assert!(!line.contains('\n'), "disks on the same line: {line:?}");
    assert!(line.contains("; disk0"), "{line}");
}

#[test]
fn migration_detail_shows_what_qemu_ran_with_not_the_requests_defaults() {
    let mut m = migration(MigrationState::Completed);
    m.options = MigrationOptions::default();
    let caps = [
        ferry_qmp::commands::CapabilityState::new("events", true),
        ferry_qmp::commands::CapabilityState::new("pause-before-switchover", true),
    ];
    let params: ferry_qmp::commands::MigrationParameters = serde_json::from_value(
        serde_json::json!({"max-bandwidth": 1u64 << 40, "downtime-limit": 50}),
    )
    .unwrap();
    m.qemu_settings = Some(ferry_migrate::QemuSettings::from_replies(&caps, &params));
    let text = output::migration_detail(&m);
    assert!(text.contains("\noptions       policy auto\n"), "{text}");
    assert!(
        !text.contains("300 ms"),
        "no default presented as a setting: {text}"
    );
    assert!(
        text.contains(
            "\nqemu          bandwidth unlimited, pause limit 50 ms, capabilities events \
             pause-before-switchover\n"
        ),
        "{text}"
    );
}

#[test]
fn console_text_drops_what_would_drive_a_terminal() {
    assert_eq!(
        output::console_text("plain line\n\tindented\n"),
        "plain line\n\tindented\n"
    );
    assert_eq!(
        output::console_text("\x1b[0;32m  OK  \x1b[0m Started\r\n"),
        "  OK   Started\n",
        "colours and carriage returns"
    );
    assert_eq!(
        output::console_text("\x1b]0;title\x07a\x1b]2;t\x1b\\b\x1bcc\x07\x00d"),
        "abcd",
        "window titles, resets, bell, NUL"
    );
    assert_eq!(output::console_text("é ü ✓"), "é ü ✓");
    assert_eq!(
        output::console_text("cut\x1b["),
        "cut",
        "a sequence cut off at the end"
    );
}

#[test]
fn the_console_shows_each_hosts_part_in_order_under_its_name() {
    use ferry_api::instances::{ConsoleSegment, InstanceConsole};
    let c = InstanceConsole {
        instance: id(7),
        segments: vec![
            ConsoleSegment {
                host: "hv1".into(),
                started_at: t(0),
                size_bytes: 2048,
                text: "ferry-hb 41 10\nferry-hb 42 20".into(),
            },
            ConsoleSegment {
                host: "hv2".into(),
                started_at: t(5),
                size_bytes: 15,
                text: "ferry-hb 43 30\n".into(),
            },
        ],
        unreachable: vec!["hv3".into()],
    };
    assert_eq!(
        output::console(&c),
        "--- hv1, QEMU started 2025-03-01 12:00:00 UTC (2.0 KiB, its first 2.0 KiB left out) ---\n\
         ferry-hb 41 10\n\
         ferry-hb 42 20\n\
         --- hv2, QEMU started 2025-03-01 12:00:05 UTC (15 B) ---\n\
         ferry-hb 43 30\n\
         --- hv3 did not answer: the output of the guest's time there is missing ---"
    );
    let empty = InstanceConsole {
        instance: id(7),
        segments: vec![],
        unreachable: vec![],
    };
    assert!(output::console(&empty).contains("has not run yet"));
}

#[test]
fn the_token_list_shows_roles_and_lifetimes_never_a_secret() {
    let now = t(100_000);
    let token =
        |name: &str, role, expires: Option<DateTime<Utc>>, from_config| ferry_api::tokens::Token {
            id: format!("id-{name}"),
            name: name.into(),
            role,
            created_at: t(0),
            expires_at: expires,
            last_used_at: Some(t(99_940)),
            from_config,
        };
    use ferry_api::tokens::TokenRole;
    let list = vec![
        token("admin", TokenRole::Admin, None, true),
        token("ci", TokenRole::Operator, Some(t(200_000)), false),
        token("old", TokenRole::Reader, Some(t(50_000)), false),
    ];
    assert_eq!(
        output::tokens_table(&list, now),
        "NAME   ROLE      CREATED              EXPIRES                      LAST USED\n\
         admin  admin     2025-03-01 12:00:00  never (config)               1m ago\n\
         ci     operator  2025-03-01 12:00:00  2025-03-03 19:33:20          1m ago\n\
         old    reader    2025-03-01 12:00:00  expired 2025-03-02 01:53:20  1m ago"
    );
    let made = ferry_api::tokens::CreatedToken {
        token: list[1].clone(),
        secret: "ferry_00112233aabbccdd_0f0f".into(),
    };
    let text = output::created_token(&made);
    assert_eq!(text.lines().next(), Some("ferry_00112233aabbccdd_0f0f"));
    assert_eq!(
        text.matches("ferry_00112233aabbccdd_0f0f").count(),
        1,
        "{text}"
    );
}
