//! Disk images on this host's datastores: `POST /v1/disks` (create, copy, attach in place, a
//! UEFI variable store) and `POST /v1/disks/delete`.
//!
//! The server decides what an instance gets; this host decides where exactly and whether it
//! can: which datastore (the one with the most free room that fits, shared ones first), the
//! file name (`NAME-ID.FORMAT`, `NAME-VARS.fd`), room, and whether a given file really is an
//! image inside a datastore. Every refusal leaves nothing behind: new files are written under a
//! temporary name and linked into place only when complete (see `ferry_storage::qemu_img`).
//!
//! **Room rule.** A new or copied disk needs as much free space on its datastore as it could
//! ever take: its virtual size, plus for qcow2 its metadata when full (an L2 entry and a
//! refcount per 64 KiB cluster, at most 1/4096 of the size, and 1 MiB of headers and tables).
//! qcow2 images are still created sparse; the rule only keeps Ferry from creating a disk that
//! would run the datastore out of space even on its own, which a guest sees as I/O errors
//! long after the create succeeded. It is a per-disk check against `statvfs`, not a
//! reservation: thin disks created earlier may still grow into the same space. A copy counts
//! its source's virtual size the same way, since the copy may fill up just like a new disk.
//! While a disk is being written its room is held ([`Reservations`]), so two requests at
//! once never both count the same free bytes; nothing else waits for a long copy.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use ferry_api::agent::{DiskSource, PrepareDisk, PreparedDisk};
use ferry_api::hosts::DatastoreFacts;
use ferry_api::instances::{BackingRef, DiskFormat, ImageRef};
use ferry_storage::qemu_img::{ImageInfo, QemuImg, TempFile};
use tracing::info;

use crate::config::DatastoreConfig;
use crate::datastores::{self, locate, resolve};
use crate::facts::datastore_facts;
use crate::{Agent, AgentError};

/// qcow2 metadata of a full image beyond 1/4096 of its size: header, L1 and refcount tables.
const QCOW2_FIXED_OVERHEAD: u64 = 1 << 20;
/// Raw images are whole sectors; a file that is not is no disk image (a text file probes as
/// raw to qemu-img). A power of two, so a mask tells whole ones.
const SECTOR: u64 = 512;
/// How long a delete waits for an instance's lock to see whether it uses the image.
const SLOT_WAIT: Duration = Duration::from_secs(10);

/// Free bytes a new disk of `virtual_size` needs on its datastore (the room rule above).
pub fn room_needed(format: DiskFormat, virtual_size: u64) -> u64 {
    match format {
        DiskFormat::Raw => virtual_size,
        DiskFormat::Qcow2 => virtual_size
            .saturating_add(virtual_size / 4096)
            .saturating_add(QCOW2_FIXED_OVERHEAD),
    }
}

/// The datastore a disk goes to when the request names none: among those with room for
/// `needed` bytes, shared ones (with an identity) first, then the most free, then by name.
/// When none has room, the one with the most free space, so that the refusal names the best
/// there was. Datastores that cannot be measured (missing directory) are never picked.
pub fn pick_datastore(stores: &[DatastoreFacts], needed: u64) -> Option<&DatastoreFacts> {
    let usable = || stores.iter().filter(|d| d.total_bytes > 0);
    usable()
        .filter(|d| d.free_bytes >= needed)
        .max_by(|a, b| {
            (a.identity.is_some(), a.free_bytes)
                .cmp(&(b.identity.is_some(), b.free_bytes))
                .then(b.name.cmp(&a.name))
        })
        .or_else(|| {
            usable().max_by(|a, b| a.free_bytes.cmp(&b.free_bytes).then(b.name.cmp(&a.name)))
        })
}

/// Bytes held on each datastore by disks being written right now.
#[derive(Debug, Default)]
pub(crate) struct Reservations(Mutex<HashMap<String, u64>>);

