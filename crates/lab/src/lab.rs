//! A running lab: hosts as network namespaces, the guest image, and the accelerator to use.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use ferry_migrate::{AbortSignal, MigrationOutcome, MigrationParams};
use ferry_qemu::{
    probe_accelerator, Accel, AccelChoice, BootProbe, BootSource, InstanceSpec, LaunchOptions,
    MacAddr, NicSpec, QemuProcess, StartMode,
};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::guest_config::GuestConfig;
use crate::image::{ensure_image, GuestImage, ImageOptions};
use crate::migration::{LabMigrateOptions, LabMigration};
use crate::net::LabNet;
use crate::serial::SerialMonitor;
use crate::vm::LabVm;
use crate::LabError;

/// What a lab is made of.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Lab name; namespaces are called `ferry-<name>-...`.
    pub name: String,
    pub hosts: usize,
    pub image: ImageOptions,
    pub accel: AccelChoice,
    pub qemu_binary: PathBuf,
    /// Where QEMU run directories (sockets, serial logs) go.
    pub run_dir: PathBuf,
}

impl LabOptions {
    pub fn new(name: &str, hosts: usize) -> LabOptions {
        LabOptions {
            name: name.to_string(),
            hosts,
            image: ImageOptions::default(),
            accel: std::env::var("FERRY_ACCEL")
                .ok()
                .and_then(|a| a.parse().ok())
                .unwrap_or_default(),
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            run_dir: std::env::temp_dir().join(format!("ferry-lab-{name}")),
        }
    }
}

/// A guest to boot in the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestRequest {
    pub name: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Disks with their images' paths on the host (a datastore every lab host shares).
    pub disks: Vec<ferry_qemu::DiskSpec>,
    pub config: GuestConfig,
}

/// A live lab. Dropping it removes every namespace (and with them every process inside).
pub struct Lab {
    pub net: LabNet,
    pub image: GuestImage,
    pub accel: Accel,
    opts: LabOptions,
    next_guest: AtomicU32,
    /// The monitor of each guest's incoming QEMU while a migration has one, by guest name, so
    /// that a test can watch the destination's block nodes while the copy runs (the source's
    /// monitor it can clone before migrating; the destination's exists only inside
    /// [`Lab::migrate`]).
    incoming: Mutex<HashMap<String, ferry_qmp::Qmp>>,
}

/// How long a guest may take to print its ready line. TCG boots in ~3 s when the machine is
/// idle; a loaded CI machine can be ten times slower.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

impl Lab {
    /// Builds (or reuses) the guest image, chooses the accelerator, and creates the hosts.
    pub async fn start(opts: LabOptions) -> Result<Lab, LabError> {
        let image_opts = opts.image.clone();
        let (image, rebuilt) = tokio::task::spawn_blocking(move || ensure_image(&image_opts))
            .await
            .map_err(|e| LabError::InvalidRequest(format!("image builder panicked: {e}")))??;
        info!(image = %image.id, rebuilt, "guest image ready");
        let accel =
            choose_accel(opts.accel, &opts.qemu_binary, &opts.image.cache_dir, &image).await?;
        let (name, hosts) = (opts.name.clone(), opts.hosts);
        let net = tokio::task::spawn_blocking(move || LabNet::create(&name, hosts))
            .await
            .map_err(|e| LabError::InvalidRequest(format!("lab setup panicked: {e}")))??;
        std::fs::create_dir_all(&opts.run_dir).map_err(|e| {
            LabError::InvalidRequest(format!("cannot create {}: {e}", opts.run_dir.display()))
        })?;
        Ok(Lab {
            net,
            image,
            accel,
            opts,
            next_guest: AtomicU32::new(0),
            incoming: Mutex::new(HashMap::new()),
        })
    }

    pub fn name(&self) -> &str {
        &self.opts.name
    }

