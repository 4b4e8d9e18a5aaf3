//! `ferry-guest`: PID 1 of Ferry's test guest.
//!
//! A migration is only proven correct if the guest itself notices nothing: its clock keeps
//! ticking (heartbeat on the console), its connections survive (TCP/UDP echo on port 7777), its
//! memory arrives bit for bit (a writer that keeps dirtying a working set whose every page
//! can be verified, queried on control port 7778) and, when it is given a disk, every write it
//! saw complete is on that disk (a block writer verified the same way). This program is all of
//! that, std only and statically linked, so the host can embed it in a busybox initramfs it
//! builds itself.
//!
//! Run as PID 1 it first sets up the system (mounts, virtio modules, eth0). Run as any other
//! process (on a developer's host) it skips that and just serves, reading its settings from
//! `$FERRY_CMDLINE` instead of `/proc/cmdline`.

mod block;
mod blockdev;
mod config;
mod disk;
mod disk_service;
mod pages;
mod pattern;
mod power;
mod services;
mod sys;

use std::io::Write;
use std::net::{TcpListener, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use disk_service::DiskSlot;

/// Port of the TCP and UDP echo services.
const ECHO_PORT: u16 = 7777;
/// Port of the status/control line protocol.
const CONTROL_PORT: u16 = 7778;
/// RAM left to the kernel and our threads when sizing the working set.
const RESERVE_MIB: u64 = 32;

/// Writes one whole line to the console (stdout is /dev/console for PID 1), in a single write
/// so lines of different threads never interleave.
pub fn console_line(line: &str) {
    let mut buf = String::with_capacity(line.len() + 1);
    buf.push_str(line);
    buf.push('\n');
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(buf.as_bytes());
    let _ = out.flush();
}

/// A diagnostic line, prefixed so the host can tell it from heartbeats.
pub fn log(msg: &str) {
    console_line(&format!("ferry-guest: {msg}"));
}

/// PID 1 must never exit (the kernel would panic), so every fatal path ends here.
fn idle_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Opens the configured disk and starts its writer. A disk that cannot be used is reported on
/// the console and to `disk-*` commands rather than stopping the guest: the other proofs still
/// stand.
fn start_disk(cfg: &config::Config) -> DiskSlot {
    let Some(spec) = &cfg.disk else {
        return DiskSlot::Off;
    };
    match blockdev::open_disk(spec, cfg.disk_io, cfg.disk_blocks, cfg.fill) {
        Ok((disk, label)) => {
            let svc = Arc::new(disk_service::DiskService::new(disk, label, cfg.disk_rate));
            disk_service::spawn_writer(Arc::clone(&svc));
            DiskSlot::On(svc)
        }
        Err(e) => {
            log(&format!("error: disk {spec}: {e}"));
            DiskSlot::Failed(e)
        }
    }
}

fn main() {
    let pid1 = std::process::id() == 1;
    std::panic::set_hook(Box::new(|info| log(&format!("panic: {info}"))));
    if pid1 {
        sys::mount_filesystems();
    }
    let cmdline = if pid1 {
        std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
    } else {
        std::env::var("FERRY_CMDLINE").unwrap_or_default()
    };
    let (mut cfg, warnings) = config::parse_cmdline(&cmdline);
    for w in warnings {
        log(&format!("warning: {w}"));
    }
    if pid1 {
        sys::load_modules();
        power::watch_power_button();
        sys::configure_network(&cfg);
    }
    if let Some(avail) = sys::mem_available_mib() {
        let max = avail.saturating_sub(RESERVE_MIB).max(1);
        if u64::from(cfg.wss_mib) > max {
            log(&format!(
                "warning: ferry.wss={} does not fit in {avail} MiB available, using {max}",
                cfg.wss_mib
            ));
            cfg.wss_mib = max as u32;
        }
    }

    let disk = start_disk(&cfg);
    let page_count = cfg.wss_mib as usize * (1024 * 1024 / pages::PAGE_SIZE);
    let shared = Arc::new(services::Shared::new(
        pages::Memory::new(page_count, cfg.fill),
        cfg.rate_mib_s,
        disk,
    ));
    services::spawn_heartbeat(
        Arc::clone(&shared),
        Duration::from_millis(u64::from(cfg.heartbeat_ms)),
    );
    {
        let mut mem = shared.memory();
        mem.fill_first_round();
        shared
            .writes
            .store(mem.writes(), std::sync::atomic::Ordering::Relaxed);
    }
    services::spawn_writer(Arc::clone(&shared));

    let mut all_up = true;
    match TcpListener::bind(("0.0.0.0", ECHO_PORT)) {
        Ok(l) => services::spawn_tcp_echo(Arc::clone(&shared), l),
        Err(e) => {
            all_up = false;
            log(&format!("error: tcp echo on port {ECHO_PORT}: {e}"));
        }
    }
    match UdpSocket::bind(("0.0.0.0", ECHO_PORT)) {
        Ok(s) => services::spawn_udp_echo(Arc::clone(&shared), s),
        Err(e) => {
            all_up = false;
            log(&format!("error: udp echo on port {ECHO_PORT}: {e}"));
        }
    }
    match TcpListener::bind(("0.0.0.0", CONTROL_PORT)) {
        Ok(l) => services::spawn_control(Arc::clone(&shared), l),
        Err(e) => {
            all_up = false;
            log(&format!("error: control on port {CONTROL_PORT}: {e}"));
        }
    }
    if all_up {
        let disk = match &shared.disk {
            DiskSlot::On(svc) => format!(
                "{} disk_blocks={} disk_mode={} disk_rate={}",
                svc.label, svc.blocks, svc.mode, cfg.disk_rate
            ),
            DiskSlot::Failed(_) => "error".into(),
            DiskSlot::Off => "-".into(),
        };
        console_line(&format!(
            "ferry-guest ready ip={} wss={} rate={} fill={} pages={} disk={disk}",
            cfg.ip_text(),
            cfg.wss_mib,
            cfg.rate_mib_s,
            cfg.fill.name(),
            page_count
        ));
    } else {
        log("not ready: a service failed to start");
    }
    idle_forever();
}
