//! How API objects look on the terminal: aligned tables for people, pretty JSON for scripts.
//!
//! Every function here is pure (the clock is a parameter) and returns a String, so the exact
//! output is pinned by snapshot-style tests and the commands only decide where it goes.

use chrono::{DateTime, Utc};
use clap::ValueEnum;
use ferry_api::hosts::{Datastore, Host, HostState};
use ferry_api::instances::{Instance, InstanceState};
use ferry_api::migrations::{LogLine, Migration, MigrationKind, MigrationState};
use ferry_migrate::{DiskProgress, DiskState, Phase, Progress};
use serde::Serialize;
use uuid::Uuid;

use crate::error::exit;

/// Writes `text` and a newline to stdout, flushed. When the reader has gone away
/// (`ferry host list | head -1`, `| true`), the program ends quietly with
/// [`exit::STDOUT_CLOSED`] (141, what a shell reports for a program stopped by SIGPIPE) instead
/// of panicking like `println!`: the output nobody reads is not an error worth a backtrace.
/// Call it only where nothing needs cleaning up afterwards (the lab demo prints after its lab
/// is gone).
pub fn emit(text: &str) {
    if let Err(e) = write_line(&mut std::io::stdout().lock(), text) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(i32::from(exit::STDOUT_CLOSED));
        }
        eprintln!("error[stdout]: cannot write the output: {e}");
        std::process::exit(i32::from(exit::ERROR));
    }
}

/// `text` and a newline into `out`, flushed; the part of [`emit`] that tests can drive.
pub fn write_line(out: &mut impl std::io::Write, text: &str) -> std::io::Result<()> {
    writeln!(out, "{text}")?;
    out.flush()
}

/// `println!` through [`emit`]: never panics on a closed stdout.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::emit(&format!($($arg)*))
    };
}

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns (lists) or `key  value` lines (one object).
    #[default]
    Table,
    /// The API object(s), as pretty JSON.
    Json,
}

/// Columns padded to their widest cell, two spaces apart, no trailing blanks.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(cols) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, w) in widths.iter().enumerate() {
                let cell = cells.get(i).map(String::as_str).unwrap_or("");
                if i > 0 {
                    s.push_str("  ");
                }
                s.push_str(cell);
                s.push_str(&" ".repeat(w - cell.chars().count()));
            }
            s.trim_end().to_string()
        };
        let mut out = line(&self.headers);
        for row in &self.rows {
            out.push('\n');
            out.push_str(&line(row));
        }
        out
    }
}

/// `key  value` lines for one object, keys padded to the longest.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| {
            // A value of several lines continues under the first, aligned.
            let v = v.replace('\n', &format!("\n{:width$}  ", ""));
            format!("{k:<width$}  {v}").trim_end().to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Pretty JSON of any API object (lists too).
pub fn json<T: Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// The first 8 hex digits: enough to tell jobs apart in a list, and accepted nowhere as an id
/// (show commands need the full one, which `-o json` and `show` print).
pub fn short_id(id: &Uuid) -> String {
    id.simple().to_string()[..8].to_string()
}

pub fn fmt_mib(mib: u64) -> String {
    if mib >= 1024 {
        format!("{:.1} GiB", mib as f64 / 1024.0)
    } else {
        format!("{mib} MiB")
    }
}

pub fn fmt_bytes(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b < KIB {
        format!("{bytes} B")
    } else if b < KIB * KIB {
        format!("{:.1} KiB", b / KIB)
    } else if b < KIB * KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else {
        format!("{:.2} GiB", b / (KIB * KIB * KIB))
    }
}

pub fn fmt_rate(bytes_per_s: f64) -> String {
    format!("{:.1} MiB/s", bytes_per_s.max(0.0) / (1024.0 * 1024.0))
}

pub fn fmt_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

