//! Pre-flight checks: will this migration work, and where can the instance go?
//!
//! Server endpoint: `GET /v1/instances/{id}/migration-candidates[?destination=H][&probe=false]`
//! -> `Vec<Candidate>`, best first. Agent endpoints used by the checks (agent bearer):
//! - `POST /v1/probe/listen` -> [`ProbeListening`]: the destination opens a one-shot TCP
//!   listener on its migration address, on a port of its migration range, taken from the top
//!   of the range (QEMU binds from the bottom) and only while another port of the range stays
//!   free; one listener at a time, else 409 [`PROBE_BUSY`];
//! - `POST /v1/probe/connect` [`ProbeConnect`] -> [`ProbeResult`]: the source connects to it
//!   from its migration address, measures round-trip latency and, optionally, bandwidth;
//! - `GET /v1/cpu-models/{model}` -> [`CpuModelFeatures`]: the CPU features QEMU's expansion of
//!   the model requires on this host.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The agent's refusal of `POST /v1/probe/listen` (409) while its one probe listener is open,
/// or when a probe would take the last free port of the migration range: the probe is
/// skipped (a warning), never a failed check, because a migration would still find a port.
pub const PROBE_BUSY: &str = "probe-busy";

/// How bad a finding is. Only `Fail` stops a migration (unless forced, where allowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    Pass,
    Warn,
    Fail,
}

/// One check's verdict, with the numbers it was decided on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CheckResult {
    /// Stable name, also the error code when it fails a migration (`memory`, `cpu-features`,
    /// `migration-port-reachable`, ...).
    pub name: String,
    pub status: CheckStatus,
    pub message: String,
    /// What to do when it is not a pass; empty on pass.
    pub hint: String,
    /// The measured values (free RAM, missing features, latency, ...).
    #[schema(value_type = Object)]
    pub values: serde_json::Value,
    /// Whether `--force` may override a failure of this check.
    pub overridable: bool,
}

/// A host evaluated as the destination of one instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Candidate {
    pub host: String,
    /// No check failed.
    pub fit: bool,
    /// 1 = best. Fit hosts first, then by free capacity.
    pub rank: u32,
    pub free_ram_mib: u64,
    pub checks: Vec<CheckResult>,
}

/// `POST /v1/probe/listen` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeListening {
    pub addr: String,
    /// Sent first by the connecting side, so stray connections are not counted.
    pub token: String,
}

/// `POST /v1/probe/connect`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeConnect {
    pub addr: String,
    pub token: String,
    /// How long to push data for the bandwidth estimate; 0 skips it. At most 2000.
    pub bandwidth_ms: u64,
}

/// What the source saw connecting to the destination's probe listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub connected: bool,
    /// Median round trip of small messages.
    pub latency_ms: Option<f64>,
    pub bandwidth_mbit_s: Option<f64>,
    pub error: Option<String>,
}

/// `GET /v1/cpu-models/{model}` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuModelFeatures {
    pub model: String,
    /// Feature names in /proc/cpuinfo spelling (`sse4_2`, `avx2`, ...).
    pub features: Vec<String>,
}

/// `GET /v1/cpu-baseline`: the newest named CPU model every online host can run. New
/// instances given this model can migrate to any host of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CpuBaseline {
    /// `None` when not even the oldest known model runs everywhere.
    pub model: Option<String>,
    /// The hosts it was computed over.
    pub hosts: Vec<String>,
}