/// Room held on one datastore until dropped (the disk is written, or the request failed).
pub(crate) struct Reserved<'a> {
    all: &'a Reservations,
    store: String,
    bytes: u64,
}

impl Reservations {
    /// Bytes held on datastore `name` now.
    fn held(&self, name: &str) -> u64 {
        let held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        held.get(name).copied().unwrap_or(0)
    }

    /// Holds `needed` bytes on `store` if its free space, less what other requests hold,
    /// has them; else `no-room`.
    fn reserve(
        &self,
        store: &DatastoreFacts,
        needed: u64,
        what: &str,
    ) -> Result<Reserved<'_>, AgentError> {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let taken = held.get(&store.name).copied().unwrap_or(0);
        let free = store.free_bytes.saturating_sub(taken);
        if free < needed {
            let mut shown = store.clone();
            shown.free_bytes = free;
            return Err(no_room(&shown, needed, what));
        }
        *held.entry(store.name.clone()).or_default() += needed;
        Ok(Reserved {
            all: self,
            store: store.name.clone(),
            bytes: needed,
        })
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        let mut held = self.all.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.store) {
            *n = n.saturating_sub(self.bytes);
            if *n == 0 {
                held.remove(&self.store);
            }
        }
    }
}

/// Instance names as the server allows them: they become file names here.
fn check_instance_name(name: &str) -> Result<(), AgentError> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "instance name '{}' must be 1-40 characters of a-z, 0-9 and '-'",
            name.escape_debug()
        )))
    }
}

fn check_disk_id(id: &str) -> Result<(), AgentError> {
    let max = ferry_qemu::MAX_DISK_ID;
    let ok = !id.is_empty()
        && id.len() <= max
        && !id.starts_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "disk id '{}' must be 1-{max} characters of a-z, 0-9, '-' and '_'",
            id.escape_debug()
        )))
    }
}

fn invalid(message: String) -> AgentError {
    AgentError::BadRequest(message)
}