pub fn fmt_time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// "3s ago": a heartbeat's age matters more than its date.
pub fn fmt_age(now: DateTime<Utc>, t: &DateTime<Utc>) -> String {
    let s = (now - *t).num_seconds().max(0);
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86_399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

pub fn host_state(s: HostState) -> &'static str {
    match s {
        HostState::Online => "online",
        HostState::Offline => "offline",
    }
}

pub fn instance_state(s: InstanceState) -> &'static str {
    s.as_str()
}

pub fn migration_kind(k: MigrationKind) -> &'static str {
    match k {
        MigrationKind::Live => "live",
        MigrationKind::Cold => "cold",
    }
}

pub fn hosts_table(hosts: &[Host], now: DateTime<Utc>) -> String {
    let mut t = Table::new(&[
        "NAME",
        "STATE",
        "ENABLED",
        "INSTANCES",
        "ACCEL",
        "CORES",
        "RAM FREE/TOTAL",
        "MIGRATION ADDR",
        "LAST SEEN",
    ]);
    for h in hosts {
        let f = h.facts.as_ref();
        t.row(vec![
            h.name.clone(),
            host_state(h.state).into(),
            yes_no(h.enabled),
            h.instances.to_string(),
            opt(f.map(|f| f.accel.clone())),
            opt(f.map(|f| f.cores)),
            opt(f.map(|f| format!("{} / {}", fmt_mib(f.ram_free_mib), fmt_mib(f.ram_total_mib)))),
            opt(f.map(|f| f.migration_addr.clone())),
            opt(h.last_heartbeat.as_ref().map(|t| fmt_age(now, t))),
        ]);
    }
    t.render()
}

