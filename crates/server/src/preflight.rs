//! Gathers what the pre-flight checks need (fresh facts from every agent, the CPU model's
//! features from the source agent, probes of the migration port, shared and rate-limited by
//! [`ProbeCache`]) and ranks the candidates.
//! The checks themselves are pure: [`crate::checks`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use ferry_api::agent::{ImageMeasure, MeasureImage};
use ferry_api::checks::{
    Candidate, CheckResult, CheckStatus, CpuModelFeatures, ProbeConnect, ProbeListening,
    ProbeResult, PROBE_BUSY,
};
use ferry_api::hosts::{Host, HostFacts, HostState};
use ferry_api::instances::{ImageRef, Instance};
use ferry_api::migrations::MigrationKind;
use ferry_api::{ApiClient, ApiError};
use futures_util::future::join_all;
use serde_json::json;
use uuid::Uuid;

use crate::agents::agent_client;
use crate::checks::{self, CheckInput, BASELINE_MODELS};
use crate::server::AppState;
use crate::ServerError;

/// How long an agent gets to answer `GET /v1/facts`.
const FACTS_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a CPU model expansion may take (the agent asks QEMU).
const CPU_MODEL_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound of one probe (listen + connect + bandwidth).
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// What to evaluate.
pub struct Request<'a> {
    pub instance: &'a Instance,
    pub kind: MigrationKind,
    /// Only this destination; else every other host.
    pub destination: Option<&'a str>,
    pub probe: bool,
    /// The job being checked (the driver's own job is not "another migration in flight").
    pub migration: Option<Uuid>,
    /// Live migration: the user's destination datastore per local disk.
    pub disk_map: Option<&'a std::collections::BTreeMap<String, String>>,
}

async fn timed<T>(
    limit: Duration,
    f: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", limit.as_secs())),
    }
}

/// Facts as the agent reports them now, or the last heartbeat's (`stale`).
struct Fresh {
    facts: Option<HostFacts>,
    answered: bool,
    stale: bool,
}

async fn fresh_facts(state: &AppState, host: &Host) -> Fresh {
    let answer = match agent_client(state, &host.name).await {
        Ok(c) => timed(FACTS_TIMEOUT, c.get::<HostFacts>("/v1/facts"))
            .await
            .ok(),
        Err(_) => None,
    };
    match answer {
        Some(f) => Fresh {
            facts: Some(f),
            answered: true,
            stale: false,
        },
        None => Fresh {
            facts: host.facts.clone(),
            answered: false,
            stale: host.facts.is_some(),
        },
    }
}

async fn cpu_model(src: &ApiClient, model: &str) -> Result<Vec<String>, String> {
    let path = format!("/v1/cpu-models/{}", seg(model));
    timed(CPU_MODEL_TIMEOUT, src.get::<CpuModelFeatures>(&path))
        .await
        .map(|m| m.features)
}

fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The newest of the known named CPU models whose features every one of `host_flags` has,
/// with the features of each model as `expander`'s QEMU reports them.
pub async fn baseline_model(expander: &ApiClient, host_flags: &[Vec<String>]) -> Option<String> {
    let models: Vec<(String, Vec<String>)> = join_all(BASELINE_MODELS.iter().map(|m| async move {
        cpu_model(expander, m)
            .await
            .ok()
            .map(|f| (m.to_string(), f))
    }))
    .await
    .into_iter()
    .flatten()
    .collect();
    let refs: Vec<&[String]> = host_flags.iter().map(Vec::as_slice).collect();
    checks::cluster_baseline(&models, &refs)
}

/// What a probe between two hosts found.
#[derive(Debug, Clone, PartialEq)]
pub enum Probed {
    Done(ProbeResult),
    /// An agent has no probe endpoints (too old): a warning.
    Unsupported,
    /// The destination could not spare a port or already runs a probe: a warning, because a
    /// migration would still find a port.
    Busy(String),
}

