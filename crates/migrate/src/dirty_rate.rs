//! Measuring how fast a running guest dirties its memory, before a migration starts.

use std::time::{Duration, Instant};

use ferry_qmp::commands::{CalcDirtyRate, QueryDirtyRate};
use ferry_qmp::Qmp;

use crate::MigrateError;

/// Pages sampled per GiB: QEMU's default of 512 misses a small writing working set in a big
/// guest; hashing 4096 pages per GiB per second costs nothing noticeable.
const SAMPLE_PAGES_PER_GIB: u64 = 4096;

/// Distinct bytes the guest dirtied per second over `period` (whole seconds, at least 1),
/// by QEMU's page sampling; works under KVM and TCG and needs no dirty logging.
pub async fn measure(qmp: &Qmp, period: Duration) -> Result<f64, MigrateError> {
    let secs = period.as_secs().max(1);
    qmp.execute(&CalcDirtyRate {
        calc_time: secs,
        sample_pages: Some(SAMPLE_PAGES_PER_GIB),
        mode: None,
    })
    .await?;
    let deadline = Instant::now() + Duration::from_secs(secs + 5);
    tokio::time::sleep(Duration::from_secs(secs)).await;
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
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
