//! Pre-flight checks: pure functions over what the server knows about an instance, its source
//! and one candidate destination. Each returns a [`CheckResult`] with a stable name (also the
//! error code when it fails a migration). Gathering the inputs (fresh facts, CPU model
//! features, probes) is [`crate::preflight`]'s job.

use std::collections::HashMap;
use std::path::Path;

use ferry_api::checks::{CheckResult, CheckStatus, ProbeResult};
use ferry_api::hosts::{DatastoreFacts, HostFacts};
use ferry_api::instances::{DiskFormat, ImageRef, Instance, InstanceState};
use ferry_api::migrations::MigrationKind;

use crate::config::QemuVersionRule;
use serde_json::json;
use uuid::Uuid;

/// QEMU's named x86 models, oldest first, used to suggest a model every online host runs.
pub const BASELINE_MODELS: &[&str] = &[
    "qemu64",
    "Nehalem",
    "Westmere",
    "SandyBridge",
    "Haswell",
    "Skylake-Client",
];

/// Everything the checks of one (instance, destination) pair are decided on.
#[derive(Debug, Clone)]
pub struct CheckInput<'a> {
    pub instance: &'a Instance,
    pub kind: MigrationKind,
    pub source_name: &'a str,
    pub source: Option<&'a HostFacts>,
    pub dest_name: &'a str,
    pub dest: Option<&'a HostFacts>,
    pub dest_enabled: bool,
    pub dest_online: bool,
    /// The destination agent answered `GET /v1/facts` just now.
    pub dest_agent_answered: bool,
    /// When the agent did not answer: the facts are the last heartbeat's.
    pub dest_facts_stale: bool,
    pub inbound_active: u32,
    pub inbound_limit: u32,
    /// Migrations of this instance in flight, other than the one being checked.
    pub other_migrations: Vec<Uuid>,
    /// `None`: not probed.
    pub probe: Option<&'a ProbeResult>,
    /// Features the instance's CPU model needs (from the source agent); `None`: unknown.
    pub cpu_features: Option<&'a [String]>,
    /// Why the features are unknown.
    pub cpu_features_error: Option<&'a str>,
    /// The newest model every online host supports, for hints.
    pub cluster_baseline: Option<&'a str>,
    pub qemu_rule: QemuVersionRule,
    /// Cold migration: what each image takes on the source's datastore (measured by the
    /// source agent), the room its copy needs; images missing here count their virtual size.
    pub image_bytes: Option<&'a HashMap<ImageRef, u64>>,
    /// Live migration: the user's choice of destination datastore per local disk.
    pub disk_map: Option<&'a std::collections::BTreeMap<String, String>>,
}

fn result(
    name: &str,
    status: CheckStatus,
    message: impl Into<String>,
    hint: impl Into<String>,
    values: serde_json::Value,
    overridable: bool,
) -> CheckResult {
    let hint = if status == CheckStatus::Pass {
        String::new()
    } else {
        hint.into()
    };
    CheckResult {
        name: name.into(),
        status,
        message: message.into(),
        hint,
        values,
        overridable,
    }
}

fn pass(name: &str, message: impl Into<String>, values: serde_json::Value) -> CheckResult {
    result(name, CheckStatus::Pass, message, "", values, false)
}

/// Whether this verdict stops a migration (`force` overrides overridable failures).
pub fn blocks(c: &CheckResult, force: bool) -> bool {
    c.status == CheckStatus::Fail && !(c.overridable && force)
}

/// The whole suite, in a stable order. Checks that need facts are skipped when there are none.
pub fn run_all(input: &CheckInput) -> Vec<CheckResult> {
    let mut out = vec![
        host_online(input),
        host_enabled(input),
        agent_reachable(input),
        inbound_limit(input),
        instance_state(input),
    ];
    if let (Some(src), Some(dst)) = (input.source, input.dest) {
        out.push(memory(input.instance, dst));
        out.push(cpu_vendor(src, dst));
        out.push(cpu_features(input, dst));
        out.push(match input.kind {
            MigrationKind::Live => storage(
                input.instance,
                src,
                dst,
                input.disk_map.unwrap_or(&Default::default()),
                input.image_bytes,
            ),
            MigrationKind::Cold => cold_storage(input.instance, src, dst, input.image_bytes),
        });
        out.push(qemu_version(src, dst, input.qemu_rule));
        out.push(dirty_tracking(input.kind, src));
        out.push(machine_type(input.instance, src, dst));
        out.push(firmware(input.instance, dst));
        out.push(network(input.instance, dst));
    } else {
        let missing = if input.source.is_none() {
            input.source_name
        } else {
            input.dest_name
        };
        out.push(result(
            "facts",
            CheckStatus::Fail,
            format!("no facts known for host {missing}"),
            "start its agent and wait for a heartbeat",
            json!({"host": missing}),
            false,
        ));
    }
    if let Some(p) = input.probe {
        out.push(migration_port(p));
    }
    out
}

pub fn host_online(i: &CheckInput) -> CheckResult {
    if i.dest_online {
        pass(
            "host-online",
            format!("{} is online", i.dest_name),
            json!({}),
        )
    } else {
        result(
            "host-online",
            CheckStatus::Fail,
            format!("host {} is offline", i.dest_name),
            "start its agent or pick another host",
            json!({}),
            false,
        )
    }
}

pub fn host_enabled(i: &CheckInput) -> CheckResult {
    if i.dest_enabled {
        pass(
            "host-enabled",
            format!("{} is enabled", i.dest_name),
            json!({}),
        )
    } else {
        result(
            "host-enabled",
            CheckStatus::Fail,
            format!("host {} is disabled", i.dest_name),
            format!(
                "enable it (`ferry host enable {}`) or pick another host",
                i.dest_name
            ),
            json!({}),
            false,
        )
    }
}

pub fn agent_reachable(i: &CheckInput) -> CheckResult {
    if i.dest_agent_answered {
        pass(
            "agent-reachable",
            format!("the agent on {} answered", i.dest_name),
            json!({}),
        )
    } else {
        let how = if i.dest_facts_stale {
            "; the checks used its last heartbeat's facts"
        } else {
            ""
        };
        result(
            "agent-reachable",
            CheckStatus::Fail,
            format!("the agent on {} did not answer{how}", i.dest_name),
            "check that the agent on that host runs (`ferry host list`)",
            json!({"stale_facts": i.dest_facts_stale}),
            false,
        )
    }
}

pub fn inbound_limit(i: &CheckInput) -> CheckResult {
    let values = json!({"active": i.inbound_active, "limit": i.inbound_limit});
    if i.inbound_active >= i.inbound_limit {
        result(
            "inbound-limit",
            CheckStatus::Warn,
            format!(
                "{} already receives {} migration(s), its limit; this one would queue",
                i.dest_name, i.inbound_active
            ),
            "it starts when a slot frees up, or pick another host",
            values,
            false,
        )
    } else {
        pass(
            "inbound-limit",
            format!(
                "{} of {} inbound slots in use",
                i.inbound_active, i.inbound_limit
            ),
            values,
        )
    }
}

pub fn instance_state(i: &CheckInput) -> CheckResult {
    let inst = i.instance;
    let values = json!({"state": inst.state, "kind": i.kind, "in_flight": i.other_migrations});
    if let Some(other) = i.other_migrations.first() {
        return result(
            "instance-state",
            CheckStatus::Fail,
            format!("{} already has migration {other} in flight", inst.name),
            "wait for it to end or cancel it",
            values,
            false,
        );
    }
    match (i.kind, inst.state) {
        (MigrationKind::Live, InstanceState::Running) => pass(
            "instance-state",
            format!("{} is running", inst.name),
            values,
        ),
        (MigrationKind::Cold, InstanceState::Stopped) => pass(
            "instance-state",
            format!("{} is stopped", inst.name),
            values,
        ),
        (MigrationKind::Live, s) => result(
            "instance-state",
            CheckStatus::Fail,
            format!(
                "{} is {}, so it cannot be migrated live",
                inst.name,
                state_word(s)
            ),
            "use a cold migration (--cold) for a stopped instance",
            values,
            false,
        ),
        (MigrationKind::Cold, s) => result(
            "instance-state",
            CheckStatus::Fail,
            format!(
                "{} is {}; a cold migration needs it stopped",
                inst.name,
                state_word(s)
            ),
            "stop it first, or migrate it live",
            values,
            false,
        ),
    }
}