/// Probes between hosts, shared by every request: a recent result per (source, destination)
/// is reused, and probes to one destination run one at a time, so that any number of
/// candidate requests costs each pair of hosts at most one probe per cache window and never
/// more than one listener on a destination.
#[derive(Debug, Default)]
pub struct ProbeCache {
    results: std::sync::Mutex<HashMap<(String, String), (Instant, Probed)>>,
    /// The last bandwidth measured per (source, destination), Mbit/s.
    links: std::sync::Mutex<HashMap<(String, String), (Instant, f64)>>,
    destinations: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    runs: AtomicU64,
}

impl ProbeCache {
    /// How many probes this server has run.
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    fn fresh(&self, key: &(String, String), ttl: Duration) -> Option<Probed> {
        let results = self.results.lock().unwrap_or_else(|p| p.into_inner());
        results
            .get(key)
            .filter(|(at, _)| at.elapsed() < ttl)
            .map(|(_, r)| r.clone())
    }

    fn remember(&self, key: (String, String), result: Probed, ttl: Duration) {
        let mut results = self.results.lock().unwrap_or_else(|p| p.into_inner());
        results.retain(|_, (at, _)| at.elapsed() < ttl);
        results.insert(key, (Instant::now(), result));
    }

    fn destination_lock(&self, destination: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.destinations.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(destination.to_string()).or_default().clone()
    }

    /// A bandwidth measured from `source` to `destination` within `ttl`.
    fn link(&self, key: &(String, String), ttl: Duration) -> Option<f64> {
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links
            .get(key)
            .filter(|(at, _)| at.elapsed() < ttl)
            .map(|(_, mbit)| *mbit)
    }

    /// The probe from `source` to `destination`: a result younger than `ttl`, else a new
    /// probe, run while holding the destination's lock. `run(true)` also measures the
    /// bandwidth; it is called with false while one measured within `link_ttl` is known, or
    /// `stored` (an earlier measurement the caller still trusts) stands in, and the result
    /// then carries that. True with the result when this call measured the bandwidth.
    pub async fn probe<F, Fut>(
        &self,
        source: &str,
        destination: &str,
        ttls: (Duration, Duration),
        stored: Option<f64>,
        run: F,
    ) -> (Probed, bool)
    where
        F: FnOnce(bool) -> Fut,
        Fut: Future<Output = Probed>,
    {
        let (ttl, link_ttl) = ttls;
        let key = (source.to_string(), destination.to_string());
        if let Some(r) = self.fresh(&key, ttl) {
            return (r, false);
        }
        let lock = self.destination_lock(destination);
        let _one_at_a_time = lock.lock().await;
        // Another request may have probed this pair while this one waited.
        if let Some(r) = self.fresh(&key, ttl) {
            return (r, false);
        }
        self.runs.fetch_add(1, Ordering::Relaxed);
        let known = self.link(&key, link_ttl).or(stored);
        let mut result = run(known.is_none()).await;
        let mut measured = false;
        if let Probed::Done(r) = &mut result {
            match (r.bandwidth_mbit_s, known) {
                (Some(mbit), _) => {
                    let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
                    links.insert(key.clone(), (Instant::now(), mbit));
                    measured = true;
                }
                (None, Some(mbit)) if r.connected => r.bandwidth_mbit_s = Some(mbit),
                _ => {}
            }
        }
        self.remember(key, result.clone(), ttl);
        (result, measured)
    }
}

/// The last measured bandwidth of `source` -> `destination`, when the pair also has a learned
/// send rate: the plan then goes by what QEMU got through there, and the link only decides
/// the parallel channels, so an old measurement is good enough and no data is pushed before
/// the migration (it starts in milliseconds, also after a restart or a long quiet time). A
/// pair without one is measured as usual.
async fn stored_link(state: &AppState, source: &str, destination: &str) -> Option<f64> {
    let learned = state.store.send_rate(source, destination).await.ok()??;
    let link = state.store.link(source, destination).await.ok()??;
    (learned.migrations > 0).then_some(link.bandwidth_mbit_s)
}

