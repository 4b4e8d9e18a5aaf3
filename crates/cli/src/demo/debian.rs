//! `ferry demo --guest debian`: a real OS Ferry did not build, with a real disk, moves.
//!
//! The Debian image (`ferry image build --debian`) is copied onto a datastore both lab hosts
//! share, boots through SeaBIOS, and is watched only through what Debian itself offers: its
//! qemu-guest-agent. While a shell loop in the guest appends a line, syncs and sleeps 20 ms,
//! the guest moves hv1 -> hv2; then the file written before the move must read back
//! identical, no write may be missing, the guest is shut down cleanly through its agent, and
//! its root filesystem must pass a read-only fsck on the host.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_api::instances::Instance;
use ferry_bench::local_cluster::LocalCluster;
use ferry_cli::commands::instance::mac_for;
use ferry_cli::error::CliError;
use ferry_lab::debian_guest;
use ferry_lab::debian_image::{ensure_debian_image_with_progress, DebianImageOptions, DiskLayout};
use ferry_lab::instance::debian_instance;
use ferry_qmp::GuestAgent;

use super::{guest_err, say, DemoArgs, DemoReport, VM};

/// A file of random bytes the guest writes before the move and must read back after it.
const BEFORE: &str = "/root/written-before-the-move.bin";

/// Boots the Debian guest on hv1 of `cluster`, moves it to hv2 and checks it, filling
/// `report`.
pub(super) async fn run(
    args: &DemoArgs,
    cluster: &LocalCluster,
    cache_dir: &Path,
    options: &ferry_api::migrations::MigrationOptions,
    report: &mut DemoReport,
) -> Result<(), CliError> {
    say(
        args,
        "building or reusing the Debian image (the first build takes a few minutes)",
    );
    let opts = DebianImageOptions {
        cache_dir: cache_dir.to_path_buf(),
        ..DebianImageOptions::default()
    };
    let quiet = args.json;
    let (image, _) = tokio::task::spawn_blocking(move || {
        ensure_debian_image_with_progress(&opts, &|line| {
            if !quiet {
                eprintln!("  {line}");
            }
        })
    })
    .await
    .map_err(|e| CliError::new("internal", e.to_string(), ""))?
    .map_err(ferry_lab::LabError::from)?;
    say(
        args,
        &format!(
            "booting Debian ({}) on hv1 from its disk through SeaBIOS; the disk is a copy on \
             datastore {}, which hv1 and hv2 share",
            image.kernel_version,
            LocalCluster::SHARED_DATASTORE
        ),
    );
    let created = Instant::now();
    let vm: Instance = cluster
        .create_instance(&debian_instance(
            VM,
            "hv1",
            &image,
            LocalCluster::SHARED_DATASTORE,
            args.memory_mib,
            &mac_for(VM, 0),
            Some(cluster.debian_address()),
            true,
        ))
        .await?;
    let agent = |host: usize| GuestAgent::new(cluster.guest_agent_socket(host, vm.id));
    let ga = agent(0);
    ga.wait_ready(Duration::from_secs(300))
        .await
        .map_err(|e| guest_err(format!("Debian's guest agent did not answer: {e}")))?;
    report.boot_s = Some(created.elapsed().as_secs_f64());
    let os = ga.get_osinfo().await.ok();
    report.guest_os = os.and_then(|o| o.pretty_name);
    say(
        args,
        &format!(
            "{} answers through its guest agent after {:.1} s; writing a 4 MiB file, then a \
             loop that appends a line, syncs and sleeps 20 ms",
            report.guest_os.as_deref().unwrap_or("the guest"),
            report.boot_s.unwrap_or_default()
        ),
    );
    let written = debian_guest::write_random_file(&ga, BEFORE, 4 << 20)
        .await
        .map_err(|e| guest_err(e.to_string()))?;
    debian_guest::start_writer(&ga)
        .await
        .map_err(|e| guest_err(e.to_string()))?;
    drop(ga);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let m = super::migrate_to_hv2(args, cluster, options, report).await?;
    super::record_completion(&m, report)?;

    say(
        args,
        "checking on hv2: the writer's log and the file written before the move",
    );
    let ga = agent(1);
    ga.wait_ready(Duration::from_secs(60))
        .await
        .map_err(|e| guest_err(format!("the guest agent does not answer on hv2: {e}")))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = debian_guest::read_writer(&ga)
        .await
        .map_err(|e| guest_err(e.to_string()))?;
    report.disk_writes = Some(log.writes);
    report.writes_lost = Some(log.lost());
    report.writes_out_of_order = Some(log.holes.iter().filter(|(a, b)| b <= a).count() as u64);
    report.longest_write_gap_ms = Some(log.longest_gap_ms);
    let read = debian_guest::file_sha256(&ga, BEFORE)
        .await
        .map_err(|e| guest_err(e.to_string()))?;
    report.file_intact = Some(read == written);
    drop(ga);

    say(
        args,
        "shutting the guest down through its agent, then fsck of its root filesystem",
    );
    let _: Instance = cluster
        .api
        .post(&format!("/v1/instances/{VM}/stop"), &())
        .await?;
    let disk = &vm.spec.disks[0];
    let store = cluster
        .datastore_path(1, &disk.image.datastore)
        .ok_or_else(|| guest_err("the shared datastore is gone".into()))?;
    let path = store.join(&disk.image.file);
    let layout = DiskLayout::for_size_gib(image.size_gib).map_err(ferry_lab::LabError::from)?;
    let scratch = store.clone();
    let fsck = tokio::task::spawn_blocking(move || {
        debian_guest::fsck_root(&path, disk_format(&path), &layout, &scratch)
    })
    .await
    .map_err(|e| CliError::new("internal", e.to_string(), ""))?;
    report.fsck_clean = Some(fsck.is_ok());
    if let Err(e) = fsck {
        say(args, &e.to_string());
    }
    Ok(())
}