fn state_word(s: InstanceState) -> &'static str {
    match s {
        InstanceState::Stopped => "stopped",
        InstanceState::Running => "running",
        InstanceState::Paused => "paused",
        InstanceState::Crashed => "crashed",
        InstanceState::Error => "in error",
        InstanceState::Unknown => "in an unknown state",
    }
}

pub fn memory(inst: &Instance, dst: &HostFacts) -> CheckResult {
    let needed = inst.spec.memory_mib as u64;
    let reserve = dst.ram_reserve_mib;
    let free = dst.ram_free_mib;
    let values = json!({"free_mib": free, "needed_mib": needed, "reserve_mib": reserve});
    if free >= needed + reserve {
        pass(
            "memory",
            format!(
                "{} MiB free on {}, {needed} MiB needed plus {reserve} MiB reserve",
                free, dst.name
            ),
            values,
        )
    } else {
        result(
            "memory",
            CheckStatus::Fail,
            format!(
                "{} has {free} MiB free; {} needs {needed} MiB plus the host's {reserve} MiB reserve",
                dst.name, inst.name
            ),
            "free memory on that host, pick another, or --force if you know better",
            values,
            true,
        )
    }
}

pub fn cpu_vendor(src: &HostFacts, dst: &HostFacts) -> CheckResult {
    let values = json!({"source": src.cpu_vendor, "destination": dst.cpu_vendor});
    if src.cpu_vendor == dst.cpu_vendor {
        pass(
            "cpu-vendor",
            format!("both hosts are {}", src.cpu_vendor),
            values,
        )
    } else {
        result(
            "cpu-vendor",
            CheckStatus::Fail,
            format!(
                "{} is {} but {} is {}; a guest cannot move between CPU vendors live",
                src.name, src.cpu_vendor, dst.name, dst.cpu_vendor
            ),
            "pick a host with the same CPU vendor, or migrate it cold",
            values,
            false,
        )
    }
}

/// Features of `needed` the host flags lack, in order.
pub fn missing_features(needed: &[String], flags: &[String]) -> Vec<String> {
    needed
        .iter()
        .filter(|f| !flags.iter().any(|h| h == *f))
        .cloned()
        .collect()
}

/// The newest of [`BASELINE_MODELS`] whose features every host has. `models` pairs a model
/// name with its features (models the source could not expand are left out).
pub fn cluster_baseline(models: &[(String, Vec<String>)], hosts: &[&[String]]) -> Option<String> {
    BASELINE_MODELS.iter().rev().find_map(|name| {
        let (_, features) = models.iter().find(|(m, _)| m == name)?;
        hosts
            .iter()
            .all(|flags| missing_features(features, flags).is_empty())
            .then(|| name.to_string())
    })
}

pub fn cpu_features(i: &CheckInput, dst: &HostFacts) -> CheckResult {
    let model = &i.instance.spec.cpu_model;
    let Some(needed) = i.cpu_features else {
        return result(
            "cpu-features",
            CheckStatus::Warn,
            format!(
                "the features of CPU model {model} are unknown{}",
                i.cpu_features_error
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            ),
            "check that the source agent runs; the destination QEMU refuses a CPU it cannot run",
            json!({"model": model}),
            false,
        );
    };
    let missing = missing_features(needed, &dst.cpu_flags);
    let values = json!({"model": model, "missing": missing});
    if missing.is_empty() {
        pass(
            "cpu-features",
            format!(
                "{} has all {} features CPU model {model} needs",
                dst.name,
                needed.len()
            ),
            values,
        )
    } else {
        let suggestion = match i.cluster_baseline {
            Some(b) => format!("; CPU model {b} runs on every online host"),
            None => "; no named model runs on every online host".into(),
        };
        result(
            "cpu-features",
            CheckStatus::Fail,
            format!(
                "{} lacks {} of CPU model {model}",
                dst.name,
                missing.join(", ")
            ),
            format!(
                "pick a host with {}, or give the instance an older CPU model{suggestion}",
                missing.join(", ")
            ),
            values,
            false,
        )
    }
}

/// The datastore of `stores` whose path holds `file`, the deepest one.
pub(crate) fn covering<'a>(stores: &'a [DatastoreFacts], file: &str) -> Option<&'a DatastoreFacts> {
    stores
        .iter()
        .filter(|d| Path::new(file).starts_with(Path::new(&d.path)))
        .max_by_key(|d| d.path.len())
}

/// The verdicts on the kernel and initrd files (read at boot from a datastore the destination
/// must mount too), appended to the storage check's findings.
fn kernel_files(
    inst: &Instance,
    src: &HostFacts,
    dst: &HostFacts,
    fails: &mut Vec<String>,
    warns: &mut Vec<String>,
    details: &mut Vec<serde_json::Value>,
) {
    let boot = &inst.spec.boot;
    for file in [&boot.kernel, &boot.initrd].into_iter().flatten() {
        let s = covering(&src.datastores, file);
        let d = covering(&dst.datastores, file);
        let verdict = match (s, d) {
            (Some(s), None) => {
                fails.push(format!(
                    "{file} is on datastore {} of {}, which {} does not have",
                    s.name, src.name, dst.name
                ));
                "fail"
            }
            (None, None) => {
                warns.push(format!(
                    "{file} is on no datastore of either host; it cannot be shown to be shared"
                ));
                "warn"
            }
            (None, Some(d)) => {
                warns.push(format!(
                    "{file} is on datastore {} of {} but on none of {}",
                    d.name, dst.name, src.name
                ));
                "warn"
            }
            (Some(s), Some(d)) => match (&s.identity, &d.identity) {
                (Some(a), Some(b)) if a == b => "pass",
                (None, None) => {
                    warns.push(format!(
                        "{file}: datastores {} and {} have no identity file, so they cannot be \
                         shown to be the same storage",
                        s.name, d.name
                    ));
                    "warn"
                }
                (a, b) => {
                    fails.push(format!(
                        "{file}: datastore {} on {} (identity {}) is not the same storage as {} \
                         on {} (identity {})",
                        s.name,
                        src.name,
                        a.as_deref().unwrap_or("none"),
                        d.name,
                        dst.name,
                        b.as_deref().unwrap_or("none")
                    ));
                    "fail"
                }
            },
        };
        details.push(json!({
            "file": file,
            "source_datastore": s.map(|d| &d.name),
            "destination_datastore": d.map(|d| &d.name),
            "verdict": verdict,
        }));
    }
}

/// Whether `image` is on a datastore both hosts mount as the same storage (same name, same
/// identity file).
fn shared(image: &ImageRef, src: &HostFacts, dst: &HostFacts) -> bool {
    let s = src.datastores.iter().find(|d| d.name == image.datastore);
    let d = dst.datastores.iter().find(|d| d.name == image.datastore);
    matches!((s, d), (Some(s), Some(d)) if s.identity.is_some() && s.identity == d.identity)
}

/// One image a cold migration copies: to the datastore of the same name on the destination,
/// under the same file name, so the instance's spec stays valid there unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedCopy {
    /// The disk's id, or `nvram`.
    pub disk: String,
    pub image: ImageRef,
    /// How the content is read and written: the disk's format for a self-contained image;
    /// `raw` (the file byte for byte) for a qcow2 overlay, whose backing reference must stay
    /// as it is, and for the NVRAM file.
    pub format: DiskFormat,
    /// How a guest reads it, which the checksums compare: the disk's format (an overlay with
    /// its base), raw for the NVRAM.
    pub guest_format: DiskFormat,
    /// Virtual size from the spec; the agents measure the real one before copying.
    pub size_bytes: u64,
}