/// Listen on the destination, connect from the source.
async fn probe(src: &ApiClient, dst: &ApiClient, bandwidth_ms: u64) -> Probed {
    let run = async {
        let listening: ProbeListening = match dst.post("/v1/probe/listen", &()).await {
            Ok(l) => l,
            Err(e) if e.status() == Some(404) => return Probed::Unsupported,
            Err(e) if e.status() == Some(409) && e.code() == PROBE_BUSY => {
                return Probed::Busy(e.to_string())
            }
            Err(e) => {
                return Probed::Done(not_connected(format!("destination cannot listen: {e}")))
            }
        };
        let body = ProbeConnect {
            addr: listening.addr,
            token: listening.token,
            bandwidth_ms,
        };
        match src.post::<_, ProbeResult>("/v1/probe/connect", &body).await {
            Ok(r) => Probed::Done(r),
            Err(e) if e.status() == Some(404) => Probed::Unsupported,
            Err(e) => Probed::Done(not_connected(format!("source cannot probe: {e}"))),
        }
    };
    match tokio::time::timeout(PROBE_TIMEOUT, run).await {
        Ok(r) => r,
        Err(_) => Probed::Done(not_connected(format!(
            "no answer within {} s",
            PROBE_TIMEOUT.as_secs()
        ))),
    }
}

fn not_connected(error: String) -> ProbeResult {
    ProbeResult {
        connected: false,
        latency_ms: None,
        bandwidth_mbit_s: None,
        error: Some(error),
    }
}

fn probe_unsupported() -> CheckResult {
    CheckResult {
        name: "migration-port-reachable".into(),
        status: CheckStatus::Warn,
        message: "an agent cannot probe the migration port (no /v1/probe endpoints)".into(),
        hint: "upgrade the agents; the port is only tried when the migration starts".into(),
        values: json!({}),
        overridable: false,
    }
}

fn probe_busy(detail: &str) -> CheckResult {
    CheckResult {
        name: "migration-port-reachable".into(),
        status: CheckStatus::Warn,
        message: format!("the destination could not take a probe now ({detail})"),
        hint: "the port is tried when the migration starts; ask again in a few seconds".into(),
        values: json!({}),
        overridable: false,
    }
}

fn facts_stale(host: &str) -> CheckResult {
    CheckResult {
        name: "facts".into(),
        status: CheckStatus::Warn,
        message: format!("{host}'s agent did not answer; using its last heartbeat's facts"),
        hint: "check that the agent runs; the numbers may be out of date".into(),
        values: json!({"stale": true}),
        overridable: false,
    }
}

/// Orders candidates (fit first, then most free RAM, then name) and numbers them from 1.
pub fn rank(mut candidates: Vec<Candidate>) -> Vec<Candidate> {
    candidates.sort_by(|a, b| {
        b.fit
            .cmp(&a.fit)
            .then(b.free_ram_mib.cmp(&a.free_ram_mib))
            .then(a.host.cmp(&b.host))
    });
    for (i, c) in candidates.iter_mut().enumerate() {
        c.rank = i as u32 + 1;
    }
    candidates
}

