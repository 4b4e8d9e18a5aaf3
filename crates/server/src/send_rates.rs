//! What QEMU really gets through between two hosts, learned from completed live migrations:
//! the auto policy's plan uses it instead of the raw TCP probe, which a loaded host's QEMU
//! reaches only in part (issue 17: a probe of about 950 MiB/s, QEMU sending 214-456 MiB/s).

use ferry_api::migrations::Migration;
use ferry_migrate::{plan, SourceOutcome};

use crate::driver::log;
use crate::server::AppState;
use crate::store::SendRate;

/// What a host pair has taught, for a plan (a job's, or the preview before one): the rate
/// and the switchover.
pub async fn learned(state: &AppState, source: &str, destination: &str) -> Option<SendRate> {
    let pair = state.store.send_rate(source, destination).await;
    pair.ok().flatten()
}

/// Folds a completed job's rate into its host pair's, and logs both. A job with a bandwidth
/// cap shows what the cap let through, not what QEMU can, and a compressed one (multifd zstd
/// or zlib) how well its pages compressed, so neither teaches anything: in the bench a
/// compressed 512 MiB guest "went through" at 900 MiB/s over a 1 Gbit/s link, and the next
/// plans' budgets shrank to a few seconds.
pub async fn learn(state: &AppState, m: &Migration, outcome: &SourceOutcome) {
    let capped = m.plan.as_ref().map_or(
        m.options.bandwidth_mib_s.is_some() || m.options.compress,
        |p| {
            p.params.bandwidth != ferry_migrate::Bandwidth::Unlimited
                || p.params
                    .multifd_compression
                    .as_deref()
                    .is_some_and(|c| c != "none")
        },
    );
    let Some(observed) = plan::observed_rate(outcome).filter(|_| !capped) else {
        return;
    };
    let mib = |b: f64| b / 1048576.0;
    let message = match state
        .store
        .learn_send_rate(&m.source, &m.destination, observed)
        .await
    {
        Ok(r) => format!(
            "learned: QEMU got through {:.0} MiB/s of guest memory {} -> {}; the pair's rate is now {:.0} MiB/s ({} migrations)",
            mib(observed),
            m.source,
            m.destination,
            mib(r.rate_bps),
            r.migrations
        ),
        Err(e) => format!("the pair's send rate was not stored: {e}"),
    };
    log(state, m.id, "info", &message).await;
    let Some(switchover) = plan::observed_switchover_ms(outcome) else {
        return;
    };
    let message = match state
        .store
        .learn_switchover(&m.source, &m.destination, switchover)
        .await
    {
        Ok(Some(learned)) => format!(
            "learned: QEMU's pause ran {switchover:.0} ms past its last pages (device state, hand-over); the pair's is now {learned:.0} ms"
        ),
        Ok(None) => return,
        Err(e) => format!("the pair's switchover was not stored: {e}"),
    };
    log(state, m.id, "info", &message).await;
}