/// The images of `inst` that are not on storage `dst` shares with `src`, in disk order, the
/// NVRAM last: what a cold migration to `dst` copies.
pub fn planned_copies(inst: &Instance, src: &HostFacts, dst: &HostFacts) -> Vec<PlannedCopy> {
    let mut out: Vec<PlannedCopy> = inst
        .spec
        .disks
        .iter()
        .filter(|d| !shared(&d.image, src, dst))
        .map(|d| PlannedCopy {
            disk: d.id.clone(),
            image: d.image.clone(),
            format: if d.backing.is_some() {
                DiskFormat::Raw
            } else {
                d.format
            },
            guest_format: d.format,
            size_bytes: d.size_bytes,
        })
        .collect();
    if let Some(n) = &inst.spec.boot.nvram {
        if !shared(n, src, dst) {
            out.push(PlannedCopy {
                disk: "nvram".into(),
                image: n.clone(),
                format: DiskFormat::Raw,
                guest_format: DiskFormat::Raw,
                size_bytes: 0,
            });
        }
    }
    out
}

/// Bytes in the largest binary unit that keeps a number of at least 1 ("5.0 MiB").
pub fn fmt_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The storage check of a cold migration: images on storage the destination shares stay; the
/// others are copied to the destination's datastore of the same name, which must exist and
/// have room for them (their measured size on the source, or their virtual size when it was
/// not measured). The message names every copy.
pub fn cold_storage(
    inst: &Instance,
    src: &HostFacts,
    dst: &HostFacts,
    image_bytes: Option<&HashMap<ImageRef, u64>>,
) -> CheckResult {
    let mut fails = Vec::new();
    let mut warns = Vec::new();
    let mut details = Vec::new();
    kernel_files(inst, src, dst, &mut fails, &mut warns, &mut details);
    let copies = planned_copies(inst, src, dst);
    let mut copy_values = Vec::new();
    let mut copy_words = Vec::new();
    let mut needed: HashMap<&str, u64> = HashMap::new();
    for c in &copies {
        let measured = image_bytes.and_then(|m| m.get(&c.image)).copied();
        let bytes = measured.unwrap_or(c.size_bytes);
        let target = dst.datastores.iter().find(|d| d.name == c.image.datastore);
        let what = if c.disk == "nvram" {
            "UEFI NVRAM".to_string()
        } else {
            format!("disk {}", c.disk)
        };
        match target {
            None => fails.push(format!(
                "{what} ({}) would be copied to datastore {}, which {} does not have",
                c.image, c.image.datastore, dst.name
            )),
            Some(d) => {
                *needed.entry(d.name.as_str()).or_default() += bytes;
                copy_words.push(format!(
                    "{what} ({}, {}{}) to datastore {} on {}",
                    c.image,
                    fmt_size(bytes),
                    if measured.is_some() { "" } else { " virtual" },
                    d.name,
                    dst.name
                ));
            }
        }
        copy_values.push(json!({
            "disk": c.disk,
            "image": c.image.to_string(),
            "format": c.format.as_str(),
            "bytes": bytes,
            "measured": measured.is_some(),
            "destination_datastore": target.map(|d| &d.name),
        }));
    }
    let mut stores: Vec<(&str, u64)> = needed.into_iter().collect();
    stores.sort();
    for (name, bytes) in &stores {
        if let Some(d) = dst.datastores.iter().find(|d| d.name == *name) {
            if *bytes > d.free_bytes {
                fails.push(format!(
                    "datastore {name} on {} has {} free; the copies need {}",
                    dst.name,
                    fmt_size(d.free_bytes),
                    fmt_size(*bytes)
                ));
            }
        }
    }
    let copy_text = if copy_words.is_empty() {
        String::new()
    } else {
        format!("will copy {}", copy_words.join(", "))
    };
    let values = json!({"files": details, "copies": copy_values});
    if !fails.is_empty() {
        return result(
            "storage",
            CheckStatus::Fail,
            fails.join("; "),
            format!(
                "a cold migration copies each disk to the datastore of the same name on the \
                 destination: configure that datastore on {} with enough free space, or pick \
                 another host",
                dst.name
            ),
            values,
            false,
        );
    }
    if !warns.is_empty() {
        let mut message = warns.join("; ");
        if !copy_text.is_empty() {
            message = format!("{copy_text}; {message}");
        }
        return result(
            "storage",
            CheckStatus::Warn,
            message,
            "put the instance's files on a datastore with a .ferry-datastore-id file",
            values,
            false,
        );
    }
    let message = if copy_text.is_empty() {
        format!("the instance's files are on storage {} shares", dst.name)
    } else {
        let shared_count =
            inst.spec.disks.len() + usize::from(inst.spec.boot.nvram.is_some()) - copies.len();
        let kept = if shared_count > 0 {
            format!("; {shared_count} image(s) stay on shared storage")
        } else {
            String::new()
        };
        format!("{copy_text}, checked by checksum; the source keeps its copy until cleanup{kept}")
    };
    pass("storage", message, values)
}

/// One local disk a live migration copies (block migration): from its image on the source to
/// `target` on the destination, under the same file name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockCopy {
    pub disk: String,
    pub source: ImageRef,
    pub target: ImageRef,
    pub format: DiskFormat,
    pub size_bytes: u64,
    /// What the image takes on the source (measured), or its virtual size when unmeasured.
    pub allocated_bytes: u64,
    pub measured: bool,
    /// Room kept free beyond `allocated_bytes`: the guest may allocate more while it copies.
    pub margin_bytes: u64,
    /// An overlay's base on shared storage: only the overlay is copied.
    pub backing: Option<ferry_api::instances::BackingRef>,
    /// Why this datastore: the user's mapping, or the most free room.
    pub reason: String,
}

impl BlockCopy {
    /// Room the copy needs on its datastore.
    pub fn required_bytes(&self) -> u64 {
        self.allocated_bytes + self.margin_bytes
    }
}

/// Room kept free beyond a disk's allocated bytes while it is copied live: 10 % of it, at
/// least 64 MiB.
pub fn copy_margin(allocated: u64) -> u64 {
    (allocated / 10).max(64 << 20)
}