/// Every destination of the request, evaluated and ranked (best first).
pub async fn evaluate(state: &AppState, req: &Request<'_>) -> Result<Vec<Candidate>, ServerError> {
    let instance = req.instance;
    let offline_after = chrono::Duration::seconds(state.config.heartbeat_timeout_s as i64);
    let hosts = state.store.list_hosts(offline_after, Utc::now()).await?;
    if let Some(d) = req.destination {
        if !hosts.iter().any(|h| h.name == d) {
            return Err(ServerError::not_found("host", d));
        }
    }
    let targets: Vec<&Host> = hosts
        .iter()
        .filter(|h| h.name != instance.host)
        .filter(|h| req.destination.is_none_or(|d| d == h.name))
        .collect();
    let source_host = hosts.iter().find(|h| h.name == instance.host);

    // Fresh facts from every host involved, in parallel.
    let involved: Vec<&Host> = hosts
        .iter()
        .filter(|h| h.name == instance.host || targets.iter().any(|t| t.name == h.name))
        .collect();
    let fresh: HashMap<String, Fresh> = join_all(
        involved
            .iter()
            .map(|h| async move { (h.name.clone(), fresh_facts(state, h).await) }),
    )
    .await
    .into_iter()
    .collect();
    let source_facts = fresh.get(&instance.host).and_then(|f| f.facts.clone());
    let source_stale = fresh.get(&instance.host).is_some_and(|f| f.stale);

    // The features the instance's CPU model needs, from the source agent.
    let src = agent_client(state, &instance.host).await.ok();
    let (cpu_features, cpu_error) = match &src {
        Some(c) => match cpu_model(c, &instance.spec.cpu_model).await {
            Ok(f) => (Some(f), None),
            Err(e) => (
                None,
                Some(format!("the source agent could not expand it: {e}")),
            ),
        },
        None => (None, Some("the source host has no agent".to_string())),
    };
    // The cluster baseline, only worth computing when some host lacks features.
    let any_missing = cpu_features.as_ref().is_some_and(|needed| {
        targets.iter().any(|t| {
            fresh
                .get(&t.name)
                .and_then(|f| f.facts.as_ref())
                .is_some_and(|f| !checks::missing_features(needed, &f.cpu_flags).is_empty())
        })
    });
    let baseline = match (&src, any_missing) {
        (Some(c), true) => {
            let online_flags: Vec<Vec<String>> = hosts
                .iter()
                .filter(|h| h.state == HostState::Online)
                .filter_map(|h| {
                    fresh
                        .get(&h.name)
                        .and_then(|f| f.facts.as_ref())
                        .or(h.facts.as_ref())
                        .map(|f| f.cpu_flags.clone())
                })
                .collect();
            baseline_model(c, &online_flags).await
        }
        _ => None,
    };

    // A cold migration copies the images the destination does not share: what each takes on
    // the source, for the free-space check.
    // A live one copies its local disks (block migration): the same measure.
    let image_bytes = match (&src, &source_facts) {
        (Some(c), Some(sf)) => measure_images(c, instance, sf, &targets, &fresh).await,
        _ => HashMap::new(),
    };

    // Slots and other jobs.
    let active = state.store.active_migrations().await?;
    let mut inbound: HashMap<&str, u32> = HashMap::new();
    for m in active.iter().filter(|m| Some(m.id) != req.migration) {
        *inbound.entry(m.destination.as_str()).or_default() += 1;
    }
    let other_migrations: Vec<Uuid> = instance
        .migration
        .into_iter()
        .filter(|id| Some(*id) != req.migration)
        .collect();

    let input_for = |t: &Host, probe: Option<&ProbeResult>| -> Vec<CheckResult> {
        let f = fresh.get(&t.name);
        let input = CheckInput {
            instance,
            kind: req.kind,
            source_name: &instance.host,
            source: source_facts.as_ref(),
            dest_name: &t.name,
            dest: f.and_then(|f| f.facts.as_ref()),
            dest_enabled: t.enabled,
            dest_online: t.state == HostState::Online,
            dest_agent_answered: f.is_some_and(|f| f.answered),
            dest_facts_stale: f.is_some_and(|f| f.stale),
            inbound_active: inbound.get(t.name.as_str()).copied().unwrap_or(0),
            inbound_limit: state.config.limits.per_host_inbound,
            other_migrations: other_migrations.clone(),
            probe: None,
            cpu_features: cpu_features.as_deref(),
            cpu_features_error: cpu_error.as_deref(),
            cluster_baseline: baseline.as_deref(),
            qemu_rule: state.config.preflight.qemu_version_rule,
            image_bytes: Some(&image_bytes),
            disk_map: req.disk_map,
        };
        let mut out = checks::run_all(&CheckInput { probe, ..input });
        if f.is_some_and(|f| f.stale) {
            out.push(facts_stale(&t.name));
        }
        if source_stale {
            out.push(facts_stale(&instance.host));
        }
        if source_host.is_none() {
            out.push(CheckResult {
                name: "facts".into(),
                status: CheckStatus::Fail,
                message: format!("the source host {} is not known", instance.host),
                hint: "see `ferry host list`".into(),
                values: json!({}),
                overridable: false,
            });
        }
        out
    };

    // Cheap checks first; probe only the hosts that pass them.
    let cheap: Vec<Vec<CheckResult>> = targets.iter().map(|t| input_for(t, None)).collect();
    // Probes are shared with every other request (see [`ProbeCache`]).
    let ttl = Duration::from_secs(state.config.preflight.probe_cache_s);
    // A cold migration uses the migration network only when it copies disks.
    let copies_to = |t: &Host| -> bool {
        match (
            &source_facts,
            fresh.get(&t.name).and_then(|f| f.facts.as_ref()),
        ) {
            (Some(s), Some(d)) => !checks::planned_copies(instance, s, d).is_empty(),
            _ => false,
        }
    };
    let probes: Vec<Option<Probed>> = if req.probe {
        join_all(targets.iter().zip(&cheap).map(|(t, checks)| {
            let src = src.clone();
            let wanted = req.kind == MigrationKind::Live || copies_to(t);
            async move {
                if !wanted || checks.iter().any(|c| c.status == CheckStatus::Fail) {
                    return None;
                }
                let src = src?;
                let dst = agent_client(state, &t.name).await.ok()?;
                let bandwidth_ms = state.config.preflight.bandwidth_probe_ms;
                let link_ttl = Duration::from_secs(state.config.preflight.link_cache_s);
                let stored = stored_link(state, &instance.host, &t.name).await;
                let (probed, measured) = state
                    .probes
                    .probe(
                        &instance.host,
                        &t.name,
                        (ttl, link_ttl),
                        stored,
                        |measure| probe(&src, &dst, if measure { bandwidth_ms } else { 0 }),
                    )
                    .await;
                if let (true, Probed::Done(r)) = (measured, &probed) {
                    if let Some(mbit) = r.bandwidth_mbit_s {
                        if let Err(e) = state.store.record_link(&instance.host, &t.name, mbit).await
                        {
                            tracing::warn!(error = %e, "the measured link was not stored");
                        }
                    }
                }
                Some(probed)
            }
        }))
        .await
    } else {
        targets.iter().map(|_| None).collect()
    };

    let candidates = targets
        .iter()
        .zip(cheap)
        .zip(probes)
        .map(|((t, cheap), probed)| {
            let checks = match probed {
                None => cheap,
                Some(Probed::Done(p)) => input_for(t, Some(&p)),
                Some(Probed::Unsupported) => {
                    let mut c = cheap;
                    c.push(probe_unsupported());
                    c
                }
                Some(Probed::Busy(detail)) => {
                    let mut c = cheap;
                    c.push(probe_busy(&detail));
                    c
                }
            };
            Candidate {
                host: t.name.clone(),
                fit: !checks.iter().any(|c| c.status == CheckStatus::Fail),
                rank: 0,
                free_ram_mib: fresh
                    .get(&t.name)
                    .and_then(|f| f.facts.as_ref())
                    .map(|f| f.ram_free_mib)
                    .unwrap_or(0),
                checks,
            }
        })
        .collect();
    Ok(rank(candidates))
}

