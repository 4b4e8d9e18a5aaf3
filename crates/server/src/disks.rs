//! The disks of instances being created and deleted: what a request may ask for, turning
//! `CreateInstance.disks` into `spec.disks` through the host's agent, making sure no image is
//! used by two instances, and removing the images Ferry made when their instance goes.
//!
//! A create either ends with an instance record whose every image exists, or with no record
//! and no image it made: every image created so far is deleted again (through the same agent)
//! when a later step fails. Images Ferry was given (attached in place) are never deleted.
//!
//! Sharing rule: an image may appear in several instances only if every use is read-only (a
//! base under overlays, a read-only disk). Images are compared as storage sees them: the
//! same identity and file on a shared datastore, or the same host, datastore and file on a
//! local one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use ferry_api::agent::{DiskSource, PrepareDisk, PreparedDisk};
use ferry_api::hosts::{Host, HostFacts};
use ferry_api::instances::{
    CreateInstance, DiskFormat, DiskRequest, DiskSpec, FirmwareKind, ImageRef, InstanceSpec,
};
use ferry_api::ApiClient;
use tracing::warn;

use crate::server::AppState;
use crate::ServerError;

/// Disks per instance: each virtio-blk disk takes a PCI slot of the 32 the machine has.
pub const MAX_DISKS: usize = 16;
/// The largest disk Ferry creates (64 TiB): larger is almost certainly a typo in a size.
pub const MAX_DISK_BYTES: u64 = 64 << 40;
/// Disk sizes are whole sectors (a power of two, so a mask tells whole ones).
pub const SECTOR: u64 = 512;
/// How long an agent may take to prepare one disk: copying an image takes as long as its
/// data takes to move.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(3600);

fn invalid_disk(message: String) -> ServerError {
    ServerError::bad_request(
        "invalid-disk",
        message,
        "fix the named disk; see DiskRequest in /v1/openapi.json",
    )
}

/// Refuses control characters in a disk field (they would reach file names and logs).
fn printable(field: &str, value: &str) -> Result<(), ServerError> {
    if ferry_qemu::has_control_chars(value) {
        return Err(invalid_disk(format!(
            "{field} '{}' contains control characters",
            value.escape_debug()
        )));
    }
    Ok(())
}

/// An absolute host path without `..`, as image and backing paths must be.
fn plain_path(field: &str, value: &str) -> Result<(), ServerError> {
    printable(field, value)?;
    let p = std::path::Path::new(value);
    let plain = p.is_absolute()
        && p.components()
            .all(|c| !matches!(c, std::path::Component::ParentDir));
    if !plain {
        return Err(ServerError::bad_request(
            "invalid-disk",
            format!(
                "{field} '{}' must be an absolute path without '..'",
                value.escape_debug()
            ),
            "give the image's full path on the instance's host, inside a datastore",
        ));
    }
    Ok(())
}

/// Checks a disk size: more than 0, at most [`MAX_DISK_BYTES`], whole sectors.
pub fn check_size(field: &str, size: u64) -> Result<(), ServerError> {
    if size == 0 || size > MAX_DISK_BYTES || size & (SECTOR - 1) != 0 {
        return Err(ServerError::bad_request(
            "invalid-disk-size",
            format!(
                "{field} {size} must be a multiple of {SECTOR} bytes between {SECTOR} and \
                 {MAX_DISK_BYTES} (64 TiB)"
            ),
            "give the size in bytes, e.g. 10737418240 for 10 GiB",
        ));
    }
    Ok(())
}

/// The disk ids, in order: each request's own, else the lowest free `diskN`.
pub fn disk_ids(disks: &[DiskRequest]) -> Vec<String> {
    let mut taken: Vec<String> = disks.iter().filter_map(|d| d.id.clone()).collect();
    let mut next = 0usize;
    disks
        .iter()
        .map(|d| match &d.id {
            Some(id) => id.clone(),
            None => {
                while taken.contains(&format!("disk{next}")) {
                    next += 1;
                }
                let id = format!("disk{next}");
                taken.push(id.clone());
                id
            }
        })
        .collect()
}

