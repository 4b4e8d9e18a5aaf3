//! The destination's images of a block migration: made empty before the incoming QEMU opens
//! them, removed again when the destination is removed before it ran the guest.
//!
//! Each path is written into the migration's record before its image is created, and only
//! after checking that nothing is there: the record never names a file Ferry did not make,
//! and an agent that restarts mid-way still knows what to remove.
//!
//! A retry after a failed block migration may reuse the image an earlier attempt kept here
//! (`IncomingDisk::reuse`, named by the server, which recorded it as kept): it is taken as it
//! is when its format and size still match, and the source then sends only what its bitmap
//! says the image lacks.

use std::path::PathBuf;
use std::sync::Arc;

use ferry_api::agent::IncomingDisk;
use tracing::{info, warn};

use crate::datastores;
use crate::migrations::MigrationEntry;
use crate::{Agent, AgentError};

impl Agent {
    /// Refuses images that cannot be made here: one exists at the path, an instance of this
    /// host names it, or its datastore lacks the room. Called before the instance's slot is
    /// taken (looking at other instances locks their slots).
    pub(crate) async fn check_incoming_images(
        &self,
        disks: &[IncomingDisk],
    ) -> Result<(), AgentError> {
        for d in disks {
            if !d.reuse {
                self.refuse_incoming_image(d)?;
            }
            if let Some(name) = self.image_in_use(&d.image).await {
                return Err(AgentError::conflict(
                    "image-in-use",
                    format!("{} is an image of instance {name} on this host", d.image),
                    "map the disk to another datastore (--map-disk)",
                ));
            }
        }
        Ok(())
    }

    /// The path of a new image for `d`, refused when something is there or there is no room.
    fn refuse_incoming_image(&self, d: &IncomingDisk) -> Result<PathBuf, AgentError> {
        let path = datastores::resolve(&self.config, &d.image)?;
        if path.symlink_metadata().is_ok() {
            return Err(AgentError::conflict(
                "disk-exists",
                format!(
                    "{} exists on {} already; Ferry never overwrites an image",
                    d.image, self.config.name
                ),
                "map the disk to another datastore (--map-disk), or remove the old file",
            ));
        }
        self.check_room(&d.image, d.required_bytes)?;
        Ok(path)
    }

    /// Creates every image of `disks` (same format and virtual size as the source's, sparse;
    /// an overlay on the same shared base), or reuses a kept one. Returns the disks whose
    /// kept image is reused. On failure the images made or reused so far are removed.
    pub(crate) async fn create_incoming_images(
        &self,
        entry: &Arc<MigrationEntry>,
        disks: &[IncomingDisk],
    ) -> Result<Vec<String>, AgentError> {
        let mut reused = Vec::new();
        for d in disks {
            match self.reuse_kept_image(entry, d).await {
                Ok(true) => {
                    reused.push(d.disk.clone());
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    self.remove_incoming_images(entry);
                    return Err(e);
                }
            }
            if let Err(e) = self.create_incoming_image(entry, d).await {
                self.remove_incoming_images(entry);
                return Err(e);
            }
        }
        Ok(reused)
    }

    /// Takes the image an earlier attempt kept for `d`, when asked to and it still has the
    /// disk's format and size (true). One that does not match is removed, to be made anew.
    async fn reuse_kept_image(
        &self,
        entry: &Arc<MigrationEntry>,
        d: &IncomingDisk,
    ) -> Result<bool, AgentError> {
        if !d.reuse {
            return Ok(false);
        }
        let path = datastores::resolve(&self.config, &d.image)?;
        if path.symlink_metadata().is_err() {
            warn!(disk = %d.disk, image = %d.image, "the kept image is gone; making a new one");
            return Ok(false);
        }
        let matches = match self.qemu_img().info(&path, Some(d.format)).await {
            Ok(info) => {
                info.virtual_size == d.size_bytes
                    && info.backing_filename.is_some() == d.backing.is_some()
                    && !info.corrupt
            }
            Err(_) => false,
        };
        entry.update(|r| r.created_images.push(path.clone()));
        if !matches {
            warn!(disk = %d.disk, image = %d.image, "the kept image no longer matches the disk; making a new one");
            std::fs::remove_file(&path).map_err(AgentError::io(&path))?;
            entry.update(|r| r.created_images.retain(|p| p != &path));
            return Ok(false);
        }
        info!(disk = %d.disk, image = %d.image, "kept image reused: only what it lacks is sent");
        Ok(true)
    }

    async fn create_incoming_image(
        &self,
        entry: &Arc<MigrationEntry>,
        d: &IncomingDisk,
    ) -> Result<(), AgentError> {
        let path = self.refuse_incoming_image(d)?;
        let base = match &d.backing {
            Some(b) => Some((datastores::resolve(&self.config, &b.image)?, b.format)),
            None => None,
        };
        entry.update(|r| r.created_images.push(path.clone()));
        self.qemu_img()
            .create(
                &path,
                d.format,
                Some(d.size_bytes),
                base.as_ref().map(|(p, f)| (p.as_path(), *f)),
            )
            .await
            .inspect_err(|_| entry.update(|r| r.created_images.retain(|p| p != &path)))?;
        info!(disk = %d.disk, image = %d.image, "empty image made for the block migration");
        Ok(())
    }

    /// Removes the images made for this migration, unless the guest ran here (they are the
    /// instance's then). A missing file counts as removed.
    pub(crate) fn remove_incoming_images(&self, entry: &Arc<MigrationEntry>) {
        let images: Vec<PathBuf> = entry.record().created_images;
        let mut left = Vec::new();
        for path in images {
            match std::fs::remove_file(&path) {
                Ok(()) => info!(path = %path.display(), "partial destination image removed"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "destination image not removed");
                    left.push(path);
                }
            }
        }
        entry.update(|r| r.created_images = left);
    }
}