/// What each image a migration would copy to any of `targets` takes on the source
/// (`POST /v1/disks/measure` on the source agent). An image the agent cannot measure is left
/// out, and the check counts its virtual size.
async fn measure_images(
    src: &ApiClient,
    instance: &Instance,
    source: &HostFacts,
    targets: &[&Host],
    fresh: &HashMap<String, Fresh>,
) -> HashMap<ImageRef, u64> {
    let mut wanted: Vec<(ImageRef, ferry_api::instances::DiskFormat)> = Vec::new();
    for t in targets {
        let Some(dst) = fresh.get(&t.name).and_then(|f| f.facts.as_ref()) else {
            continue;
        };
        for c in checks::planned_copies(instance, source, dst) {
            if !wanted.iter().any(|(i, _)| *i == c.image) {
                wanted.push((c.image, c.format));
            }
        }
    }
    join_all(wanted.into_iter().map(|(image, format)| async move {
        let body = MeasureImage {
            image: image.clone(),
            format,
        };
        let measured = timed(
            FACTS_TIMEOUT,
            src.post::<_, ImageMeasure>("/v1/disks/measure", &body),
        )
        .await
        .ok()?;
        Some((image, measured.allocated_bytes))
    }))
    .await
    .into_iter()
    .flatten()
    .collect()
}