/// Which local disks of `inst` a live migration to `dst` copies, and where: a disk on a
/// datastore both hosts share stays; every other disk goes to the datastore `disk_map` names
/// for it, else to the destination's datastore with the most free room that holds it. Fails
/// with one message per problem (unknown disk or datastore in the map, no room, a disk
/// larger than a datastore, a base image or NVRAM not shared).
pub fn block_copies(
    inst: &Instance,
    src: &HostFacts,
    dst: &HostFacts,
    disk_map: &std::collections::BTreeMap<String, String>,
    image_bytes: Option<&HashMap<ImageRef, u64>>,
) -> Result<Vec<BlockCopy>, Vec<String>> {
    let mut fails = Vec::new();
    for id in disk_map.keys() {
        if !inst.spec.disks.iter().any(|d| &d.id == id) {
            fails.push(format!(
                "--map-disk names disk {id}, which {} does not have",
                inst.name
            ));
        }
    }
    let mut held: HashMap<&str, u64> = HashMap::new();
    let mut out = Vec::new();
    for d in &inst.spec.disks {
        if let Some(b) = &d.backing {
            if !shared(&b.image, src, dst) {
                fails.push(format!(
                    "the base image of disk {} ({}) is not on storage {} shares; only an overlay's top image is copied",
                    d.id, b.image, dst.name
                ));
            }
        }
        if shared(&d.image, src, dst) {
            if let Some(ds) = disk_map.get(&d.id) {
                fails.push(format!(
                    "disk {} is on datastore {}, which {} shares: it stays in place and cannot be mapped to {ds}",
                    d.id, d.image.datastore, dst.name
                ));
            }
            continue;
        }
        let measured = image_bytes.and_then(|m| m.get(&d.image)).copied();
        let allocated = measured.unwrap_or(d.size_bytes);
        let margin = copy_margin(allocated);
        let need = allocated + margin;
        let room = |ds: &DatastoreFacts, held: &HashMap<&str, u64>| {
            ds.free_bytes
                .saturating_sub(held.get(ds.name.as_str()).copied().unwrap_or(0))
        };
        let (target, reason) = match disk_map.get(&d.id) {
            Some(name) => match dst.datastores.iter().find(|ds| &ds.name == name) {
                None => {
                    fails.push(format!(
                        "disk {} is mapped to datastore {name}, which {} does not have",
                        d.id, dst.name
                    ));
                    continue;
                }
                Some(ds) => (ds, "chosen with --map-disk".to_string()),
            },
            None => {
                let fits: Vec<&DatastoreFacts> = dst
                    .datastores
                    .iter()
                    .filter(|ds| ds.total_bytes >= d.size_bytes && room(ds, &held) >= need)
                    .collect();
                let most = fits.iter().map(|ds| room(ds, &held)).max().unwrap_or(0);
                // Within 1 % of the most (datastores on one file system measure alike), the
                // one named like the source's keeps the instance's layout.
                let best = fits
                    .iter()
                    .copied()
                    .filter(|ds| room(ds, &held) >= most - most / 100)
                    .max_by_key(|ds| (ds.name == d.image.datastore, room(ds, &held)));
                match best {
                    Some(ds) => (
                        ds,
                        format!(
                            "the most free room on {} ({})",
                            dst.name,
                            fmt_size(room(ds, &held))
                        ),
                    ),
                    None => {
                        fails.push(format!(
                            "disk {} ({}, {} + {} margin) fits on no datastore of {}",
                            d.id,
                            d.image,
                            fmt_size(allocated),
                            fmt_size(margin),
                            dst.name
                        ));
                        continue;
                    }
                }
            }
        };
        if target.total_bytes < d.size_bytes {
            fails.push(format!(
                "disk {} ({} virtual) is larger than datastore {} on {} ({} in all)",
                d.id,
                fmt_size(d.size_bytes),
                target.name,
                dst.name,
                fmt_size(target.total_bytes)
            ));
            continue;
        }
        if room(target, &held) < need {
            fails.push(format!(
                "datastore {} on {} has {} free; disk {} needs {} ({}{} + {} margin)",
                target.name,
                dst.name,
                fmt_size(room(target, &held)),
                d.id,
                fmt_size(need),
                fmt_size(allocated),
                if measured.is_some() {
                    " allocated"
                } else {
                    " virtual"
                },
                fmt_size(margin)
            ));
            continue;
        }
        *held.entry(target.name.as_str()).or_default() += need;
        out.push(BlockCopy {
            disk: d.id.clone(),
            source: d.image.clone(),
            target: ImageRef {
                datastore: target.name.clone(),
                file: d.image.file.clone(),
            },
            format: d.format,
            size_bytes: d.size_bytes,
            allocated_bytes: allocated,
            measured: measured.is_some(),
            margin_bytes: margin,
            backing: d.backing.clone(),
            reason,
        });
    }
    if fails.is_empty() {
        Ok(out)
    } else {
        Err(fails)
    }
}

/// Live migration: every file the destination opens must be reachable there. Disks on
/// datastores both hosts share stay; local disks are copied live (block migration) to the
/// datastore [`block_copies`] picks, which must have room for them. Base images and the UEFI
/// NVRAM must be shared.
pub fn storage(
    inst: &Instance,
    src: &HostFacts,
    dst: &HostFacts,
    disk_map: &std::collections::BTreeMap<String, String>,
    image_bytes: Option<&HashMap<ImageRef, u64>>,
) -> CheckResult {
    let mut fails = Vec::new();
    let mut warns = Vec::new();
    let mut details = Vec::new();
    kernel_files(inst, src, dst, &mut fails, &mut warns, &mut details);
    if let Some(n) = &inst.spec.boot.nvram {
        if !shared(n, src, dst) {
            fails.push(format!(
                "the UEFI NVRAM ({n}) is on datastore {}, which {} does not share; a live migration does not copy it",
                n.datastore, dst.name
            ));
        }
    }
    let copies = match block_copies(inst, src, dst, disk_map, image_bytes) {
        Ok(c) => c,
        Err(f) => {
            fails.extend(f);
            Vec::new()
        }
    };
    let stays: Vec<String> = inst
        .spec
        .disks
        .iter()
        .filter(|d| shared(&d.image, src, dst))
        .map(|d| {
            format!(
                "disk {} stays on shared datastore {}",
                d.id, d.image.datastore
            )
        })
        .collect();
    let moves: Vec<String> = copies
        .iter()
        .map(|c| {
            format!(
                "disk {} ({}, {}{} + {} margin) copied live to datastore {} on {}: {}",
                c.disk,
                c.source,
                fmt_size(c.allocated_bytes),
                if c.measured { "" } else { " virtual" },
                fmt_size(c.margin_bytes),
                c.target.datastore,
                dst.name,
                c.reason
            )
        })
        .collect();
    let values = json!({"files": details, "copies": copies, "stays": stays});
    if !fails.is_empty() {
        return result(
            "storage",
            CheckStatus::Fail,
            fails.join("; "),
            format!(
                "map the disk to a datastore of {} with room (--map-disk DISK=DATASTORE), free \
                 space there, or pick another host; base images and the NVRAM must be on a \
                 datastore both hosts share (same name and .ferry-datastore-id)",
                dst.name
            ),
            values,
            false,
        );
    }
    let words: Vec<String> = moves.into_iter().chain(stays).collect();
    if !warns.is_empty() {
        return result(
            "storage",
            CheckStatus::Warn,
            warns
                .into_iter()
                .chain(words)
                .collect::<Vec<_>>()
                .join("; "),
            "put the instance's files on a datastore with a .ferry-datastore-id file",
            values,
            false,
        );
    }
    let message = if words.is_empty() {
        format!("the instance's files are on storage {} shares", dst.name)
    } else {
        words.join("; ")
    };
    pass("storage", message, values)
}

/// `major.minor` of a QEMU version string ("8.2.2", "QEMU emulator version 7.2.0 (...)").
pub fn parse_major_minor(v: &str) -> Option<(u32, u32)> {
    v.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .find(|w| w.contains('.'))
        .and_then(|w| {
            let mut parts = w.split('.');
            let major = parts.next()?.parse().ok()?;
            let minor = parts.next()?.parse().ok()?;
            Some((major, minor))
        })
}

/// The source's dirty-page tracking can be trusted for a live migration.
///
/// Before QEMU 9.0 (commit 03bfc2188f06), TCG could miss guest writes made while the migration
/// bitmap was synced: the guest resumed on the destination with stale pages. Measured on QEMU
/// 7.2 here: 2 to 24 stale kernel pages in most migrations that needed more than one pass, seen
/// as broken TCP connections and a replayed serial log. KVM's dirty log is exact.
pub fn dirty_tracking(kind: MigrationKind, src: &HostFacts) -> CheckResult {
    let values = json!({"accel": src.accel, "qemu_version": src.qemu_version});
    if kind != MigrationKind::Live || src.accel != "tcg" {
        return pass(
            "dirty-tracking",
            format!("{} tracks dirty pages with {}", src.name, src.accel),
            values,
        );
    }
    match parse_major_minor(&src.qemu_version) {
        Some(v) if v >= (9, 0) => pass(
            "dirty-tracking",
            format!("{} runs TCG on QEMU {}.{}, whose dirty tracking is exact", src.name, v.0, v.1),
            values,
        ),
        v => result(
            "dirty-tracking",
            CheckStatus::Fail,
            format!(
                "{} runs TCG on QEMU {}, which can miss dirty pages: the guest could resume with stale memory",
                src.name,
                v.map(|v| format!("{}.{}", v.0, v.1)).unwrap_or_else(|| src.qemu_version.clone())
            ),
            "upgrade QEMU to 9.0 or later on the source, or migrate the instance stopped (--cold)",
            values,
            false,
        ),
    }
}