fn no_room(store: &DatastoreFacts, needed: u64, what: &str) -> AgentError {
    AgentError::refused(
        "no-room",
        format!(
            "datastore {} has {} free, {what} needs {}",
            store.name,
            gib(store.free_bytes),
            gib(needed)
        ),
        "ask for a smaller disk, free space on the datastore, or name another datastore \
         (`ferry datastore list`)",
    )
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn unreadable(path: &Path, why: &str) -> AgentError {
    AgentError::refused(
        "image-unreadable",
        format!("{} is not a usable disk image: {why}", path.display()),
        "check the file with `qemu-img info`; only qcow2 and raw images can be attached \
         (copy others with --copy)",
    )
}

/// The space and identity of one configured datastore, measured now.
fn measure(store: &DatastoreConfig) -> DatastoreFacts {
    datastore_facts(&store.name, &store.path, store.identity.as_deref())
}

/// The file name of a disk on its datastore.
fn disk_file(instance: &str, id: &str, format: DiskFormat) -> String {
    format!("{instance}-{id}.{format}")
}

/// The file name of an instance's UEFI variable store.
fn vars_file(instance: &str) -> String {
    format!("{instance}-VARS.fd")
}

impl Agent {
    /// The `qemu-img` next to the configured QEMU binary when that is a path, else the one on
    /// `PATH`: both come from the same QEMU installation.
    pub(crate) fn qemu_img(&self) -> QemuImg {
        let beside = self
            .config
            .qemu_binary
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(|p| p.join("qemu-img"))
            .filter(|p| p.is_file());
        QemuImg::new(beside.unwrap_or_else(|| PathBuf::from("qemu-img")))
    }

    /// `POST /v1/disks`: one image for instance `req.instance`, as the source says.
    pub(crate) async fn prepare_disk(&self, req: PrepareDisk) -> Result<PreparedDisk, AgentError> {
        check_instance_name(&req.instance)?;
        if !matches!(req.source, DiskSource::UefiVars) {
            check_disk_id(&req.id)?;
        }
        let prepared = match req.source.clone() {
            DiskSource::New {
                size_bytes,
                format,
                backing,
            } => self.new_disk(&req, size_bytes, format, backing).await,
            DiskSource::Existing { path, format } => {
                self.existing_disk(req.datastore.as_deref(), &path, format)
                    .await
            }
            DiskSource::Copy { path, format } => self.copy_disk(&req, &path, format).await,
            DiskSource::UefiVars => self.uefi_vars(&req).await,
        }?;
        info!(instance = %req.instance, disk = %req.id, image = %prepared.image, created = prepared.created, "disk prepared");
        Ok(prepared)
    }

    /// The datastore the request names, or the default one for `needed` bytes; with its
    /// facts measured now.
    fn target_store(
        &self,
        named: Option<&str>,
        needed: u64,
    ) -> Result<(&DatastoreConfig, DatastoreFacts), AgentError> {
        if let Some(name) = named {
            let store = datastores::datastore(&self.config, name)?;
            let facts = measure(store);
            if facts.total_bytes == 0 {
                return Err(AgentError::refused(
                    "datastore-unavailable",
                    format!(
                        "datastore {name} ({}) cannot be measured on host {}",
                        store.path.display(),
                        self.config.name
                    ),
                    "check that its directory exists and its file system is mounted",
                ));
            }
            return Ok((store, facts));
        }
        // Picked by the room that is not held by disks being written right now.
        let measured: Vec<DatastoreFacts> = self.config.datastores.iter().map(measure).collect();
        let available: Vec<DatastoreFacts> = measured
            .iter()
            .map(|d| DatastoreFacts {
                free_bytes: d.free_bytes.saturating_sub(self.disk_room.held(&d.name)),
                ..d.clone()
            })
            .collect();
        let picked = pick_datastore(&available, needed).ok_or_else(|| {
            AgentError::refused(
                "no-datastore",
                format!(
                    "host {} has no datastore to put a disk on",
                    self.config.name
                ),
                "add a datastore to the agent's config (`datastores`)",
            )
        })?;
        let store = datastores::datastore(&self.config, &picked.name)?;
        let facts = measured
            .into_iter()
            .find(|d| d.name == picked.name)
            .unwrap_or_else(|| picked.clone());
        Ok((store, facts))
    }

    /// Refuses `file` on `store` if it exists: Ferry never takes over a file it did not make.
    fn refuse_taken(store: &DatastoreConfig, file: &str) -> Result<PathBuf, AgentError> {
        let path = store.path.join(file);
        if path.symlink_metadata().is_ok() {
            return Err(AgentError::conflict(
                "disk-exists",
                format!(
                    "{} exists on datastore {} already; Ferry never overwrites an image",
                    file, store.name
                ),
                "remove the file if nothing uses it (a leftover of an instance of the same \
                 name?), or give the disk another id",
            ));
        }
        Ok(path)
    }

    /// Reads `path` as a disk image with its whole backing chain, refusing what QEMU should
    /// not be given: missing, not a regular file, not an image (a raw "image" that is not
    /// whole sectors), corrupt, encrypted, a format other than `expected`, or a backing file
    /// outside every datastore.
    async fn inspect(
        &self,
        path: &Path,
        expected: Option<DiskFormat>,
    ) -> Result<Vec<ImageInfo>, AgentError> {
        let meta = std::fs::metadata(path).map_err(|e| {
            AgentError::refused(
                "image-not-found",
                format!("{} cannot be opened: {e}", path.display()),
                "give the full path of an existing image on that host",
            )
        })?;
        if !meta.is_file() {
            return Err(unreadable(path, "it is not a regular file"));
        }
        let chain = self.qemu_img().info_chain(path, None).await?;
        let top = &chain[0];
        if let Some(want) = expected {
            if top.format != want.as_str() {
                return Err(AgentError::refused(
                    "format-mismatch",
                    format!("{} is a {} image, not {want}", path.display(), top.format),
                    "give the format qemu-img info reports, or leave it out",
                ));
            }
        }
        if top.format == "raw" && (meta.len() == 0 || meta.len() & (SECTOR - 1) != 0) {
            return Err(unreadable(
                path,
                &format!(
                    "{} bytes are not whole 512-byte sectors, so it is no raw image",
                    meta.len()
                ),
            ));
        }
        if top.virtual_size == 0 {
            return Err(unreadable(path, "its virtual size is 0"));
        }
        for (i, info) in chain.iter().enumerate() {
            if info.corrupt {
                return Err(unreadable(
                    path,
                    &format!("{} is marked corrupt", info.filename),
                ));
            }
            if info.encrypted {
                return Err(unreadable(path, "encrypted images are not supported"));
            }
            if i + 1 < chain.len() {
                let base = info
                    .full_backing_filename
                    .as_deref()
                    .or(info.backing_filename.as_deref())
                    .unwrap_or_default();
                self.locate_backing(base, &info.filename)?;
            }
        }
        Ok(chain)
    }

    /// The datastore file a backing file is; a base outside every datastore is refused,
    /// since QEMU would open it for the guest.
    fn locate_backing(&self, base: &str, of: &str) -> Result<ImageRef, AgentError> {
        locate(&self.config, base).map_err(|e| match e.code() {
            "path-outside-datastores" => AgentError::refused(
                "path-outside-datastores",
                format!(
                    "the backing file {} of {} is not inside a datastore of this host",
                    base.escape_debug(),
                    of.escape_debug()
                ),
                "keep base images in a datastore (`datastores` in the agent's config)",
            ),
            _ => e,
        })
    }

    async fn new_disk(
        &self,
        req: &PrepareDisk,
        size: Option<u64>,
        format: DiskFormat,
        backing: Option<String>,
    ) -> Result<PreparedDisk, AgentError> {
        if size == Some(0) {
            return Err(invalid("a disk's size must be more than 0 bytes".into()));
        }
        let base = match &backing {
            Some(path) => {
                if format != DiskFormat::Qcow2 {
                    return Err(invalid(format!(
                        "only a qcow2 disk can be an overlay, not {format}"
                    )));
                }
                let image = locate(&self.config, path)?;
                let real = resolve(&self.config, &image)?;
                let chain = self.inspect(&real, None).await?;
                let base_format = chain[0].disk_format().ok_or_else(|| {
                    AgentError::refused(
                        "unsupported-format",
                        format!(
                            "the base {path} is a {} image; QEMU attaches qcow2 or raw bases",
                            chain[0].format
                        ),
                        "convert the base to qcow2 with `qemu-img convert` first",
                    )
                })?;
                Some((image, real, base_format, chain[0].virtual_size))
            }
            None => None,
        };
        let virtual_size = match (size, &base) {
            (Some(s), Some((_, _, _, base_size))) if s < *base_size => {
                return Err(invalid(format!(
                    "an overlay of {s} bytes is smaller than its base ({base_size} bytes)"
                )))
            }
            (Some(s), _) => s,
            (None, Some((_, _, _, base_size))) => *base_size,
            (None, None) => {
                return Err(invalid(
                    "a new disk needs a size, or a backing image to take it from".into(),
                ))
            }
        };
        let needed = room_needed(format, virtual_size);
        let (store, facts) = self.target_store(req.datastore.as_deref(), needed)?;
        let file = disk_file(&req.instance, &req.id, format);
        let path = Self::refuse_taken(store, &file)?;
        let _room = self.disk_room.reserve(
            &facts,
            needed,
            &format!("a {} {format} disk", gib(virtual_size)),
        )?;
        // The overlay names its base relative to itself when both are on one datastore, so
        // its header is right on every host that mounts it, wherever.
        let backing_arg = base.as_ref().map(|(image, real, fmt, _)| {
            let written = if image.datastore == store.name {
                PathBuf::from(&image.file)
            } else {
                real.clone()
            };
            (written, *fmt)
        });
        self.qemu_img()
            .create(
                &path,
                format,
                size,
                backing_arg.as_ref().map(|(p, f)| (p.as_path(), *f)),
            )
            .await?;
        self.describe_new(&path, store, &file, format)
            .await
            .map(|mut d| {
                d.backing = base.map(|(image, _, format, _)| BackingRef { image, format });
                d
            })
    }

    /// The PreparedDisk of a file this request just made; removes it if it cannot be read
    /// back (nothing is left behind).
    async fn describe_new(
        &self,
        path: &Path,
        store: &DatastoreConfig,
        file: &str,
        format: DiskFormat,
    ) -> Result<PreparedDisk, AgentError> {
        match self.qemu_img().info(path, Some(format)).await {
            Ok(info) => Ok(PreparedDisk {
                image: ImageRef {
                    datastore: store.name.clone(),
                    file: file.to_string(),
                },
                format,
                size_bytes: info.virtual_size,
                allocated_bytes: info.actual_size.unwrap_or(0),
                backing: None,
                created: true,
            }),
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(e.into())
            }
        }
    }

    async fn existing_disk(
        &self,
        datastore: Option<&str>,
        path: &str,
        format: Option<DiskFormat>,
    ) -> Result<PreparedDisk, AgentError> {
        let image = locate(&self.config, path)?;
        if let Some(named) = datastore {
            datastores::datastore(&self.config, named)?;
            if named != image.datastore {
                return Err(AgentError::refused(
                    "wrong-datastore",
                    format!(
                        "{path} is on datastore {}, not {named}; an image attached in place \
                         stays where it is",
                        image.datastore
                    ),
                    "leave the datastore out, or copy the image onto that datastore (--copy)",
                ));
            }
        }
        let real = resolve(&self.config, &image)?;
        let chain = self.inspect(&real, format).await?;
        let top = &chain[0];
        let disk_format = top.disk_format().ok_or_else(|| {
            AgentError::refused(
                "unsupported-format",
                format!(
                    "{path} is a {} image; QEMU attaches qcow2 or raw images",
                    top.format
                ),
                "copy it onto a datastore instead (--copy converts it to qcow2)",
            )
        })?;
        let backing = match chain.get(1) {
            Some(base) => {
                let base_format = base.disk_format().ok_or_else(|| {
                    AgentError::refused(
                        "unsupported-format",
                        format!("the base of {path} is a {} image", base.format),
                        "copy the image instead (--copy flattens its backing chain)",
                    )
                })?;
                let base_path = top
                    .full_backing_filename
                    .as_deref()
                    .or(top.backing_filename.as_deref())
                    .unwrap_or_default();
                Some(BackingRef {
                    image: self.locate_backing(base_path, path)?,
                    format: base_format,
                })
            }
            None => None,
        };
        Ok(PreparedDisk {
            image,
            format: disk_format,
            size_bytes: top.virtual_size,
            allocated_bytes: top.actual_size.unwrap_or(0),
            backing,
            created: false,
        })
    }

    async fn copy_disk(
        &self,
        req: &PrepareDisk,
        path: &str,
        format: Option<DiskFormat>,
    ) -> Result<PreparedDisk, AgentError> {
        // Only images inside a datastore can be copied: anything else on the host (keys,
        // other guests' files) must never become readable to a guest.
        let source = locate(&self.config, path)?;
        let real = resolve(&self.config, &source)?;
        let chain = self.inspect(&real, None).await?;
        let top = &chain[0];
        let src_format = top.disk_format();
        let format = format.or(src_format).unwrap_or(DiskFormat::Qcow2);
        let needed = room_needed(format, top.virtual_size);
        let (store, facts) = self.target_store(req.datastore.as_deref(), needed)?;
        let file = disk_file(&req.instance, &req.id, format);
        let dst = Self::refuse_taken(store, &file)?;
        let _room = self.disk_room.reserve(
            &facts,
            needed,
            &format!("a copy of {path} ({} virtual)", gib(top.virtual_size)),
        )?;
        // qemu-img probed the source above; naming its format keeps the copy from probing
        // again (a raw image whose guest wrote a qcow2 header stays raw).
        self.qemu_img()
            .convert(&real, src_format, &dst, format)
            .await?;
        self.describe_new(&dst, store, &file, format).await
    }

    async fn uefi_vars(&self, req: &PrepareDisk) -> Result<PreparedDisk, AgentError> {
        let (code, template) = (&self.config.ovmf_code, &self.config.ovmf_vars);
        if !code.is_file() || !template.is_file() {
            return Err(AgentError::refused(
                "uefi-unavailable",
                format!(
                    "host {} has no UEFI firmware ({} and {} are needed)",
                    self.config.name,
                    code.display(),
                    template.display()
                ),
                "install Debian's ovmf package on the host, or boot with firmware bios",
            ));
        }
        let len = std::fs::metadata(template)
            .map_err(AgentError::io(template))?
            .len();
        let (store, facts) = self.target_store(req.datastore.as_deref(), len)?;
        let file = vars_file(&req.instance);
        let dst = Self::refuse_taken(store, &file)?;
        let _room = self
            .disk_room
            .reserve(&facts, len, "the UEFI variable store")?;
        let tmp = TempFile::beside(&dst)?;
        let (from, to) = (template.clone(), tmp.path().to_path_buf());
        tokio::task::spawn_blocking(move || std::fs::copy(&from, &to))
            .await
            .map_err(|e| AgentError::Internal(format!("copy task failed: {e}")))?
            .map_err(AgentError::io(tmp.path()))?;
        tmp.publish(&dst)?;
        Ok(PreparedDisk {
            image: ImageRef {
                datastore: store.name.clone(),
                file,
            },
            format: DiskFormat::Raw,
            size_bytes: len,
            allocated_bytes: len,
            backing: None,
            created: true,
        })
    }

    /// `POST /v1/disks/delete`: removes an image Ferry made. A missing file is fine (a retry
    /// after a partial delete); a file an instance on this host still names is refused.
    pub(crate) async fn delete_disk(&self, image: ImageRef) -> Result<(), AgentError> {
        let path = resolve(&self.config, &image)?;
        if let Some(user) = self.user_of(&path).await {
            return Err(AgentError::conflict(
                "disk-in-use",
                format!("{image} is used by {user}; it stays"),
                "stop and delete the instance that uses it first",
            ));
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                info!(%image, "disk deleted");
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(AgentError::Io { path, source: e }),
        }
    }

    /// The instance on this host whose disks, bases or NVRAM include `path` (described for an
    /// error message), if any. An instance busy beyond [`SLOT_WAIT`] counts as a user: when
    /// in doubt, an image stays.
    async fn user_of(&self, path: &Path) -> Option<String> {
        let target = path.canonicalize().ok()?;
        for slot in self.slots() {
            let Ok(mut slot) = tokio::time::timeout(SLOT_WAIT, slot.lock_owned()).await else {
                return Some("an instance busy with another operation".into());
            };
            if slot.deleted {
                continue;
            }
            self.reap(&mut slot).await;
            let spec = &slot.record.spec;
            let images = spec
                .disks
                .iter()
                .flat_map(|d| std::iter::once(&d.image).chain(d.backing.as_ref().map(|b| &b.image)))
                .chain(spec.boot.nvram.as_ref());
            let uses = images
                .filter_map(|i| resolve(&self.config, i).ok())
                .filter_map(|p| p.canonicalize().ok())
                .any(|p| p == target);
            if uses {
                let how = if slot.process.is_some() {
                    "running"
                } else {
                    "defined here"
                };
                return Some(format!(
                    "instance {} ({}, {how})",
                    slot.record.name, slot.record.id
                ));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn store(name: &str, free: u64, shared: bool) -> DatastoreFacts {
        DatastoreFacts {
            name: name.into(),
            path: format!("/srv/{name}"),
            total_bytes: 100 * GIB,
            free_bytes: free,
            identity: shared.then(|| format!("id-{name}")),
        }
    }

    #[test]
    fn the_default_datastore_is_shared_first_then_the_emptiest_that_fits() {
        let stores = [
            store("local-big", 90 * GIB, false),
            store("nfs-small", 20 * GIB, true),
            store("nfs-large", 40 * GIB, true),
        ];
        // Shared beats local even with less room, the emptier shared one wins.
        assert_eq!(pick_datastore(&stores, GIB).unwrap().name, "nfs-large");
        // Only the local one fits 50 GiB.
        assert_eq!(pick_datastore(&stores, 50 * GIB).unwrap().name, "local-big");
        // Nothing fits: the one with the most room is named in the refusal.
        assert_eq!(pick_datastore(&stores, 95 * GIB).unwrap().name, "local-big");
        // Ties go by name, so the choice is stable.
        let ties = [store("b", GIB, true), store("a", GIB, true)];
        assert_eq!(pick_datastore(&ties, 1).unwrap().name, "a");
        // A datastore that cannot be measured is never picked.
        let mut gone = store("gone", 0, true);
        gone.total_bytes = 0;
        assert_eq!(pick_datastore(&[gone.clone()], 1), None);
        assert_eq!(
            pick_datastore(&[gone, store("ok", GIB, false)], 1)
                .unwrap()
                .name,
            "ok"
        );
        assert_eq!(pick_datastore(&[], 1), None);
    }

    #[test]
    fn the_room_rule_counts_the_whole_virtual_size() {
        assert_eq!(room_needed(DiskFormat::Raw, 10 * GIB), 10 * GIB);
        // qcow2: plus metadata of a full image.
        assert_eq!(
            room_needed(DiskFormat::Qcow2, 4096 * GIB),
            4096 * GIB + GIB + (1 << 20)
        );
        assert!(room_needed(DiskFormat::Qcow2, 10 * GIB) > 10 * GIB);
        assert_eq!(room_needed(DiskFormat::Qcow2, u64::MAX), u64::MAX);
    }

    #[test]
    fn reserved_room_is_not_counted_twice() {
        let all = Reservations::default();
        let nfs = store("nfs", 10 * GIB, true);
        let first = all.reserve(&nfs, 6 * GIB, "a disk").unwrap();
        // 4 GiB are left for others while the first disk is written.
        let err = all.reserve(&nfs, 6 * GIB, "a disk").err().unwrap();
        assert_eq!(err.code(), "no-room");
        assert!(err.to_string().contains("4.00 GiB free"), "{err}");
        let other = all.reserve(&store("local", 10 * GIB, false), 6 * GIB, "a disk");
        assert!(other.is_ok(), "another datastore is not affected");
        drop(first);
        assert!(all.reserve(&nfs, 6 * GIB, "a disk").is_ok());
    }

    #[test]
    fn names_that_become_files_are_checked() {
        assert!(check_instance_name("web-1").is_ok());
        for bad in ["", "-x", "a/b", "A", "..", "a b", &"x".repeat(41)] {
            assert!(check_instance_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_disk_id("disk0").is_ok());
        assert!(check_disk_id("data_1").is_ok());
        for bad in ["", "../x", "VARS", "x.y", &"d".repeat(17)] {
            assert!(check_disk_id(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            disk_file("vm", "disk0", DiskFormat::Qcow2),
            "vm-disk0.qcow2"
        );
        assert_eq!(disk_file("vm", "disk1", DiskFormat::Raw), "vm-disk1.raw");
        assert_eq!(vars_file("vm"), "vm-VARS.fd");
    }
}
