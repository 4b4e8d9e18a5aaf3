//! Block jobs and NBD exports: what a block migration needs.
//!
//! The destination exports each new image over NBD (`nbd-server-start`, `block-export-add`);
//! the source attaches that export as a node (`blockdev-add` of an `nbd` client) and mirrors
//! its disk into it (`blockdev-mirror`, write-blocking), and ends the mirror with
//! `block-job-cancel`, which for a mirror in sync leaves a consistent copy without pivoting
//! the guest onto it.
//!
//! The bulk copy runs as `blockdev-backup` passes driven by a dirty bitmap
//! (`block-dirty-bitmap-add`, `bitmap-mode: always`): after a failure the bitmap still says
//! what the destination lacks, so a retry copies only that.

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
    /// The `tls-creds-x509` object (endpoint client) that encrypts the connection; `None`
    /// sends the disk in the clear.
    #[serde(rename = "tls-creds", skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    /// The name the export's certificate must carry (the destination's migration address):
    /// QEMU would otherwise check the address it connects to, which is the same today but
    /// need not be behind a NAT.
    #[serde(rename = "tls-hostname", skip_serializing_if = "Option::is_none")]
    pub tls_hostname: Option<String>,
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
            tls_creds: None,
            tls_hostname: None,
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
    /// The `tls-creds-x509` object (endpoint server) every client must handshake with;
    /// `None` serves in the clear.
    #[serde(rename = "tls-creds", skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    /// The authz object that names the one client identity allowed in. With TLS and no
    /// authz QEMU lets in any certificate its CA signed.
    #[serde(rename = "tls-authz", skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
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
            tls_creds: None,
            tls_authz: None,
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

/// `blockdev-backup`: copy `device` (all of it, its top image, or a bitmap's regions) into
/// `target`. With a bitmap and `bitmap_mode: "always"` the bitmap afterwards holds what the
/// target still lacks, whether the job succeeded or not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevBackup {
    /// Id the job is addressed by afterwards.
    pub job_id: String,
    /// The node the guest's device writes to.
    pub device: String,
    /// The node written to.
    pub target: String,
    /// `full`, `top` or `bitmap`.
    pub sync: &'static str,
    /// The dirty bitmap that drives (`sync: bitmap`) or records (`full`, `top`) the copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    /// `always`, `on-success` or `never`; required with a bitmap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmap_mode: Option<&'static str>,
    /// `report`: a target error ends the job with the error, the guest's writes go on.
    pub on_target_error: &'static str,
    /// Bytes per second; absent for unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
    /// False: the concluded job stays listed until `job-dismiss`, so its error can be read.
    pub auto_dismiss: bool,
}

/// `block-dirty-bitmap-add`: start recording which regions of `node` are written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDirtyBitmapAdd {
    /// The node the bitmap belongs to.
    pub node: String,
    /// The bitmap's name, unique on its node.
    pub name: String,
    /// Stored in the qcow2 image at a clean close, so it outlives the QEMU process.
    pub persistent: bool,
    /// Created not recording (a frozen copy once merged into).
    pub disabled: bool,
}

/// `block-dirty-bitmap-remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDirtyBitmapRemove {
    /// The node the bitmap belongs to.
    pub node: String,
    /// The bitmap's name, unique on its node.
    pub name: String,
}

/// `transaction`: QEMU applies every action or none (here: bitmap actions, as QAPI
/// `TransactionAction` values).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transaction {
    /// The actions, each `{"type": ..., "data": ...}`.
    pub actions: Vec<Value>,
}

impl Transaction {
    /// Creates the disabled bitmap `copy` on `node` holding what `bitmap` holds now: a frozen
    /// snapshot of it, taken atomically.
    pub fn snapshot_bitmap(node: &str, bitmap: &str, copy: &str) -> Transaction {
        Transaction {
            actions: vec![
                serde_json::json!({"type": "block-dirty-bitmap-add",
                    "data": {"node": node, "name": copy, "persistent": false, "disabled": true}}),
                serde_json::json!({"type": "block-dirty-bitmap-merge",
                    "data": {"node": node, "target": copy, "bitmaps": [bitmap]}}),
            ],
        }
    }
}

/// `query-named-block-nodes` with `flat`: every node once, with its dirty bitmaps.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QueryNamedBlockNodes {
    /// Leave out the nodes below each node.
    pub flat: bool,
}

/// One entry of `query-named-block-nodes` (QAPI `BlockDeviceInfo`), the fields Ferry reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockNodeInfo {
    /// Stable name of the node in the block graph.
    #[serde(default)]
    pub node_name: String,
    /// The node's driver: `qcow2`, `raw`, `file`, `nbd`, ...
    #[serde(default)]
    pub drv: String,
    /// See [`DirtyBitmapInfo`].
    #[serde(default)]
    pub dirty_bitmaps: Vec<DirtyBitmapInfo>,
}

/// One dirty bitmap of a node (QAPI `BlockDirtyInfo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DirtyBitmapInfo {
    /// Absent for a job's own bitmap.
    #[serde(default)]
    pub name: Option<String>,
    /// Bytes marked dirty.
    pub count: u64,
    /// Whether writes are recorded.
    #[serde(default)]
    pub recording: bool,
    /// Stored in the image at a clean close.
    #[serde(default)]
    pub persistent: bool,
    /// Loaded from an image that was not closed cleanly: it cannot be trusted.
    #[serde(default)]
    pub inconsistent: bool,
}

commands! {
    BlockdevBackup => "blockdev-backup" -> ();
    BlockDirtyBitmapAdd => "block-dirty-bitmap-add" -> ();
    BlockDirtyBitmapRemove => "block-dirty-bitmap-remove" -> ();
    Transaction => "transaction" -> ();
    QueryNamedBlockNodes => "query-named-block-nodes" -> Vec<BlockNodeInfo>;
    BlockdevAddNbd => "blockdev-add" -> ();
    BlockdevDel => "blockdev-del" -> ();
    BlockdevMirror => "blockdev-mirror" -> ();
    BlockJobCancel => "block-job-cancel" -> ();
    JobDismiss => "job-dismiss" -> ();
    QueryBlockJobs => "query-block-jobs" -> Vec<BlockJobInfo>;
    NbdServerStart => "nbd-server-start" -> ();
    NbdServerStop => "nbd-server-stop" -> ();
    BlockExportAddNbd => "block-export-add" -> ();
    BlockExportDel => "block-export-del" -> ();
}