pub fn host_detail(h: &Host, now: DateTime<Utc>) -> String {
    let mut pairs = vec![
        ("name", h.name.clone()),
        ("state", host_state(h.state).into()),
        ("enabled", yes_no(h.enabled)),
        ("agent url", h.agent_url.clone()),
        ("instances", h.instances.to_string()),
        (
            "last seen",
            opt(h
                .last_heartbeat
                .as_ref()
                .map(|t| format!("{} ({})", fmt_time(t), fmt_age(now, t)))),
        ),
    ];
    if let Some(f) = &h.facts {
        pairs.extend([
            (
                "cpu",
                format!("{} {} ({} cores)", f.cpu_vendor, f.cpu_model, f.cores),
            ),
            ("cpu flags", f.cpu_flags.len().to_string()),
            (
                "ram",
                format!(
                    "{} free of {}",
                    fmt_mib(f.ram_free_mib),
                    fmt_mib(f.ram_total_mib)
                ),
            ),
            ("accel", f.accel.clone()),
            ("qemu", f.qemu_version.clone()),
            (
                "migration",
                format!("{} ports {}", f.migration_addr, f.migration_ports),
            ),
            (
                "datastores",
                f.datastores
                    .iter()
                    .map(|d| format!("{} ({}, {} free)", d.name, d.path, fmt_bytes(d.free_bytes)))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            (
                "networks",
                f.networks
                    .iter()
                    .map(|n| format!("{} (bridge {})", n.name, n.bridge))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            ("agent", f.agent_version.clone()),
        ]);
    }
    key_values(&pairs)
}

/// One row per storage: shared ones once, with every host's mount; a disagreement between
/// hosts (one identity under two names) is printed below the table.
pub fn datastores_table(stores: &[Datastore]) -> String {
    let mut t = Table::new(&["NAME", "SHARED", "FREE/TOTAL", "IDENTITY", "MOUNTS"]);
    let mut problems = Vec::new();
    for d in stores {
        t.row(vec![
            d.name.clone(),
            yes_no(d.shared),
            format!("{} / {}", fmt_bytes(d.free_bytes), fmt_bytes(d.total_bytes)),
            opt(d.identity.as_ref()),
            d.mounts
                .iter()
                .map(|m| format!("{}:{}", m.host, m.path))
                .collect::<Vec<_>>()
                .join(", "),
        ]);
        if let Some(p) = &d.problem {
            problems.push(format!("warning: datastore {}: {p}", d.name));
        }
    }
    let mut out = t.render();
    for p in problems {
        out.push('\n');
        out.push_str(&p);
    }
    out
}

pub fn instances_table(instances: &[Instance]) -> String {
    let mut t = Table::new(&[
        "ID",
        "NAME",
        "HOST",
        "STATE",
        "GEN",
        "MEMORY",
        "VCPUS",
        "MIGRATION",
    ]);
    for i in instances {
        t.row(vec![
            short_id(&i.id),
            i.name.clone(),
            i.host.clone(),
            instance_state(i.state).into(),
            i.generation.to_string(),
            fmt_mib(u64::from(i.spec.memory_mib)),
            i.spec.vcpus.to_string(),
            opt(i.migration.as_ref().map(short_id)),
        ]);
    }
    t.render()
}

pub fn instance_detail(i: &Instance) -> String {
    let nics = i
        .spec
        .nics
        .iter()
        .map(|n| match (&n.ipv4, &n.gateway) {
            (Some(ip), Some(gw)) => format!("{} ({}, static {ip} via {gw})", n.network, n.mac),
            (Some(ip), None) => format!("{} ({}, static {ip})", n.network, n.mac),
            _ => format!("{} ({})", n.network, n.mac),
        })
        .collect::<Vec<_>>()
        .join(", ");
    key_values(&[
        ("id", i.id.to_string()),
        ("name", i.name.clone()),
        ("host", i.host.clone()),
        ("state", instance_state(i.state).into()),
        ("generation", i.generation.to_string()),
        ("memory", fmt_mib(u64::from(i.spec.memory_mib))),
        ("vcpus", i.spec.vcpus.to_string()),
        ("cpu model", i.spec.cpu_model.clone()),
        ("machine", i.spec.machine.clone()),
        (
            "boot",
            format!(
                "{} ({})",
                i.spec.boot.from.as_str(),
                i.spec.boot.firmware.as_str()
            ),
        ),
        (
            "kernel",
            i.spec.boot.kernel.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "initrd",
            i.spec.boot.initrd.clone().unwrap_or_else(|| "-".into()),
        ),
        ("cmdline", i.spec.boot.cmdline.clone()),
        ("disks", disks_cell(&i.spec.disks)),
        ("nics", if nics.is_empty() { "-".into() } else { nics }),
        ("guest os", guest_os(i)),
        ("guest addresses", guest_addresses(i)),
        ("migration", opt(i.migration)),
        ("created", fmt_time(&i.created_at)),
        ("updated", fmt_time(&i.updated_at)),
    ])
}

/// The guest OS as its agent reports it, or why it is not known.
fn guest_os(i: &Instance) -> String {
    match &i.guest {
        None => "- (no guest agent answers)".into(),
        Some(g) => {
            let os = g.os.clone().unwrap_or_else(|| "unknown".into());
            match &g.kernel {
                Some(k) => format!("{os}, kernel {k}"),
                None => os,
            }
        }
    }
}

/// Every address of every guest interface, `name: addr, addr`.
fn guest_addresses(i: &Instance) -> String {
    let Some(g) = &i.guest else { return "-".into() };
    let lines: Vec<String> = g
        .interfaces
        .iter()
        .filter(|n| !n.addresses.is_empty())
        .map(|n| format!("{}: {}", n.name, n.addresses.join(", ")))
        .collect();
    if lines.is_empty() {
        "-".into()
    } else {
        lines.join("\n")
    }
}

/// Each disk on one line: id, image, format, size, bus, flags.
fn disks_cell(disks: &[ferry_api::instances::DiskSpec]) -> String {
    if disks.is_empty() {
        return "-".into();
    }
    disks
        .iter()
        .map(|d| {
            let mut flags = vec![d.bus.as_str(), d.cache.as_str()];
            if d.read_only {
                flags.push("read-only");
            }
            if !d.managed {
                flags.push("not owned");
            }
            let backing = d
                .backing
                .as_ref()
                .map(|b| format!(" over {}", b.image))
                .unwrap_or_default();
            format!(
                "{} {} {} {}{backing} ({})",
                d.id,
                d.image,
                d.format,
                fmt_mib(d.size_bytes >> 20),
                flags.join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The PROGRESS column: a percentage while memory moves, "-" when nothing is known.
fn progress_cell(m: &Migration) -> String {
    match (m.state, &m.progress) {
        (MigrationState::Completed, _) => "100%".into(),
        (_, Some(p)) => format!("{:.0}%", p.percent),
        _ => "-".into(),
    }
}

pub fn migrations_table(migrations: &[Migration]) -> String {
    let mut t = Table::new(&[
        "ID",
        "INSTANCE",
        "KIND",
        "FROM",
        "TO",
        "STATE",
        "PROGRESS",
        "QEMU PAUSE",
        "CREATED",
    ]);
    for m in migrations {
        t.row(vec![
            short_id(&m.id),
            m.instance_name.clone(),
            migration_kind(m.kind).into(),
            m.source.clone(),
            m.destination.clone(),
            m.state.as_str().into(),
            progress_cell(m),
            opt(m.stats.as_ref().map(|s| fmt_ms(s.qemu_pause_ms))),
            fmt_time(&m.created_at),
        ]);
    }
    t.render()
}

pub fn migration_detail(m: &Migration) -> String {
    let o = &m.options;
    // What was asked, and only that: a default filled in here ("downtime 300 ms") would read
    // as what ran, which the auto policy and QEMU decide (the `qemu` line).
    let mut options = Vec::new();
    if let Some(b) = o.bandwidth_mib_s {
        options.push(format!("bandwidth {b} MiB/s"));
    }
    if let Some(d) = o.downtime_ms {
        options.push(format!("pause target {d} ms"));
    }
    options.push(format!(
        "policy {}",
        match o.policy {
            ferry_api::migrations::Policy::Auto => "auto",
            ferry_api::migrations::Policy::Manual => "manual",
        }
    ));
    for (on, name) in [
        (o.auto_converge, "auto-converge"),
        (o.compress, "compress"),
        (o.post_copy, "post-copy"),
    ] {
        if on {
            options.push(name.into());
        }
    }
    if !o.disk_map.is_empty() {
        // Spaces, not commas, between the pairs: the options themselves are comma-separated.
        let pairs: Vec<String> = o.disk_map.iter().map(|(d, s)| format!("{d}={s}")).collect();
        options.push(format!("map-disk {}", pairs.join(" ")));
    }
    let mut pairs = vec![
        ("id", m.id.to_string()),
        (
            "instance",
            format!("{} ({})", m.instance_name, m.instance_id),
        ),
        ("kind", migration_kind(m.kind).into()),
        ("from", m.source.clone()),
        ("to", m.destination.clone()),
        ("state", m.state.as_str().into()),
        ("options", options.join(", ")),
        ("created", fmt_time(&m.created_at)),
    ];
    for (key, t) in [
        ("preparing", &m.preparing_at),
        ("migrating", &m.migrating_at),
        ("completing", &m.completing_at),
        ("finished", &m.finished_at),
    ] {
        if let Some(t) = t {
            pairs.push((key, fmt_time(t)));
        }
    }
    if m.cancel_requested {
        pairs.push(("cancel", "requested".into()));
    }
    if let Some(p) = &m.plan {
        pairs.push(("plan", p.plan.summary()));
    }
    if let Some(r) = m.progress.as_ref().and_then(|p| p.revision.as_ref()) {
        pairs.push(("prediction", revision_line(r)));
    }
    if let Some(q) = &m.qemu_settings {
        pairs.push(("qemu", q.summary()));
    }
    if let Some(p) = &m.progress {
        if !m.state.is_terminal() {
            pairs.push(("progress", progress_message(p)));
        }
        // Kept after the end too: each disk's last state says whether the destination's image
        // is complete, and which disk a failed copy stopped on.
        if !p.disks.is_empty() {
            pairs.push(("disks", disk_progress_lines(&p.disks).join("\n")));
        }
    }
    if let Some(s) = &m.stats {
        pairs.extend([
            ("total time", fmt_ms(s.total_ms)),
            ("QEMU's pause", fmt_ms(s.qemu_pause_ms)),
            ("transferred", fmt_bytes(s.bytes_transferred)),
            ("iterations", s.iterations.to_string()),
        ]);
    }
    if let Some(i) = &m.impact {
        pairs.push(("guest", i.summary()));
        if !i.throttle.is_empty() {
            pairs.push(("vCPU throttle", throttle_history(i)));
        }
        if i.observed.is_empty() {
            pairs.push((
                "observed gap",
                "not measured: no observer outside the guest reported one".into(),
            ));
        }
    }
    for c in &m.copies {
        pairs.push(("disk copy", disk_copy_line(c)));
    }
    if !m.copies.is_empty() {
        let kept = m.copies.iter().filter(|c| c.source_kept).count();
        let partial = m.copies.iter().filter(|c| c.target_kept).count();
        let cleanup = match (&m.cleaned_up_at, kept) {
            _ if partial > 0 => format!(
                "{partial} partial copy(ies) kept on {} for a retry to resume from; remove with `ferry migration cleanup {}`",
                m.destination,
                short_id(&m.id)
            ),
            (Some(t), _) => format!("done {}; the source copies are removed", fmt_time(t)),
            (None, 0) => "nothing kept on the source".into(),
            (None, n) => format!(
                "{n} source copy(ies) kept on {}; remove with `ferry migration cleanup {}`",
                m.source,
                short_id(&m.id)
            ),
        };
        pairs.push(("cleanup", cleanup));
    }
    if let Some(e) = &m.error {
        pairs.push(("error", format!("[{}] {}", e.code, e.message)));
        pairs.push(("hint", e.hint.clone()));
    }
    key_values(&pairs)
}

/// One disk copy: what, to where when that is not the same datastore and file, how far, the
/// checksum, and whether the source keeps its image.
pub fn disk_copy_line(c: &ferry_api::migrations::DiskCopy) -> String {
    use ferry_api::migrations::DiskCopyState;
    let mut line = format!("{} {}", c.disk, c.image);
    if let Some(target) = &c.target {
        line.push_str(&format!(" -> {target}"));
    }
    line.push(' ');
    line.push_str(c.state.as_str());
    match c.state {
        DiskCopyState::Copying => line.push_str(&format!(
            " {} of {}, {} left, {}",
            fmt_bytes(c.done_bytes),
            fmt_bytes(c.size_bytes),
            fmt_bytes(c.remaining_bytes),
            fmt_rate(c.rate_bps)
        )),
        DiskCopyState::Pending | DiskCopyState::Failed => {}
        DiskCopyState::Verifying | DiskCopyState::Copied => {
            line.push_str(&format!(" {}", fmt_bytes(c.size_bytes)))
        }
    }
    if let Some(sum) = &c.sha256 {
        line.push_str(&format!(" sha256 {}", sum.get(..16).unwrap_or(sum)));
    }
    if c.source_kept {
        line.push_str(" (source copy kept)");
    }
    if c.target_kept {
        line.push_str(" (partial copy kept on the destination for a retry)");
    }
    line
}

pub fn logs(lines: &[LogLine]) -> String {
    lines
        .iter()
        .map(|l| {
            format!(
                "{}  {:<5}  {}",
                l.at.format("%H:%M:%S%.3f"),
                l.level.to_uppercase(),
                l.message
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The word for a disk mirror's state, as the API spells it, so that `-o json` and the
/// tables agree.
pub fn disk_state(s: DiskState) -> &'static str {
    match s {
        DiskState::Copying => "copying",
        DiskState::Synced => "synced",
        DiskState::Completed => "completed",
        DiskState::Cancelled => "cancelled",
        DiskState::Failed => "failed",
    }
}

/// One line per disk of a block migration: id, state, copied / total (percent), what is left
/// and the rate. The columns are aligned across the disks, so that several read as a table in
/// `migration show` and under the live bar.
pub fn disk_progress_lines(disks: &[DiskProgress]) -> Vec<String> {
    let mut t = Table::new(&["", "", "", "", ""]);
    for d in disks {
        // A mirror in sync counts as fully copied, as the migration's percent counts it: its
        // total grows with every guest write, so its bytes alone never quite reach it.
        let percent = match d.state {
            DiskState::Synced | DiskState::Completed => 100.0,
            _ if d.total_bytes == 0 => 0.0,
            _ => (d.copied_bytes.min(d.total_bytes) as f64 * 100.0 / d.total_bytes as f64).floor(),
        };
        t.row(vec![
            d.disk.clone(),
            disk_state(d.state).into(),
            format!(
                "{} / {} ({percent:.0}%)",
                fmt_bytes(d.copied_bytes),
                fmt_bytes(d.total_bytes)
            ),
            format!("{} left", fmt_bytes(d.remaining_bytes)),
            fmt_rate(d.rate_bps),
        ]);
    }
    // The first line is the empty header.
    t.render().lines().skip(1).map(str::to_string).collect()
}

/// The live bar's lines under its own: the sample's disks, indented, each on a new line; empty
/// without disks, so a memory-only migration draws one line as before.
pub fn progress_disks_text(p: &Progress) -> String {
    disk_progress_lines(&p.disks)
        .iter()
        .map(|l| format!("\n  {l}"))
        .collect()
}

/// One progress sample as a line: the live bar's message and `migration show`'s progress.
pub fn progress_message(p: &Progress) -> String {
    let eta = p.eta_ms.map(fmt_ms).unwrap_or_else(|| "-".into());
    if p.phase == Phase::DiskCopy {
        if p.disks.is_empty() {
            // A cold migration: one disk after the other; the sample is the current one's.
            return format!(
                "copying disks {:.1}%  {}  remaining {}  disk {}  ETA {eta}",
                p.percent,
                fmt_rate(p.throughput_bps),
                fmt_bytes(p.remaining_bytes),
                p.iteration,
            );
        }
        // A live block migration before its memory moves: the memory fields hold what waits.
        let rate: f64 = p.disks.iter().map(|d| d.rate_bps).sum();
        let left: u64 = p.disks.iter().map(|d| d.remaining_bytes).sum();
        return format!(
            "copying disks {:.1}%  {}  remaining {} disks + {} memory  ETA {eta}",
            p.percent,
            fmt_rate(rate),
            fmt_bytes(left),
            fmt_bytes(p.remaining_bytes),
        );
    }
    let mut line = format!(
        "{} {:.1}%  {}  remaining {}  iter {}  ETA {eta}",
        p.phase.as_str(),
        p.percent,
        fmt_rate(p.throughput_bps),
        fmt_bytes(p.remaining_bytes),
        p.iteration,
    );
    if let Some(t) = p.revision.as_ref().and_then(|r| r.total_ms) {
        line.push_str(&format!("  total {}", fmt_ms(t)));
    }
    if let Some(t) = p.cpu_throttle_percent.filter(|t| *t > 0) {
        line.push_str(&format!("  vCPUs throttled {t}%"));
    }
    line
}

/// The vCPU throttle's history: each change with when it happened.
pub fn throttle_history(i: &ferry_migrate::GuestImpact) -> String {
    i.throttle
        .iter()
        .map(|s| format!("{} % at {}", s.percent, fmt_ms(s.at_ms)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A guest's console output made safe for a terminal or a file: escape sequences (colours,
/// cursor moves, window titles) and other control characters are dropped, carriage returns
/// too, so that a guest cannot drive the reader's terminal and `grep` sees plain lines.
/// Newlines and tabs stay. `-o json` keeps the output as the guest printed it.
pub fn console_text(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => match chars.peek() {
                // CSI: parameters and intermediates up to a final byte in @..~.
                Some('[') => {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: up to BEL or ST (ESC \).
                Some(']') => {
                    chars.next();
                    while let Some(c) = chars.next() {
                        if c == '\x07' || (c == '\x1b' && chars.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                }
                // A two-character sequence (ESC c, ESC 7, ...).
                Some(_) => {
                    chars.next();
                }
                None => {}
            },
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// `ferry instance console`: each host's output after a line naming the host and when its
/// QEMU started (and how much of the segment was left out), in order.
pub fn console(c: &ferry_api::instances::InstanceConsole) -> String {
    let mut out = String::new();
    for s in &c.segments {
        let omitted = s.omitted_bytes();
        let cut = if omitted > 0 {
            format!(", its first {} left out", fmt_bytes(omitted))
        } else {
            String::new()
        };
        out.push_str(&format!(
            "--- {}, QEMU started {} UTC ({}{cut}) ---\n",
            s.host,
            fmt_time(&s.started_at),
            fmt_bytes(s.size_bytes)
        ));
        let text = console_text(&s.text);
        out.push_str(&text);
        if !text.is_empty() && !text.ends_with('\n') {
            out.push('\n');
        }
    }
    for h in &c.unreachable {
        out.push_str(&format!(
            "--- {h} did not answer: the output of the guest's time there is missing ---\n"
        ));
    }
    if c.segments.is_empty() && c.unreachable.is_empty() {
        out.push_str("(no console output: the instance has not run yet)\n");
    }
    out.trim_end_matches('\n').to_string()
}

/// The controller's latest prediction, and what it rests on: `migration show` keeps it after
/// the end, beside the actual figures.
pub fn revision_line(r: &ferry_migrate::control::Revision) -> String {
    let what = match (r.total_ms, r.pause_ms) {
        (Some(t), Some(pause)) => format!("total {}, pause {pause} ms", fmt_ms(t)),
        _ => "no end at these rates".into(),
    };
    format!(
        "{what} (revised at round {}, {} in: QEMU sending {}, the guest dirtying {})",
        r.round,
        fmt_ms(r.at_ms),
        fmt_rate(r.rate_bps),
        fmt_rate(r.dirty_rate_bps)
    )
}

/// A created token: its secret on a line of its own (easy to copy), then what it is.
pub fn created_token(c: &ferry_api::tokens::CreatedToken) -> String {
    let t = &c.token;
    format!(
        "{}\n\n{}\nStore the secret now: it is not shown again.",
        c.secret,
        key_values(&[
            ("name", t.name.clone()),
            ("role", t.role.to_string()),
            ("expires", opt(t.expires_at.as_ref().map(fmt_time))),
        ])
    )
}

/// Tokens without their secrets: role, created, expiry (or "expired"), last use.
pub fn tokens_table(tokens: &[ferry_api::tokens::Token], now: DateTime<Utc>) -> String {
    let mut t = Table::new(&["NAME", "ROLE", "CREATED", "EXPIRES", "LAST USED"]);
    for k in tokens {
        let expires = match &k.expires_at {
            Some(at) if *at <= now => format!("expired {}", fmt_time(at)),
            Some(at) => fmt_time(at),
            None if k.from_config => "never (config)".into(),
            None => "never".into(),
        };
        t.row(vec![
            k.name.clone(),
            k.role.to_string(),
            fmt_time(&k.created_at),
            expires,
            opt(k.last_used_at.as_ref().map(|at| fmt_age(now, at))),
        ]);
    }
    t.render()
}