/// Where one requested disk's content comes from, or why the request is contradictory.
fn source(i: usize, d: &DiskRequest) -> Result<DiskSource, ServerError> {
    let field = |name: &str| format!("disks[{i}].{name}");
    match (&d.image, d.size_bytes, &d.backing) {
        (Some(_), Some(_), _) => Err(invalid_disk(format!(
            "{} and {} are both given; an existing image keeps its own size",
            field("image"),
            field("size_bytes")
        ))),
        (Some(_), None, Some(_)) => Err(invalid_disk(format!(
            "{} and {} are both given; give one content source",
            field("image"),
            field("backing")
        ))),
        (Some(path), None, None) if d.copy => Ok(DiskSource::Copy {
            path: path.clone(),
            format: d.format,
        }),
        (Some(path), None, None) => Ok(DiskSource::Existing {
            path: path.clone(),
            format: d.format,
        }),
        (None, _, _) if d.copy => Err(invalid_disk(format!(
            "{} is set but {} is not: name the image to copy",
            field("copy"),
            field("image")
        ))),
        (None, None, None) => Err(invalid_disk(format!(
            "disks[{i}] needs a content source: size_bytes (a new disk), image (an existing \
             one) or backing (an overlay)"
        ))),
        (None, size, backing) => {
            let format = d.format.unwrap_or_default();
            if backing.is_some() && format != DiskFormat::Qcow2 {
                return Err(invalid_disk(format!(
                    "{} is {format}, but only a qcow2 disk can be an overlay on {}",
                    field("format"),
                    field("backing")
                )));
            }
            Ok(DiskSource::New {
                size_bytes: size,
                format,
                backing: backing.clone(),
            })
        }
    }
}

/// Checks the disk requests without any host: one content source each, sizes, paths,
/// names, and what QEMU would refuse (ids, serials, bus against machine, controller slots).
pub fn validate_requests(req: &CreateInstance) -> Result<(), ServerError> {
    if req.disks.len() > MAX_DISKS {
        return Err(invalid_disk(format!(
            "{} disks are more than the {MAX_DISKS} an instance may have",
            req.disks.len()
        )));
    }
    let ids = disk_ids(&req.disks);
    let mut placeholders = Vec::new();
    for (i, (d, id)) in req.disks.iter().zip(&ids).enumerate() {
        printable(&format!("disks[{i}].id"), id)?;
        if let Some(ds) = &d.datastore {
            printable(&format!("disks[{i}].datastore"), ds)?;
            if ds.is_empty() {
                return Err(invalid_disk(format!("disks[{i}].datastore is empty")));
            }
        }
        if let Some(serial) = &d.serial {
            printable(&format!("disks[{i}].serial"), serial)?;
        }
        if let Some(p) = &d.image {
            plain_path(&format!("disks[{i}].image"), p)?;
        }
        if let Some(p) = &d.backing {
            plain_path(&format!("disks[{i}].backing"), p)?;
        }
        if let Some(size) = d.size_bytes {
            check_size(&format!("disks[{i}].size_bytes"), size)?;
        }
        let src = source(i, d)?;
        // What QEMU checks, on stand-in paths: the images do not exist yet.
        let format = match &src {
            DiskSource::New { format, .. } => *format,
            _ => d.format.unwrap_or_default(),
        };
        placeholders.push(ferry_qemu::DiskSpec {
            id: id.clone(),
            path: format!("/ferry-placeholder/{i}").into(),
            format,
            bus: d.bus,
            cache: d.cache,
            read_only: d.read_only,
            serial: d.serial.clone(),
            backing: d.backing.as_ref().map(|_| ferry_qemu::BackingImage {
                path: format!("/ferry-placeholder/base-{i}").into(),
                format: DiskFormat::Qcow2,
            }),
        });
    }
    ferry_qemu::validate_disks(&placeholders, &req.spec.machine).map_err(|e| match e {
        ferry_qemu::QemuError::InvalidSpec { field, reason } => {
            invalid_disk(format!("{field} {reason}"))
        }
        e => invalid_disk(e.to_string()),
    })
}

