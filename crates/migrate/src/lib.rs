//! The migration engine.
//!
//! A live migration is split into the halves that run next to each QEMU process
//! ([`source`] and [`destination`]), the pure progress model both report with ([`progress`]),
//! and the explicit phase sequence with its undo steps ([`phases`]) that whoever drives the
//! halves (the demo in one process today, the server over agents later) follows.

pub mod control;
pub mod destination;
pub mod dirty_rate;
mod error;
pub mod impact;
pub mod mirror;
pub mod params;
pub mod phases;
pub mod plan;
pub mod progress;
pub mod settings;
pub mod source;
pub mod tls;

pub use control::{Action, ControlPolicy, Controller, Decision, EscalateConfig, TimeoutAction};
pub use error::{DiskCopyFailure, MigrateError};
pub use impact::{GuestImpact, Observation, ThrottleStep};
pub use mirror::{DiskProgress, DiskState, MirrorTarget};
pub use params::{Announce, Bandwidth, MigrationParams, PortRange};
pub use phases::{live_migrate, MigrationHalves, MigrationOutcome};
pub use plan::{Plan, PlanInputs, Prediction};
pub use progress::{Phase, Progress, ProgressTracker};
pub use settings::QemuSettings;
pub use source::{AbortHandle, AbortSignal, SourceEvent, SourceOutcome};
pub use tls::{HalvesTls, StreamTls, TlsCredentials, TlsError, TlsPeer};