/// One line per unfit host: its failing checks.
pub fn why_unfit(candidates: &[Candidate]) -> String {
    candidates
        .iter()
        .map(|c| {
            let fails: Vec<String> = c
                .checks
                .iter()
                .filter(|k| k.status == CheckStatus::Fail)
                .map(|k| format!("{}: {}", k.name, k.message))
                .collect();
            format!("{}: {}", c.host, fails.join("; "))
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(host: &str, fit: bool, free: u64) -> Candidate {
        Candidate {
            host: host.into(),
            fit,
            rank: 0,
            free_ram_mib: free,
            checks: vec![],
        }
    }

    #[test]
    fn fit_hosts_first_then_most_free_ram() {
        let ranked = rank(vec![
            cand("a", false, 9000),
            cand("b", true, 1000),
            cand("c", true, 3000),
        ]);
        let order: Vec<(&str, u32)> = ranked.iter().map(|c| (c.host.as_str(), c.rank)).collect();
        assert_eq!(order, vec![("c", 1), ("b", 2), ("a", 3)]);
    }

    #[tokio::test]
    async fn a_known_link_is_not_measured_again_and_its_bandwidth_is_reused() {
        let cache = ProbeCache::default();
        let measured = std::sync::Mutex::new(Vec::new());
        let probe = |measure: bool| {
            measured.lock().unwrap().push(measure);
            async move {
                Probed::Done(ProbeResult {
                    connected: true,
                    latency_ms: Some(0.1),
                    bandwidth_mbit_s: measure.then_some(8000.0),
                    error: None,
                })
            }
        };
        let ttls = (Duration::ZERO, Duration::from_secs(600));
        let (first, fresh) = cache.probe("hv1", "hv2", ttls, None, probe).await;
        assert!(fresh);
        let (second, fresh) = cache.probe("hv1", "hv2", ttls, None, probe).await;
        assert!(!fresh);
        // The other direction is another link.
        let (back, _) = cache.probe("hv2", "hv1", ttls, None, probe).await;
        assert_eq!(*measured.lock().unwrap(), vec![true, false, true]);
        let bandwidth = |p: &Probed| match p {
            Probed::Done(r) => r.bandwidth_mbit_s,
            _ => None,
        };
        assert_eq!(bandwidth(&first), Some(8000.0));
        assert_eq!(bandwidth(&second), Some(8000.0), "the known bandwidth");
        assert_eq!(bandwidth(&back), Some(8000.0));
        assert_eq!(cache.runs(), 3, "connectivity is probed every time");
        // Once the link's bandwidth is old, it is measured again...
        let expired = (Duration::ZERO, Duration::ZERO);
        let (again, _) = cache.probe("hv1", "hv2", expired, None, probe).await;
        assert_eq!(measured.lock().unwrap().last(), Some(&true));
        assert_eq!(bandwidth(&again), Some(8000.0));
        // ...unless the caller has a stored measurement it trusts (a pair with a learned
        // send rate): then the probe only connects and the result carries that one.
        let (stored, fresh) = cache.probe("hv1", "hv2", expired, Some(900.0), probe).await;
        assert!(!fresh);
        assert_eq!(measured.lock().unwrap().last(), Some(&false));
        assert_eq!(bandwidth(&stored), Some(900.0));
    }
}
