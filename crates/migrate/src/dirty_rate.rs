//! Measuring how fast a running guest dirties its memory, before a migration starts.

use std::time::{Duration, Instant};

use ferry_qmp::commands::{CalcDirtyRate, QueryDirtyRate};
use ferry_qmp::Qmp;

use crate::MigrateError;

/// Pages sampled per GiB: QEMU's default of 512 misses a small writing working set in a big
/// guest; hashing 4096 pages per GiB per second costs nothing noticeable.
const SAMPLE_PAGES_PER_GIB: u64 = 4096;

/// The shortest window QEMU measures over.
pub const MIN_WINDOW: Duration = Duration::from_millis(50);

/// Distinct bytes the guest dirtied per second over `period` (milliseconds, at least
/// [`MIN_WINDOW`]), by QEMU's page sampling; works under KVM and TCG and needs no dirty
/// logging. A window of a few hundred milliseconds lets a migration start at once; it sees
/// the working set a guest rewrites within that time, which is what the first rounds resend.
pub async fn measure(qmp: &Qmp, period: Duration) -> Result<f64, MigrateError> {
    let period = period.clamp(MIN_WINDOW, Duration::from_secs(60));
    qmp.execute(&CalcDirtyRate {
        calc_time: period.as_millis() as u64,
        calc_time_unit: Some("millisecond"),
        sample_pages: Some(SAMPLE_PAGES_PER_GIB),
        mode: None,
    })
    .await?;
    let deadline = Instant::now() + period + Duration::from_secs(5);
    tokio::time::sleep(period).await;
    loop {
        let info = qmp.execute(&QueryDirtyRate {}).await?;
        if info.status == "measured" {
            // QEMU reports MiB/s (its "MB/s" is computed with a shift by 20).
            return Ok(info.dirty_rate.unwrap_or(0).max(0) as f64 * 1048576.0);
        }
        if Instant::now() > deadline {
            return Err(MigrateError::Failed(format!(
                "QEMU did not finish measuring the dirty rate (status {})",
                info.status
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