/// Checks the disk requests against what the host reported: the datastores named exist, the
/// images and bases are inside one, UEFI firmware is installed. A host without facts yet is
/// left to its agent, which checks the same again.
pub fn validate_for_host(req: &CreateInstance, host: &Host) -> Result<(), ServerError> {
    let Some(facts) = &host.facts else {
        return Ok(());
    };
    if req.spec.boot.firmware == FirmwareKind::Uefi && !facts.firmware.iter().any(|f| f == "uefi") {
        return Err(ServerError::new(
            422,
            "uefi-unavailable",
            format!(
                "host {} cannot boot UEFI guests (it offers: {})",
                host.name,
                facts.firmware.join(", ")
            ),
            "install Debian's ovmf package on the host, pick a host that has it, or boot with \
             firmware bios",
        ));
    }
    let names: Vec<&str> = facts.datastores.iter().map(|d| d.name.as_str()).collect();
    for (i, d) in req.disks.iter().enumerate() {
        if let Some(ds) = &d.datastore {
            if !names.contains(&ds.as_str()) {
                return Err(ServerError::new(
                    422,
                    "unknown-datastore",
                    format!(
                        "disks[{i}].datastore '{}' is not a datastore of host {} (it has: {})",
                        ds.escape_debug(),
                        host.name,
                        if names.is_empty() {
                            "none".to_string()
                        } else {
                            names.join(", ")
                        }
                    ),
                    "name a datastore from `ferry datastore list` that this host mounts",
                ));
            }
        }
        for (field, path) in [("image", &d.image), ("backing", &d.backing)] {
            let Some(path) = path else { continue };
            if crate::checks::covering(&facts.datastores, path).is_none() {
                return Err(ServerError::new(
                    422,
                    "path-outside-datastores",
                    format!(
                        "disks[{i}].{field} '{}' is not inside a datastore of host {}",
                        path.escape_debug(),
                        host.name
                    ),
                    "put the image into a datastore (`ferry datastore list` shows their paths)",
                ));
            }
        }
    }
    Ok(())
}

/// The images a create made so far on one host, deleted again unless the create completes.
pub struct Created {
    host: String,
    images: Vec<ImageRef>,
}

impl Created {
    pub fn new(host: &str) -> Created {
        Created {
            host: host.to_string(),
            images: Vec::new(),
        }
    }

    pub fn images(&self) -> &[ImageRef] {
        &self.images
    }

    /// Deletes every image made so far, newest first. A failure is logged and audited as
    /// `disk.orphaned` (the operator must remove that file), and does not hide the error that
    /// caused the undo.
    pub async fn undo(self, state: &AppState, who: &str, instance: &str) {
        if self.images.is_empty() {
            return;
        }
        let agent = match crate::agents::agent_client(state, &self.host).await {
            Ok(a) => Some(a),
            Err(e) => {
                warn!(host = %self.host, error = %e, "cannot reach the agent to undo disks");
                None
            }
        };
        for image in self.images.iter().rev() {
            let result = match &agent {
                Some(a) => a
                    .post::<_, serde_json::Value>("/v1/disks/delete", image)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                None => Err("no agent client".to_string()),
            };
            if let Err(e) = result {
                warn!(host = %self.host, %image, error = %e, "image of a refused create left behind");
                let _ = state
                    .store
                    .audit(
                        who,
                        "disk.orphaned",
                        instance,
                        &serde_json::json!({"host": self.host, "image": image, "error": e}),
                    )
                    .await;
            }
        }
    }
}

/// What the agent made of the request: `spec.disks` and `spec.boot.nvram`.
pub struct Prepared {
    pub disks: Vec<DiskSpec>,
    pub nvram: Option<ImageRef>,
}

/// Asks `host`'s agent for every requested disk (and the NVRAM of a UEFI guest, next to the
/// first disk), in order. Images made are recorded in `created`; on an error the caller
/// undoes them.
pub async fn prepare(
    state: &AppState,
    host: &Host,
    req: &CreateInstance,
    created: &mut Created,
) -> Result<Prepared, ServerError> {
    let agent = crate::agents::agent_client(state, &host.name)
        .await?
        .with_timeout(PREPARE_TIMEOUT);
    let ids = disk_ids(&req.disks);
    let mut disks = Vec::new();
    for (i, (d, id)) in req.disks.iter().zip(ids).enumerate() {
        let source = source(i, d)?;
        let p = prepare_one(
            &agent,
            host,
            &req.name,
            &id,
            d.datastore.clone(),
            source,
            created,
        )
        .await?;
        disks.push(DiskSpec {
            id,
            image: p.image,
            format: p.format,
            size_bytes: p.size_bytes,
            bus: d.bus,
            cache: d.cache,
            read_only: d.read_only,
            serial: d.serial.clone(),
            backing: p.backing,
            managed: p.created,
        });
    }
    let nvram = if req.spec.boot.firmware == FirmwareKind::Uefi {
        let datastore = disks.first().map(|d| d.image.datastore.clone());
        let p = prepare_one(
            &agent,
            host,
            &req.name,
            "vars",
            datastore,
            DiskSource::UefiVars,
            created,
        )
        .await?;
        Some(p.image)
    } else {
        None
    };
    Ok(Prepared { disks, nvram })
}

