//! Block jobs and NBD exports: what a block migration needs.
//!
//! The destination exports each new image over NBD (`nbd-server-start`, `block-export-add`);
//! the source attaches that export as a node (`blockdev-add` of an `nbd` client) and mirrors
//! its disk into it (`blockdev-mirror`), switching the mirror to write-blocking once it is in
//! sync (`block-job-change`), and ends it with `block-job-cancel`, which for a mirror in sync
//! leaves a consistent copy without pivoting the guest onto it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::commands;

/// A TCP address in the flat form `blockdev-add`'s NBD client takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InetAddress {
    /// Always `inet`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// An IP address.
    pub host: String,
    /// QEMU takes the port as a string.
    pub port: String,
}

impl InetAddress {
    /// The address `addr` in the form this command takes.
    pub fn new(addr: std::net::SocketAddr) -> InetAddress {
        InetAddress {
            kind: "inet",
            host: addr.ip().to_string(),
            port: addr.port().to_string(),
        }
    }
}

/// `blockdev-add` of an NBD client node: the source's view of the destination's export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockdevAddNbd {
    /// Always `nbd`.
    pub driver: &'static str,
    #[serde(rename = "node-name")]
    /// Stable name of the node in the block graph.
    pub node_name: String,
    /// Where the export listens.
    pub server: InetAddress,
    /// The export name the destination chose.
    pub export: String,
}

impl BlockdevAddNbd {
    /// The address `addr` in the form this command takes.
    pub fn new(
        node_name: impl Into<String>,
        addr: std::net::SocketAddr,
        export: impl Into<String>,
    ) -> Self {
        BlockdevAddNbd {
            driver: "nbd",
            node_name: node_name.into(),
            server: InetAddress::new(addr),
            export: export.into(),
        }
    }
}

/// `blockdev-del`: remove a node nothing uses any more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockdevDel {
    #[serde(rename = "node-name")]
    /// Stable name of the node in the block graph.
    pub node_name: String,
}

/// `blockdev-mirror`: copy `device` into the node `target` and keep copying what the guest
/// writes, until the job is completed or cancelled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevMirror {
    /// Id the job is addressed by afterwards.
    pub job_id: String,
    /// The node the guest's device writes to.
    pub device: String,
    /// The node written to.
    pub target: String,
    /// `full` (the whole chain) or `top` (only the top image; its base stays shared).
    pub sync: &'static str,
    /// `background` or `write-blocking`.
    pub copy_mode: &'static str,
    /// `report`: a target error ends the job with the error, the guest's writes go on.
    pub on_target_error: &'static str,
    /// Bytes per second; 0 or absent for unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
    /// False: the concluded job stays listed until `job-dismiss`, so its error can be read.
    pub auto_dismiss: bool,
}

/// `block-job-change` for a mirror: switch its copy mode while it runs (QEMU 8.2 and later).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockJobChangeMirror {
    /// The job or export id.
    pub id: String,
    /// Always `mirror`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// See QEMU's QAPI schema for `copy_mode`.
    pub copy_mode: &'static str,
}

/// `block-job-cancel`: for a mirror in sync, completes it without pivoting (the target is a
/// consistent copy); otherwise stops it. `force` stops a mirror in sync without waiting for
/// the last writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockJobCancel {
    /// The job id (QEMU calls it `device`).
    pub device: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Stop at once, even a mirror in sync.
    pub force: Option<bool>,
}

/// `job-dismiss`: forget a concluded job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobDismiss {
    /// The job or export id.
    pub id: String,
}

/// `query-block-jobs`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryBlockJobs;

/// One entry of `query-block-jobs` (QAPI `BlockJobInfo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockJobInfo {
    /// The job id.
    pub device: String,
    #[serde(rename = "type")]
    /// See QEMU's QAPI schema for `kind`.
    pub kind: String,
    /// Bytes the job has to reach; grows when the guest dirties data already copied.
    pub len: u64,
    /// Bytes done so far.
    pub offset: u64,
    /// A mirror is in sync (may be completed or cancelled consistently).
    #[serde(default)]
    pub ready: bool,
    /// `created`, `running`, `ready`, `standby`, `waiting`, `pending`, `concluded`, ...
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    /// Bytes per second, 0 for unlimited.
    pub speed: u64,
    /// Set when a concluded job failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Write-blocking mode is copying the guest's writes synchronously.
    #[serde(default)]
    pub actively_synced: Option<bool>,
    #[serde(flatten)]
    /// See QEMU's QAPI schema for `extra`.
    pub extra: Map<String, Value>,
}

/// An NBD server address in the tagged form `nbd-server-start` takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaggedInet {
    /// Always `inet`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// See QEMU's QAPI schema for `data`.
    pub data: TaggedInetData,
}

/// The members of [`TaggedInet`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaggedInetData {
    /// An IP address.
    pub host: String,
    /// The port, as a string.
    pub port: String,
}

/// `nbd-server-start`: listen for NBD clients on `addr`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NbdServerStart {
    /// See QEMU's QAPI schema for `addr`.
    pub addr: TaggedInet,
}

impl NbdServerStart {
    /// The address `addr` in the form this command takes.
    pub fn new(addr: std::net::SocketAddr) -> NbdServerStart {
        NbdServerStart {
            addr: TaggedInet {
                kind: "inet",
                data: TaggedInetData {
                    host: addr.ip().to_string(),
                    port: addr.port().to_string(),
                },
            },
        }
    }
}

/// `nbd-server-stop`: close the NBD server and every export on it.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct NbdServerStop;

/// `block-export-add` of an NBD export of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockExportAddNbd {
    /// Always `nbd`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The job or export id.
    pub id: String,
    #[serde(rename = "node-name")]
    /// Stable name of the node in the block graph.
    pub node_name: String,
    /// See QEMU's QAPI schema for `writable`.
    pub writable: bool,
    /// The name clients ask for.
    pub name: String,
}

/// `block-export-del`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockExportDel {
    /// The job or export id.
    pub id: String,
}

commands! {
    BlockdevAddNbd => "blockdev-add" -> ();
    BlockdevDel => "blockdev-del" -> ();
    BlockdevMirror => "blockdev-mirror" -> ();
    BlockJobChangeMirror => "block-job-change" -> ();
    BlockJobCancel => "block-job-cancel" -> ();
    JobDismiss => "job-dismiss" -> ();
    QueryBlockJobs => "query-block-jobs" -> Vec<BlockJobInfo>;
    NbdServerStart => "nbd-server-start" -> ();
    NbdServerStop => "nbd-server-stop" -> ();
    BlockExportAddNbd => "block-export-add" -> ();
    BlockExportDel => "block-export-del" -> ();
}