    /// Boots a guest on `host` and waits until its services answer.
    pub async fn boot_guest(&self, host: &str, req: &GuestRequest) -> Result<LabVm, LabError> {
        let host_net = self.net.host(host)?.clone();
        InstanceSpec::check_memory(req.memory_mib)?;
        req.config
            .validate(req.memory_mib)
            .map_err(|e| LabError::InvalidRequest(format!("guest {}: {e}", req.name)))?;
        let index = self.next_guest.fetch_add(1, Ordering::Relaxed);
        let ip = self.net.guest_addr(index as u8);
        let mut config = req.config.clone();
        config.ip = Some((ip, LabNet::GUEST_PREFIX));
        let tap = format!("fy{index}");
        let spec = InstanceSpec {
            name: req.name.clone(),
            memory_mib: req.memory_mib,
            vcpus: req.vcpus,
            cpu_model: "qemu64".into(),
            machine: "pc".into(),
            boot: BootSource::Kernel {
                kernel: self.image.kernel.clone(),
                initrd: self.image.initrd.clone(),
                cmdline: config.kernel_cmdline(),
            },
            firmware: ferry_qemu::Firmware::Bios,
            disks: req.disks.clone(),
            nics: vec![NicSpec {
                tap: tap.clone(),
                mac: MacAddr::local(0x10000 + index),
                ipv4: None,
                gateway: None,
            }],
        };
        spec.validate()?;
        self.net.add_tap(host, &tap)?;
        let started = self.launch(&spec, host, StartMode::Normal).await;
        let (qemu, serial) = match started {
            Ok(s) => s,
            Err(e) => {
                let _ = self.net.remove_tap(host, &tap);
                return Err(e);
            }
        };
        let vm = LabVm {
            name: req.name.clone(),
            host: host_net.name.clone(),
            ip,
            tap,
            spec,
            qemu,
            serial,
            past_beats: Vec::new(),
            stray_beats: Vec::new(),
        };
        if vm
            .serial
            .wait_for_line("ferry-guest ready", BOOT_TIMEOUT)
            .await
            .is_none()
        {
            let detail = format!(
                "did not print its ready line within {} s; last output: {}",
                BOOT_TIMEOUT.as_secs(),
                vm.serial
                    .lines()
                    .iter()
                    .rev()
                    .take(5)
                    .rev()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
            self.discard(vm);
            return Err(LabError::Guest {
                name: req.name.clone(),
                detail,
            });
        }
        Ok(vm)
    }

    /// Starts QEMU for `spec` on `host`, with a serial reader attached from the first byte.
    pub(crate) async fn launch(
        &self,
        spec: &InstanceSpec,
        host: &str,
        mode: StartMode,
    ) -> Result<(QemuProcess, SerialMonitor), LabError> {
        let host_net = self.net.host(host)?;
        let mut opts = LaunchOptions::new(
            self.opts.run_dir.join(format!("{}-{}", spec.name, host)),
            self.accel,
        );
        opts.qemu_binary = self.opts.qemu_binary.clone();
        opts.netns = Some(host_net.netns.clone());
        opts.mode = mode;
        let qemu = QemuProcess::launch(spec, &opts).await?;
        let serial = SerialMonitor::connect(&qemu.paths().serial_socket, Duration::from_secs(5))
            .await
            .map_err(|e| LabError::Guest {
                name: spec.name.clone(),
                detail: format!("cannot read the serial port: {e}"),
            })?;
        Ok((qemu, serial))
    }

    /// Live-migrates `vm` to host `to` through the phases of [`ferry_migrate::live_migrate`].
    /// On success `vm` now refers to the destination process; on failure it still runs where
    /// it was.
    pub async fn migrate(
        &self,
        vm: &mut LabVm,
        to: &str,
        params: &MigrationParams,
        observe: &mut ferry_migrate::source::Observer<'_>,
        abort: AbortSignal,
    ) -> Result<MigrationOutcome, LabError> {
        self.migrate_with(
            vm,
            to,
            params,
            &LabMigrateOptions::default(),
            observe,
            abort,
        )
        .await
    }

    /// [`Lab::migrate`] with TLS on the streams and/or the disks copied (block migration).
    /// Each half's credentials live in [`Lab::tls_dir`] while it runs and are removed when
    /// the migration ends, whatever the outcome; the QEMU that runs the guest afterwards has
    /// its TLS objects and parameters removed too.
    pub async fn migrate_with(
        &self,
        vm: &mut LabVm,
        to: &str,
        params: &MigrationParams,
        opts: &LabMigrateOptions,
        observe: &mut ferry_migrate::source::Observer<'_>,
        abort: AbortSignal,
    ) -> Result<MigrationOutcome, LabError> {
        params.validate()?;
        let dest = self.net.host(to)?;
        if dest.name == vm.host {
            return Err(LabError::InvalidRequest(format!(
                "guest {} already runs on {to}",
                vm.name
            )));
        }
        let mut m = LabMigration::new(self, vm, dest.clone(), params.clone(), abort, opts.clone());
        let outcome = ferry_migrate::live_migrate(&mut m, observe).await;
        let (source_tls, dest_tls) = (m.source_tls.take(), m.dest_tls.take());
        drop(m);
        // Whichever QEMU runs the guest now (the destination after success, the source
        // otherwise) keeps no credentials of this migration; the files go with the guards.
        if source_tls.is_some() || dest_tls.is_some() {
            ferry_migrate::tls::remove(vm.qemu.qmp()).await;
        }
        drop((source_tls, dest_tls));
        Ok(outcome?)
    }

    /// Where a guest's migration keeps one half's credentials (`role` is `source` or
    /// `destination`) while it runs; nothing is there otherwise.
    pub fn tls_dir(&self, vm: &str, role: &str) -> PathBuf {
        self.opts.run_dir.join(format!("tls-{vm}-{role}"))
    }

    /// The monitor of the destination QEMU that guest `name` is migrating to, from the moment
    /// it is launched until it either becomes the guest's process or is removed; `None`
    /// outside a migration.
    pub fn incoming_qmp(&self, name: &str) -> Option<ferry_qmp::Qmp> {
        self.incoming.lock().unwrap().get(name).cloned()
    }

    pub(crate) fn set_incoming_qmp(&self, name: &str, qmp: Option<ferry_qmp::Qmp>) {
        let mut incoming = self.incoming.lock().unwrap();
        match qmp {
            Some(qmp) => incoming.insert(name.to_string(), qmp),
            None => incoming.remove(name),
        };
    }

    /// Stops a guest and removes its tap.
    pub async fn stop_guest(&self, vm: LabVm) {
        let LabVm {
            qemu, host, tap, ..
        } = vm;
        qemu.shutdown(Duration::from_secs(5)).await;
        let _ = self.net.remove_tap(&host, &tap);
    }

    fn discard(&self, vm: LabVm) {
        let LabVm {
            mut qemu,
            host,
            tap,
            ..
        } = vm;
        qemu.kill();
        let _ = self.net.remove_tap(&host, &tap);
    }

    /// The client namespace's address, from which probes reach guests.
    pub fn client_addr(&self) -> Ipv4Addr {
        self.net.client_addr
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.opts.run_dir);
    }
}