fn disk_format(path: &Path) -> &'static str {
    if path.extension().is_some_and(|e| e == "raw") {
        "raw"
    } else {
        "qcow2"
    }
}

/// The report as `ferry demo --guest debian` prints it.
pub(super) fn render(r: &DemoReport) -> String {
    let ms = |v: Option<u64>| v.map(|v| format!("{v} ms")).unwrap_or_else(|| "-".into());
    let yes = |v: Option<bool>, good: &str, bad: &str| match v {
        Some(true) => good.to_string(),
        Some(false) => bad.to_string(),
        None => "-".into(),
    };
    let mut lines = vec![
        format!(
            "\nFerry demo: {} -> {} ({}, {} MiB, {})",
            r.source,
            r.destination,
            r.guest_os.as_deref().unwrap_or("Debian"),
            r.memory_mib,
            r.accel
        ),
        format!("  status                     {}", r.status),
    ];
    if let Some(plan) = &r.plan {
        lines.push(format!("  {plan}"));
    }
    lines.extend([
        format!(
            "  boot to guest agent        {}",
            r.boot_s.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "-".into())
        ),
        format!("  total time                 {}", ms(r.total_ms)),
        format!("  QEMU's pause               {}", ms(r.qemu_pause_ms)),
        format!(
            "  longest gap between writes {} (by the guest's clock; the loop writes, syncs, sleeps 20 ms)",
            r.longest_write_gap_ms
                .map(|g| format!("{g:.0} ms"))
                .unwrap_or_else(|| "-".into())
        ),
        format!(
            "  disk writes                {} ({} lost, {} out of order)",
            r.disk_writes.map(|w| w.to_string()).unwrap_or_else(|| "-".into()),
            r.writes_lost.map(|w| w.to_string()).unwrap_or_else(|| "-".into()),
            r.writes_out_of_order
                .map(|w| w.to_string())
                .unwrap_or_else(|| "-".into())
        ),
        format!(
            "  file written before        {}",
            yes(r.file_intact, "identical after the move", "CHANGED")
        ),
        format!(
            "  root filesystem            {}",
            yes(r.fsck_clean, "clean (e2fsck -fn after shutdown)", "NOT CLEAN")
        ),
    ]);
    lines.join("\n")
}