async fn prepare_one(
    agent: &ApiClient,
    host: &Host,
    instance: &str,
    id: &str,
    datastore: Option<String>,
    source: DiskSource,
    created: &mut Created,
) -> Result<PreparedDisk, ServerError> {
    let req = PrepareDisk {
        instance: instance.to_string(),
        id: id.to_string(),
        datastore,
        source,
    };
    let p: PreparedDisk = agent
        .post("/v1/disks", &req)
        .await
        .map_err(|e| ServerError::from_agent(&host.name, e))?;
    if p.created {
        created.images.push(p.image.clone());
    }
    Ok(p)
}

/// One use of an image by an instance.
struct Use {
    key: String,
    writable: bool,
    what: String,
}

/// How storage tells images apart: identity and file on a shared datastore, else host,
/// datastore and file.
fn image_key(facts: Option<&HostFacts>, host: &str, image: &ImageRef) -> String {
    let identity = facts
        .and_then(|f| f.datastores.iter().find(|d| d.name == image.datastore))
        .and_then(|d| d.identity.as_deref());
    match identity {
        Some(id) => format!("shared {id}: {}", image.file),
        None => format!("local {host}/{}: {}", image.datastore, image.file),
    }
}

/// Every image `spec` opens on `host`, and whether it writes to it.
fn uses(spec: &InstanceSpec, host: &str, facts: Option<&HostFacts>, who: &str) -> Vec<Use> {
    let mut out = Vec::new();
    for d in &spec.disks {
        out.push(Use {
            key: image_key(facts, host, &d.image),
            writable: !d.read_only,
            what: format!("{who} (disk {}, {})", d.id, d.image),
        });
        if let Some(b) = &d.backing {
            out.push(Use {
                key: image_key(facts, host, &b.image),
                writable: false,
                what: format!("{who} (base of disk {}, {})", d.id, b.image),
            });
        }
    }
    if let Some(n) = &spec.boot.nvram {
        out.push(Use {
            key: image_key(facts, host, n),
            writable: true,
            what: format!("{who} (UEFI variables, {n})"),
        });
    }
    out
}

/// Images that creates in flight have claimed but not yet recorded: two concurrent creates
/// attaching one image must not both pass the check against the store.
#[derive(Default)]
pub struct DiskClaims {
    claims: Mutex<HashMap<String, Vec<(bool, String)>>>,
}

/// A create's claims; released when dropped (after the instance is recorded, or refused).
pub struct ClaimGuard<'a> {
    claims: &'a DiskClaims,
    keys: Vec<String>,
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.claims.claims.lock().unwrap_or_else(|p| p.into_inner());
        for key in &self.keys {
            if let Some(v) = map.get_mut(key) {
                v.pop();
                if v.is_empty() {
                    map.remove(key);
                }
            }
        }
    }
}

fn in_use(mine: &Use, other: &str) -> ServerError {
    ServerError::conflict(
        "disk-in-use",
        format!(
            "{} is already used by {other}; an image can be shared only read-only",
            mine.what
        ),
        "attach a copy (--copy) or an overlay on it (--disk-backing) instead, or remove it \
         from the other instance first",
    )
}

/// Refuses images of the new instance that another instance (recorded, or being created)
/// uses too, unless every use is read-only; on success the images stay claimed until the
/// returned guard is dropped, which the caller does once the instance is recorded.
pub async fn claim<'a>(
    state: &'a AppState,
    host: &Host,
    name: &str,
    prepared: &Prepared,
) -> Result<ClaimGuard<'a>, ServerError> {
    let spec = InstanceSpec {
        disks: prepared.disks.clone(),
        boot: ferry_api::instances::BootSpec {
            nvram: prepared.nvram.clone(),
            ..Default::default()
        },
        memory_mib: 0,
        vcpus: 0,
        cpu_model: String::new(),
        machine: String::new(),
        nics: vec![],
    };
    let mine = uses(
        &spec,
        &host.name,
        host.facts.as_ref(),
        &format!("instance {name}"),
    );
    for (i, u) in mine.iter().enumerate() {
        if let Some(o) = mine[..i]
            .iter()
            .find(|o| o.key == u.key && (o.writable || u.writable))
        {
            return Err(in_use(u, &o.what));
        }
    }
    // Claim first, then read the store: a create that recorded its instance after this read
    // released its claims only after recording, so one of the two always sees the other.
    let guard = {
        let mut map = state
            .disk_claims
            .claims
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for u in &mine {
            if let Some((_, other)) = map
                .get(&u.key)
                .and_then(|v| v.iter().find(|(w, _)| *w || u.writable))
            {
                return Err(in_use(u, &format!("{other}, which is being created")));
            }
        }
        for u in &mine {
            map.entry(u.key.clone())
                .or_default()
                .push((u.writable, format!("instance {name}")));
        }
        ClaimGuard {
            claims: &state.disk_claims,
            keys: mine.iter().map(|u| u.key.clone()).collect(),
        }
    };
    // Only the facts matter here (datastore identities), not whether a host is online.
    let hosts: HashMap<String, Host> = state
        .store
        .list_hosts(
            chrono::Duration::seconds(state.config.heartbeat_timeout_s as i64),
            chrono::Utc::now(),
        )
        .await?
        .into_iter()
        .map(|h| (h.name.clone(), h))
        .collect();
    for other in state.store.list_instances(None).await? {
        let facts = hosts.get(&other.host).and_then(|h| h.facts.as_ref());
        let theirs = uses(
            &other.spec,
            &other.host,
            facts,
            &format!("instance {}", other.name),
        );
        for u in &mine {
            if let Some(t) = theirs
                .iter()
                .find(|t| t.key == u.key && (t.writable || u.writable))
            {
                return Err(in_use(u, &t.what));
            }
        }
    }
    Ok(guard)
}