/// QEMU versions compatible under the configured rule.
pub fn qemu_version(src: &HostFacts, dst: &HostFacts, rule: QemuVersionRule) -> CheckResult {
    let values = json!({"source": src.qemu_version, "destination": dst.qemu_version, "rule": rule});
    if rule == QemuVersionRule::Any {
        return pass("qemu-version", "the version rule is `any`", values);
    }
    match (
        parse_major_minor(&src.qemu_version),
        parse_major_minor(&dst.qemu_version),
    ) {
        (Some(s), Some(d)) if d == s => pass(
            "qemu-version",
            format!("both hosts run QEMU {}.{}", s.0, s.1),
            values,
        ),
        (Some(s), Some(d)) if d > s && rule == QemuVersionRule::SameMinor => result(
            "qemu-version",
            CheckStatus::Fail,
            format!(
                "{} runs QEMU {}.{} and {} runs {}.{}; the rule asks for the same version",
                dst.name, d.0, d.1, src.name, s.0, s.1
            ),
            "pick a host with the same QEMU, or --force",
            values,
            true,
        ),
        (Some(s), Some(d)) if d > s => pass(
            "qemu-version",
            format!(
                "{} runs a newer QEMU ({}.{}) than {} ({}.{}); a migration back may not work",
                dst.name, d.0, d.1, src.name, s.0, s.1
            ),
            values,
        ),
        (Some(s), Some(d)) => result(
            "qemu-version",
            CheckStatus::Fail,
            format!(
                "{} runs QEMU {}.{}, older than {}.{} on {}; an older QEMU may not load the stream",
                dst.name, d.0, d.1, s.0, s.1, src.name
            ),
            "upgrade QEMU on the destination, pick another host, or --force",
            values,
            true,
        ),
        _ => result(
            "qemu-version",
            CheckStatus::Warn,
            "a QEMU version is unknown",
            "check `qemu-system-x86_64 --version` on both hosts",
            values,
            true,
        ),
    }
}

/// The machine type `machine` names on a host offering `types`: an unversioned alias (`pc`,
/// `q35`) is the newest versioned type of its family there.
pub fn resolve_machine(machine: &str, types: &[String]) -> String {
    let family = match machine {
        "pc" => "pc-i440fx-",
        "q35" => "pc-q35-",
        _ => return machine.to_string(),
    };
    types
        .iter()
        .filter_map(|t| {
            let v = t.strip_prefix(family)?;
            let (a, b) = v.split_once('.')?;
            Some(((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?), t))
        })
        .max_by_key(|(v, _)| *v)
        .map(|(_, t)| t.clone())
        .unwrap_or_else(|| machine.to_string())
}

pub fn machine_type(inst: &Instance, src: &HostFacts, dst: &HostFacts) -> CheckResult {
    let machine = &inst.spec.machine;
    let resolved = resolve_machine(machine, &src.machine_types);
    let values = json!({"machine": machine, "resolved": resolved});
    if dst.machine_types.contains(&resolved) {
        let via = if resolved != *machine {
            format!(" ({machine} on {})", src.name)
        } else {
            String::new()
        };
        pass(
            "machine-type",
            format!("{} offers machine type {resolved}{via}", dst.name),
            values,
        )
    } else {
        result(
            "machine-type",
            CheckStatus::Fail,
            format!(
                "{} does not offer machine type {resolved}{}",
                dst.name,
                if resolved != *machine {
                    format!(" (what {machine} means on {})", src.name)
                } else {
                    String::new()
                }
            ),
            "pick a host whose QEMU has that machine type, or upgrade its QEMU",
            values,
            false,
        )
    }
}

/// The destination must have the instance's firmware: a UEFI guest's NVRAM and flash layout
/// only exist where OVMF is installed.
pub fn firmware(inst: &Instance, dst: &HostFacts) -> CheckResult {
    let wanted = inst.spec.boot.firmware.as_str();
    let values = json!({"firmware": wanted, "offered": dst.firmware});
    // Agents older than disks report no list; they boot SeaBIOS only.
    if wanted == "bios" || dst.firmware.iter().any(|f| f == wanted) {
        pass(
            "firmware",
            format!("{} boots {wanted} guests", dst.name),
            values,
        )
    } else {
        result(
            "firmware",
            CheckStatus::Fail,
            format!("{} has no {wanted} firmware", dst.name),
            "install Debian's ovmf package on that host (its agent reports it at once), or \
             pick another host",
            values,
            false,
        )
    }
}

pub fn network(inst: &Instance, dst: &HostFacts) -> CheckResult {
    let missing: Vec<String> = inst
        .spec
        .nics
        .iter()
        .map(|n| n.network.clone())
        .filter(|n| !dst.networks.iter().any(|d| d.name == *n))
        .collect();
    let values = json!({"missing": missing});
    if missing.is_empty() {
        pass(
            "network",
            format!("{} attaches every network of {}", dst.name, inst.name),
            values,
        )
    } else {
        result(
            "network",
            CheckStatus::Fail,
            format!(
                "{} is not attached to network {}; its networks: {}",
                dst.name,
                missing.join(", "),
                ferry_api::hosts::networks_list(
                    dst.networks
                        .iter()
                        .map(|n| (n.name.as_str(), n.bridge.as_str()))
                )
            ),
            "attach the network in that host's agent configuration, or pick another host",
            values,
            false,
        )
    }
}