/// Chooses the accelerator for lab guests: a forced choice is checked; `Auto` boots the guest
/// image under KVM once per boot of this machine (a real boot costs seconds) and remembers
/// the answer in `cache_dir`.
pub async fn choose_accel(
    choice: AccelChoice,
    qemu_binary: &Path,
    cache_dir: &Path,
    image: &GuestImage,
) -> Result<Accel, LabError> {
    let join_err =
        |e: tokio::task::JoinError| LabError::InvalidRequest(format!("probe panicked: {e}"));
    let qemu = qemu_binary.to_path_buf();
    if choice != AccelChoice::Auto {
        return tokio::task::spawn_blocking(move || probe_accelerator(&qemu, choice, None))
            .await
            .map_err(join_err)?
            .map_err(LabError::from);
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let cache = cache_dir.join(format!("accel-{}.json", boot_id.trim()));
    if let Some(accel) = std::fs::read(&cache)
        .ok()
        .and_then(|b| serde_json::from_slice::<Accel>(&b).ok())
    {
        return Ok(accel);
    }
    let probe = BootProbe {
        kernel: image.kernel.clone(),
        initrd: image.initrd.clone(),
        cmdline: GuestConfig {
            wss_mib: 1,
            ..GuestConfig::default()
        }
        .kernel_cmdline(),
        ready_marker: "ferry-guest ready".into(),
        timeout: Duration::from_secs(15),
    };
    let accel = tokio::task::spawn_blocking(move || {
        probe_accelerator(&qemu, AccelChoice::Auto, Some(&probe))
    })
    .await
    .map_err(join_err)??;
    info!(accel = accel.name(), "accelerator chosen by probe");
    let _ = std::fs::create_dir_all(cache_dir);
    let _ = std::fs::write(&cache, serde_json::to_vec(&accel).unwrap_or_default());
    Ok(accel)
}