/// The images deleting the instance deletes: disks Ferry created and the NVRAM.
pub fn owned_images(spec: &InstanceSpec) -> Vec<ImageRef> {
    spec.disks
        .iter()
        .filter(|d| d.managed)
        .map(|d| d.image.clone())
        .chain(spec.boot.nvram.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::instances::BootSpec;

    fn req(disks: Vec<DiskRequest>) -> CreateInstance {
        CreateInstance {
            name: "vm".into(),
            host: None,
            spec: InstanceSpec {
                memory_mib: 256,
                vcpus: 1,
                cpu_model: "qemu64".into(),
                machine: "pc".into(),
                boot: BootSpec::default(),
                disks: vec![],
                nics: vec![],
            },
            disks,
            start: false,
        }
    }

    fn sized(n: u64) -> DiskRequest {
        DiskRequest {
            size_bytes: Some(n),
            ..Default::default()
        }
    }

    #[test]
    fn default_ids_fill_the_gaps() {
        let named = |id: &str| DiskRequest {
            id: Some(id.into()),
            ..sized(512)
        };
        assert_eq!(
            disk_ids(&[sized(512), named("disk0"), sized(512), named("data")]),
            ["disk1", "disk0", "disk2", "data"]
        );
        assert!(disk_ids(&[]).is_empty());
    }

    #[test]
    fn each_disk_has_exactly_one_source() {
        let code = |d: DiskRequest| validate_requests(&req(vec![d])).err().map(|e| e.body.code);
        assert_eq!(code(sized(1 << 30)), None);
        assert_eq!(
            code(DiskRequest::default()).as_deref(),
            Some("invalid-disk")
        );
        let image = || DiskRequest {
            image: Some("/srv/a.qcow2".into()),
            ..Default::default()
        };
        assert_eq!(code(image()), None);
        assert_eq!(
            code(DiskRequest {
                copy: true,
                ..image()
            }),
            None
        );
        assert_eq!(
            code(DiskRequest {
                size_bytes: Some(512),
                ..image()
            })
            .as_deref(),
            Some("invalid-disk")
        );
        assert_eq!(
            code(DiskRequest {
                copy: true,
                ..sized(512)
            })
            .as_deref(),
            Some("invalid-disk")
        );
        let overlay = DiskRequest {
            backing: Some("/srv/base.qcow2".into()),
            ..Default::default()
        };
        assert_eq!(code(overlay.clone()), None);
        assert_eq!(
            code(DiskRequest {
                format: Some(DiskFormat::Raw),
                ..overlay.clone()
            })
            .as_deref(),
            Some("invalid-disk")
        );
        assert_eq!(
            code(DiskRequest {
                backing: Some("relative/base.qcow2".into()),
                ..overlay
            })
            .as_deref(),
            Some("invalid-disk")
        );
        assert_eq!(
            code(DiskRequest {
                image: Some("/srv/../etc/shadow".into()),
                ..Default::default()
            })
            .as_deref(),
            Some("invalid-disk")
        );
    }

    #[test]
    fn sizes_are_whole_sectors_up_to_64_tib() {
        for bad in [0, 511, 1000, (64 << 40) + 512] {
            assert_eq!(
                check_size("s", bad).unwrap_err().body.code,
                "invalid-disk-size",
                "{bad}"
            );
        }
        for good in [512, 10 << 30, 64 << 40] {
            assert!(check_size("s", good).is_ok(), "{good}");
        }
    }

    #[test]
    fn what_qemu_refuses_is_refused_before_any_image_exists() {
        let code = |disks: Vec<DiskRequest>, machine: &str| {
            let mut r = req(disks);
            r.spec.machine = machine.into();
            validate_requests(&r).err().map(|e| e.body.code)
        };
        let ide = DiskRequest {
            bus: ferry_api::instances::DiskBus::Ide,
            ..sized(512)
        };
        assert_eq!(code(vec![ide.clone()], "pc"), None);
        assert_eq!(code(vec![ide], "q35").as_deref(), Some("invalid-disk"));
        let serial = |s: &str| DiskRequest {
            serial: Some(s.into()),
            ..sized(512)
        };
        assert_eq!(code(vec![serial("ABC-1")], "pc"), None);
        assert_eq!(
            code(vec![serial("a b")], "pc").as_deref(),
            Some("invalid-disk")
        );
        assert_eq!(
            code(vec![serial("x\u{1b}")], "pc").as_deref(),
            Some("invalid-disk")
        );
        let id = |s: &str| DiskRequest {
            id: Some(s.into()),
            ..sized(512)
        };
        assert_eq!(
            code(vec![id("Disk")], "pc").as_deref(),
            Some("invalid-disk")
        );
        assert_eq!(
            code(vec![id("a"), id("a")], "pc").as_deref(),
            Some("invalid-disk")
        );
        assert_eq!(
            code(vec![sized(512); MAX_DISKS + 1], "pc").as_deref(),
            Some("invalid-disk")
        );
    }

    #[test]
    fn keys_tell_shared_from_local_storage() {
        let facts = HostFacts {
            datastores: vec![
                ferry_api::hosts::DatastoreFacts {
                    name: "nfs".into(),
                    path: "/mnt/nfs".into(),
                    total_bytes: 1,
                    free_bytes: 1,
                    identity: Some("nfs-1".into()),
                },
                ferry_api::hosts::DatastoreFacts {
                    name: "local".into(),
                    path: "/srv".into(),
                    total_bytes: 1,
                    free_bytes: 1,
                    identity: None,
                },
            ],
            ..test_facts()
        };
        let image = |ds: &str| ImageRef {
            datastore: ds.into(),
            file: "a.qcow2".into(),
        };
        // Shared: the same on every host.
        assert_eq!(
            image_key(Some(&facts), "hv1", &image("nfs")),
            image_key(Some(&facts), "hv2", &image("nfs"))
        );
        // Local: per host.
        assert_ne!(
            image_key(Some(&facts), "hv1", &image("local")),
            image_key(Some(&facts), "hv2", &image("local"))
        );
        assert_eq!(
            image_key(None, "hv1", &image("local")),
            image_key(Some(&facts), "hv1", &image("local"))
        );
    }

    fn test_facts() -> HostFacts {
        HostFacts {
            name: "hv1".into(),
            cpu_vendor: String::new(),
            cpu_model: String::new(),
            cpu_flags: vec![],
            cores: 1,
            ram_total_mib: 0,
            ram_free_mib: 0,
            ram_reserve_mib: 0,
            accel: "tcg".into(),
            qemu_version: String::new(),
            machine_types: vec![],
            firmware: vec![],
            datastores: vec![],
            networks: vec![],
            migration_addr: String::new(),
            migration_ports: String::new(),
            agent_version: String::new(),
        }
    }

    #[test]
    fn only_images_ferry_made_are_owned() {
        let disk = |id: &str, managed: bool| DiskSpec {
            id: id.into(),
            image: ImageRef {
                datastore: "d".into(),
                file: format!("{id}.qcow2"),
            },
            format: DiskFormat::Qcow2,
            size_bytes: 512,
            bus: Default::default(),
            cache: Default::default(),
            read_only: false,
            serial: None,
            backing: None,
            managed,
        };
        let mut spec = req(vec![]).spec;
        spec.disks = vec![disk("a", true), disk("b", false)];
        spec.boot.nvram = Some(ImageRef {
            datastore: "d".into(),
            file: "vm-VARS.fd".into(),
        });
        let owned: Vec<String> = owned_images(&spec).into_iter().map(|i| i.file).collect();
        assert_eq!(owned, ["a.qcow2", "vm-VARS.fd"]);
    }
}