pub fn migration_port(p: &ProbeResult) -> CheckResult {
    let values = json!({
        "latency_ms": p.latency_ms,
        "bandwidth_mbit_s": p.bandwidth_mbit_s,
        "error": p.error,
    });
    if p.connected {
        let mut msg = "the source reaches the destination's migration port".to_string();
        if let Some(l) = p.latency_ms {
            msg.push_str(&format!(", {l:.2} ms round trip"));
        }
        if let Some(b) = p.bandwidth_mbit_s {
            msg.push_str(&format!(", {b:.0} Mbit/s"));
        }
        pass("migration-port-reachable", msg, values)
    } else {
        result(
            "migration-port-reachable",
            CheckStatus::Fail,
            format!(
                "the source cannot reach the destination's migration port{}",
                p.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
            "check the migration network and firewalls between the hosts (migration_addr, \
             migration_ports)",
            values,
            false,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use ferry_api::hosts::NetworkFacts;
    use ferry_api::instances::{BootSpec, InstanceSpec, NicSpec};

    fn facts(name: &str) -> HostFacts {
        HostFacts {
            name: name.into(),
            cpu_vendor: "GenuineIntel".into(),
            cpu_model: "Xeon".into(),
            cpu_flags: ["fpu", "sse", "sse2", "cx16", "lm"]
                .map(String::from)
                .to_vec(),
            cores: 4,
            ram_total_mib: 8192,
            ram_free_mib: 4096,
            ram_reserve_mib: 512,
            accel: "kvm".into(),
            qemu_version: "8.2.2".into(),
            machine_types: ["pc", "pc-i440fx-8.1", "pc-i440fx-8.2", "q35", "pc-q35-8.2"]
                .map(String::from)
                .to_vec(),
            firmware: vec!["bios".into()],
            datastores: vec![DatastoreFacts {
                name: "shared".into(),
                path: "/srv/shared".into(),
                total_bytes: 1,
                free_bytes: 1,
                identity: Some("nfs-1".into()),
            }],
            networks: vec![NetworkFacts {
                name: "lab".into(),
                bridge: "br0".into(),
                subnet: None,
            }],
            migration_addr: "10.0.0.1".into(),
            migration_ports: "49152-49215".into(),
            agent_version: "0.1.0".into(),
        }
    }

    fn instance() -> Instance {
        Instance {
            id: Uuid::nil(),
            name: "vm".into(),
            host: "a".into(),
            state: InstanceState::Running,
            generation: 0,
            spec: InstanceSpec {
                memory_mib: 1024,
                vcpus: 1,
                cpu_model: "qemu64".into(),
                machine: "pc".into(),
                boot: BootSpec {
                    kernel: Some("/srv/shared/vmlinuz".into()),
                    initrd: Some("/srv/shared/initrd".into()),
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
            migration: None,
            guest: None,
            warnings: Vec::new(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
        }
    }

    fn input<'a>(inst: &'a Instance, src: &'a HostFacts, dst: &'a HostFacts) -> CheckInput<'a> {
        CheckInput {
            instance: inst,
            kind: MigrationKind::Live,
            source_name: "a",
            source: Some(src),
            dest_name: "b",
            dest: Some(dst),
            dest_enabled: true,
            dest_online: true,
            dest_agent_answered: true,
            dest_facts_stale: false,
            inbound_active: 0,
            inbound_limit: 2,
            other_migrations: vec![],
            probe: None,
            cpu_features: None,
            cpu_features_error: None,
            cluster_baseline: None,
            qemu_rule: QemuVersionRule::SameOrNewer,
            image_bytes: None,
            disk_map: None,
        }
    }

    fn status_of(checks: &[CheckResult], name: &str) -> CheckStatus {
        checks.iter().find(|c| c.name == name).unwrap().status
    }

    #[test]
    fn a_fit_pair_passes_everything_but_unknown_features() {
        let (i, s, d) = (instance(), facts("a"), facts("b"));
        let feats: Vec<String> = vec!["sse2".into()];
        let mut inp = input(&i, &s, &d);
        inp.cpu_features = Some(&feats);
        let all = run_all(&inp);
        assert!(
            all.iter()
                .all(|c| c.status == CheckStatus::Pass && c.hint.is_empty()),
            "{all:#?}"
        );
        assert!(!all.iter().any(|c| c.name == "migration-port-reachable"));
        inp.cpu_features = None;
        assert_eq!(status_of(&run_all(&inp), "cpu-features"), CheckStatus::Warn);
    }

    #[test]
    fn host_state_checks() {
        let (i, s, d) = (instance(), facts("a"), facts("b"));
        let mut inp = input(&i, &s, &d);
        inp.dest_online = false;
        inp.dest_enabled = false;
        inp.dest_agent_answered = false;
        inp.dest_facts_stale = true;
        for c in [host_online(&inp), host_enabled(&inp), agent_reachable(&inp)] {
            assert_eq!(c.status, CheckStatus::Fail, "{c:?}");
            assert!(!c.overridable && !c.hint.is_empty());
        }
        assert!(agent_reachable(&inp).message.contains("heartbeat"));
    }

    #[test]
    fn inbound_limit_warns_at_the_limit() {
        let (i, s, d) = (instance(), facts("a"), facts("b"));
        let mut inp = input(&i, &s, &d);
        inp.inbound_active = 1;
        assert_eq!(inbound_limit(&inp).status, CheckStatus::Pass);
        inp.inbound_active = 2;
        assert_eq!(inbound_limit(&inp).status, CheckStatus::Warn);
    }

    #[test]
    fn instance_state_for_live_cold_and_in_flight() {
        let (mut i, s, d) = (instance(), facts("a"), facts("b"));
        assert_eq!(instance_state(&input(&i, &s, &d)).status, CheckStatus::Pass);
        let mut inp = input(&i, &s, &d);
        inp.kind = MigrationKind::Cold;
        assert_eq!(instance_state(&inp).status, CheckStatus::Fail);
        inp.other_migrations = vec![Uuid::new_v4()];
        inp.kind = MigrationKind::Live;
        let c = instance_state(&inp);
        assert!(c.status == CheckStatus::Fail && c.message.contains("in flight"));
        i.state = InstanceState::Stopped;
        let mut inp = input(&i, &s, &d);
        assert_eq!(instance_state(&inp).status, CheckStatus::Fail);
        inp.kind = MigrationKind::Cold;
        assert_eq!(instance_state(&inp).status, CheckStatus::Pass);
    }

    #[test]
    fn memory_needs_instance_plus_reserve() {
        let (i, mut d) = (instance(), facts("b"));
        d.ram_free_mib = 1536;
        assert_eq!(memory(&i, &d).status, CheckStatus::Pass);
        d.ram_free_mib = 1535;
        let c = memory(&i, &d);
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.overridable);
        assert_eq!(c.values["needed_mib"], 1024);
        assert_eq!(c.values["free_mib"], 1535);
        assert_eq!(c.values["reserve_mib"], 512);
        assert!(blocks(&c, false) && !blocks(&c, true));
    }

    #[test]
    fn cpu_vendor_must_match() {
        let (s, mut d) = (facts("a"), facts("b"));
        assert_eq!(cpu_vendor(&s, &d).status, CheckStatus::Pass);
        d.cpu_vendor = "AuthenticAMD".into();
        let c = cpu_vendor(&s, &d);
        assert!(c.status == CheckStatus::Fail && !c.overridable && blocks(&c, true));
    }

    #[test]
    fn cpu_features_name_what_is_missing_and_a_baseline() {
        let (i, s, mut d) = (instance(), facts("a"), facts("b"));
        d.cpu_flags.retain(|f| f != "cx16");
        let feats: Vec<String> = vec!["sse2".into(), "cx16".into()];
        let mut inp = input(&i, &s, &d);
        inp.cpu_features = Some(&feats);
        inp.cluster_baseline = Some("qemu64");
        let c = cpu_features(&inp, &d);
        assert_eq!(c.status, CheckStatus::Fail);
        assert_eq!(c.values["missing"], json!(["cx16"]));
        assert!(
            c.hint.contains("cx16") && c.hint.contains("qemu64"),
            "{c:?}"
        );
        assert!(!c.overridable);
    }

    #[test]
    fn baseline_is_the_newest_model_every_host_runs() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let models = vec![
            ("qemu64".to_string(), v(&["sse2"])),
            ("Nehalem".to_string(), v(&["sse2", "sse4_2"])),
            ("Haswell".to_string(), v(&["sse2", "sse4_2", "avx2"])),
        ];
        let a = v(&["sse2", "sse4_2", "avx2"]);
        let b = v(&["sse2", "sse4_2"]);
        let c = v(&["sse"]);
        assert_eq!(
            cluster_baseline(&models, &[&a, &b]).as_deref(),
            Some("Nehalem")
        );
        assert_eq!(cluster_baseline(&models, &[&a]).as_deref(), Some("Haswell"));
        assert_eq!(cluster_baseline(&models, &[&a, &c]), None);
    }

    fn live_storage(i: &Instance, s: &HostFacts, d: &HostFacts) -> CheckResult {
        storage(i, s, d, &Default::default(), None)
    }

    #[test]
    fn storage_compares_datastore_identities() {
        let (i, s, mut d) = (instance(), facts("a"), facts("b"));
        assert_eq!(live_storage(&i, &s, &d).status, CheckStatus::Pass);
        d.datastores[0].identity = Some("other".into());
        let c = live_storage(&i, &s, &d);
        assert_eq!(c.status, CheckStatus::Fail, "same path, other storage");
        d.datastores.clear();
        let c = live_storage(&i, &s, &d);
        assert!(c.status == CheckStatus::Fail && c.message.contains("does not have"));
        let mut s2 = s.clone();
        s2.datastores.clear();
        assert_eq!(live_storage(&i, &s2, &d).status, CheckStatus::Warn);
        let (mut s3, mut d3) = (s.clone(), facts("b"));
        s3.datastores[0].identity = None;
        d3.datastores[0].identity = None;
        assert_eq!(live_storage(&i, &s3, &d3).status, CheckStatus::Warn);
    }

    #[test]
    fn a_uefi_guest_needs_ovmf_on_the_destination() {
        let (mut i, mut d) = (instance(), facts("b"));
        assert_eq!(firmware(&i, &d).status, CheckStatus::Pass);
        i.spec.boot.firmware = ferry_api::instances::FirmwareKind::Uefi;
        let c = firmware(&i, &d);
        assert!(
            c.status == CheckStatus::Fail && c.hint.contains("ovmf"),
            "{c:?}"
        );
        d.firmware.push("uefi".into());
        assert_eq!(firmware(&i, &d).status, CheckStatus::Pass);
    }

    #[test]
    fn a_disk_not_on_shared_storage_fails_and_says_block_migration() {
        use ferry_api::instances::{DiskSpec, ImageRef};
        let (mut i, mut s, mut d) = (instance(), facts("a"), facts("b"));
        i.spec.disks = vec![DiskSpec {
            id: "disk0".into(),
            image: ImageRef {
                datastore: "shared".into(),
                file: "vm-disk0.qcow2".into(),
            },
            format: ferry_api::instances::DiskFormat::Qcow2,
            size_bytes: 1 << 30,
            bus: Default::default(),
            cache: Default::default(),
            read_only: false,
            serial: None,
            backing: None,
            managed: true,
        }];
        assert_eq!(live_storage(&i, &s, &d).status, CheckStatus::Pass);
        // An overlay on shared storage over a base on a local datastore cannot move.
        let mut over = i.clone();
        over.spec.disks[0].backing = Some(ferry_api::instances::BackingRef {
            image: ImageRef {
                datastore: "local".into(),
                file: "base.qcow2".into(),
            },
            format: ferry_api::instances::DiskFormat::Qcow2,
        });
        let c = live_storage(&over, &s, &d);
        assert!(
            c.status == CheckStatus::Fail && c.message.contains("base image of disk disk0"),
            "{c:?}"
        );
        for ds in [&mut s.datastores, &mut d.datastores] {
            ds.push(DatastoreFacts {
                name: "local".into(),
                path: "/var/lib/ferry/local".into(),
                total_bytes: 1,
                free_bytes: 1,
                identity: None,
            });
        }
        i.spec.disks[0].image.datastore = "local".into();
        let c = live_storage(&i, &s, &d);
        assert_eq!(
            c.status,
            CheckStatus::Fail,
            "same name, no identity: not shared, and 1 byte holds no disk: {c:?}"
        );
        assert!(
            c.message.contains("fits on no datastore of b"),
            "{}",
            c.message
        );
        assert!(c.hint.contains("--map-disk"), "{}", c.hint);
    }

    #[test]
    fn a_local_disk_maps_to_the_destination_datastore_with_the_most_room_or_the_users_choice() {
        use std::collections::BTreeMap;
        let (mut i, s) = (instance(), facts("a"));
        i.spec.disks = vec![local_disk("disk0", "vm-disk0.qcow2")];
        let store = |name: &str, free: u64| DatastoreFacts {
            name: name.into(),
            path: format!("/srv/{name}"),
            total_bytes: 100 << 30,
            free_bytes: free,
            identity: None,
        };
        let mut d = facts("b");
        let kept = d.datastores.clone();
        let with = |more: Vec<DatastoreFacts>| kept.iter().cloned().chain(more).collect::<Vec<_>>();
        d.datastores = with(vec![store("local", 20 << 30), store("fast", 50 << 30)]);
        let measured: HashMap<ImageRef, u64> = [(i.spec.disks[0].image.clone(), 2 << 30)].into();
        let none = BTreeMap::new();
        let copies = block_copies(&i, &s, &d, &none, Some(&measured)).unwrap();
        assert_eq!(copies.len(), 1);
        let c = &copies[0];
        assert_eq!(c.target.datastore, "fast", "{c:?}");
        assert!(c.reason.contains("most free room"), "{}", c.reason);
        assert_eq!(
            (c.allocated_bytes, c.margin_bytes),
            (2 << 30, (2 << 30) / 10)
        );
        assert_eq!(c.target.file, "vm-disk0.qcow2");
        // Within 1 %, the datastore named like the source's wins.
        d.datastores = with(vec![
            store("local", 50 << 30),
            store("fast", (50 << 30) + (1 << 20)),
        ]);
        let copies = block_copies(&i, &s, &d, &none, Some(&measured)).unwrap();
        assert_eq!(copies[0].target.datastore, "local");
        // The user's choice, and its refusals.
        let map: BTreeMap<String, String> = [("disk0".into(), "local".into())].into();
        d.datastores = with(vec![store("local", 20 << 30), store("fast", 50 << 30)]);
        let copies = block_copies(&i, &s, &d, &map, Some(&measured)).unwrap();
        assert_eq!(copies[0].target.datastore, "local");
        assert!(copies[0].reason.contains("--map-disk"));
        let check = storage(&i, &s, &d, &map, Some(&measured));
        assert_eq!(check.status, CheckStatus::Pass, "{check:?}");
        assert!(
            check
                .message
                .contains("copied live to datastore local on b"),
            "{}",
            check.message
        );
        assert_eq!(check.values["copies"][0]["target"]["datastore"], "local");
        let bad: BTreeMap<String, String> = [("disk0".into(), "nope".into())].into();
        let e = block_copies(&i, &s, &d, &bad, Some(&measured)).unwrap_err();
        assert!(e[0].contains("which b does not have"), "{e:?}");
        let ghost: BTreeMap<String, String> = [("disk9".into(), "local".into())].into();
        let e = block_copies(&i, &s, &d, &ghost, Some(&measured)).unwrap_err();
        assert!(e[0].contains("does not have"), "{e:?}");
        // Too little room for allocated + margin; a disk larger than the datastore.
        d.datastores = with(vec![store("local", 2 << 30)]);
        let e = block_copies(&i, &s, &d, &map, Some(&measured)).unwrap_err();
        assert!(
            e[0].contains("datastore local on b has 2.0 GiB free"),
            "{e:?}"
        );
        d.datastores = with(vec![DatastoreFacts {
            total_bytes: 5 << 30,
            ..store("local", 5 << 30)
        }]);
        let e = block_copies(&i, &s, &d, &map, Some(&measured)).unwrap_err();
        assert!(e[0].contains("is larger than datastore local"), "{e:?}");
        // Two disks on one datastore count together.
        i.spec.disks.push(local_disk("disk1", "vm-disk1.qcow2"));
        d.datastores = with(vec![store("local", 4 << 30)]);
        let both: HashMap<ImageRef, u64> = i
            .spec
            .disks
            .iter()
            .map(|d| (d.image.clone(), 2 << 30))
            .collect();
        let e = block_copies(&i, &s, &d, &none, Some(&both)).unwrap_err();
        assert!(e.iter().any(|m| m.contains("disk1")), "{e:?}");
    }

    fn local_disk(id: &str, file: &str) -> ferry_api::instances::DiskSpec {
        ferry_api::instances::DiskSpec {
            id: id.into(),
            image: ImageRef {
                datastore: "local".into(),
                file: file.into(),
            },
            format: DiskFormat::Qcow2,
            size_bytes: 10 << 30,
            bus: Default::default(),
            cache: Default::default(),
            read_only: false,
            serial: None,
            backing: None,
            managed: true,
        }
    }

    fn with_local(mut f: HostFacts, free: u64) -> HostFacts {
        f.datastores.push(DatastoreFacts {
            name: "local".into(),
            path: "/var/lib/ferry/local".into(),
            total_bytes: 100 << 30,
            free_bytes: free,
            identity: None,
        });
        f
    }

    #[test]
    fn a_cold_migration_copies_local_disks_and_says_which_and_where() {
        let mut i = instance();
        i.state = InstanceState::Stopped;
        i.spec.disks = vec![local_disk("disk0", "vm-disk0.qcow2")];
        i.spec.boot.nvram = Some(ImageRef {
            datastore: "shared".into(),
            file: "vm-vars.fd".into(),
        });
        let (s, d) = (with_local(facts("a"), 0), with_local(facts("b"), 50 << 30));
        let copies = planned_copies(&i, &s, &d);
        assert_eq!(
            copies.len(),
            1,
            "the NVRAM is on shared storage: {copies:?}"
        );
        assert_eq!(
            (copies[0].disk.as_str(), copies[0].format),
            ("disk0", DiskFormat::Qcow2)
        );
        // Unmeasured: the virtual size counts, and fits.
        let c = cold_storage(&i, &s, &d, None);
        assert_eq!(c.status, CheckStatus::Pass, "{}", c.message);
        assert!(
            c.message.contains(
                "disk disk0 (local:vm-disk0.qcow2, 10.0 GiB virtual) to datastore local on b"
            ),
            "{}",
            c.message
        );
        assert!(
            c.message.contains("1 image(s) stay on shared storage"),
            "{}",
            c.message
        );
        assert_eq!(c.values["copies"][0]["destination_datastore"], "local");
        // The live check copies it (block migration).
        assert_eq!(live_storage(&i, &s, &d).status, CheckStatus::Pass);
        // Too little room for the virtual size, enough for what is allocated.
        let small = with_local(facts("b"), 1 << 30);
        assert_eq!(cold_storage(&i, &s, &small, None).status, CheckStatus::Fail);
        let measured: HashMap<ImageRef, u64> = [(i.spec.disks[0].image.clone(), 5 << 20)].into();
        let c = cold_storage(&i, &s, &small, Some(&measured));
        assert_eq!(c.status, CheckStatus::Pass, "{}", c.message);
        assert!(c.message.contains("5.0 MiB)"), "{}", c.message);
        let tiny = with_local(facts("b"), 1 << 20);
        let c = cold_storage(&i, &s, &tiny, Some(&measured));
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(
            c.message
                .contains("has 1.0 MiB free; the copies need 5.0 MiB"),
            "{}",
            c.message
        );
        // No datastore of that name on the destination.
        let c = cold_storage(&i, &s, &facts("b"), None);
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.message.contains("which b does not have"), "{}", c.message);
        assert!(c.hint.contains("datastore of the same name"), "{}", c.hint);
        // Through run_all for a cold job.
        let (s2, d2) = (with_local(facts("a"), 0), with_local(facts("b"), 50 << 30));
        let mut input = input(&i, &s2, &d2);
        input.kind = MigrationKind::Cold;
        assert_eq!(status_of(&run_all(&input), "storage"), CheckStatus::Pass);
    }

    #[test]
    fn overlays_and_nvram_are_copied_as_files() {
        let mut i = instance();
        let mut overlay = local_disk("disk0", "vm-disk0.qcow2");
        overlay.backing = Some(ferry_api::instances::BackingRef {
            image: ImageRef {
                datastore: "shared".into(),
                file: "base.qcow2".into(),
            },
            format: DiskFormat::Qcow2,
        });
        i.spec.disks = vec![overlay];
        i.spec.boot.nvram = Some(ImageRef {
            datastore: "local".into(),
            file: "vm-vars.fd".into(),
        });
        let (s, d) = (with_local(facts("a"), 0), with_local(facts("b"), 50 << 30));
        let copies = planned_copies(&i, &s, &d);
        let got: Vec<(&str, DiskFormat)> =
            copies.iter().map(|c| (c.disk.as_str(), c.format)).collect();
        assert_eq!(
            got,
            [("disk0", DiskFormat::Raw), ("nvram", DiskFormat::Raw)]
        );
        assert_eq!(fmt_size(1536), "1.5 KiB");
        assert_eq!(fmt_size(12), "12 B");
    }

    #[test]
    fn qemu_versions() {
        let (s, mut d) = (facts("a"), facts("b"));
        assert_eq!(parse_major_minor("8.2.2"), Some((8, 2)));
        assert_eq!(
            parse_major_minor("QEMU emulator version 7.2.0 (Debian)"),
            Some((7, 2))
        );
        let rule = QemuVersionRule::SameOrNewer;
        assert_eq!(qemu_version(&s, &d, rule).status, CheckStatus::Pass);
        d.qemu_version = "9.0.0".into();
        let c = qemu_version(&s, &d, rule);
        assert!(c.status == CheckStatus::Pass && c.message.contains("newer"));
        let c = qemu_version(&s, &d, QemuVersionRule::SameMinor);
        assert!(c.status == CheckStatus::Fail && c.overridable, "{c:?}");
        d.qemu_version = "8.1.5".into();
        let c = qemu_version(&s, &d, rule);
        assert!(c.status == CheckStatus::Fail && c.overridable);
        assert_eq!(
            qemu_version(&s, &d, QemuVersionRule::Any).status,
            CheckStatus::Pass
        );
    }

    #[test]
    fn tcg_before_qemu_9_cannot_be_trusted_for_a_live_migration() {
        let mut s = facts("a");
        let check = |s: &HostFacts, kind| dirty_tracking(kind, s).status;
        assert_eq!(check(&s, MigrationKind::Live), CheckStatus::Pass);
        s.accel = "tcg".into();
        s.qemu_version = "7.2.22".into();
        let c = dirty_tracking(MigrationKind::Live, &s);
        assert!(c.status == CheckStatus::Fail && !c.overridable, "{c:?}");
        assert!(c.hint.contains("9.0"), "{c:?}");
        assert_eq!(check(&s, MigrationKind::Cold), CheckStatus::Pass);
        s.qemu_version = "10.0.2".into();
        assert_eq!(check(&s, MigrationKind::Live), CheckStatus::Pass);
    }

    #[test]
    fn machine_types_resolve_aliases() {
        let (i, s, mut d) = (instance(), facts("a"), facts("b"));
        assert_eq!(resolve_machine("pc", &s.machine_types), "pc-i440fx-8.2");
        assert_eq!(resolve_machine("q35", &s.machine_types), "pc-q35-8.2");
        assert_eq!(resolve_machine("microvm", &s.machine_types), "microvm");
        assert_eq!(machine_type(&i, &s, &d).status, CheckStatus::Pass);
        d.machine_types = ["pc", "pc-i440fx-8.1"].map(String::from).to_vec();
        let c = machine_type(&i, &s, &d);
        assert!(c.status == CheckStatus::Fail && c.message.contains("pc-i440fx-8.2"));
    }

    #[test]
    fn networks_must_be_attached() {
        let (i, mut d) = (instance(), facts("b"));
        assert_eq!(network(&i, &d).status, CheckStatus::Pass);
        d.networks.clear();
        let c = network(&i, &d);
        assert_eq!(c.status, CheckStatus::Fail);
        assert_eq!(c.values["missing"], json!(["lab"]));
        assert!(c.message.ends_with("its networks: none"), "{}", c.message);
        d.networks.push(NetworkFacts {
            name: "prod".into(),
            bridge: "br7".into(),
            subnet: None,
        });
        let c = network(&i, &d);
        assert!(
            c.message.ends_with("its networks: prod (bridge br7)"),
            "{}",
            c.message
        );
    }

    #[test]
    fn probe_verdicts() {
        let ok = ProbeResult {
            connected: true,
            latency_ms: Some(0.4),
            bandwidth_mbit_s: Some(900.0),
            error: None,
        };
        let c = migration_port(&ok);
        assert_eq!(c.status, CheckStatus::Pass);
        assert_eq!(c.values["latency_ms"], json!(0.4));
        let bad = ProbeResult {
            connected: false,
            latency_ms: None,
            bandwidth_mbit_s: None,
            error: Some("connection refused".into()),
        };
        let c = migration_port(&bad);
        assert!(c.status == CheckStatus::Fail && !c.overridable && c.message.contains("refused"));
        let (i, s, d) = (instance(), facts("a"), facts("b"));
        let mut inp = input(&i, &s, &d);
        inp.probe = Some(&bad);
        assert_eq!(
            status_of(&run_all(&inp), "migration-port-reachable"),
            CheckStatus::Fail
        );
    }

    #[test]
    fn missing_facts_fail() {
        let (i, s) = (instance(), facts("a"));
        let mut inp = input(&i, &s, &s);
        inp.dest = None;
        assert_eq!(status_of(&run_all(&inp), "facts"), CheckStatus::Fail);
    }
}
