//! This host's part of the server's pre-flight checks (see `ferry_api::checks`): a one-shot
//! probe listener on the migration address, a probe client measuring latency and bandwidth to
//! another host's listener, and the CPU features a QEMU CPU model requires here.
//!
//! Probe protocol (plain TCP, one connection):
//! 1. the client sends the token and `\n`; the listener answers `ok\n`, or closes the
//!    connection on a wrong token (so stray connections are never counted);
//! 2. pings: the client sends `ping\n`, the listener echoes the line; repeated;
//! 3. optionally `bulk\n`, then data until the client shuts its write half; the listener then
//!    answers the byte count it received (`<n>\n`), and the client divides by the time until
//!    that answer arrived, so socket buffers do not inflate the figure.
//!
//! The listener accepts for at most [`LISTEN_FOR`], serves one connection at a time, and
//! closes after the first one with the right token; each connection ends when the client
//! closes it or at the same deadline. An agent has at most one probe listener open, on a port
//! from the top of its migration range that a migration can spare (see [`bind_probe_port`]).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::checks::{CpuModelFeatures, ProbeConnect, ProbeListening, ProbeResult, PROBE_BUSY};
use ferry_qmp::commands::{CpuModelExpansionType, QueryCpuModelExpansion};
use ferry_qmp::{Qmp, QmpError};
use rand::RngCore;
use serde_json::{Map, Value};
use tracing::debug;

use crate::{Agent, AgentError};

/// How long a probe listener accepts connections.
pub const LISTEN_FOR: Duration = Duration::from_secs(10);
/// Most connections one probe listener accepts (stray ones with a wrong token included).
const MAX_PROBE_CONNECTIONS: usize = 8;
/// How long a probe listen request waits for the host's previous probe listener to close.
const GATE_WAIT: Duration = Duration::from_millis(500);
/// Connect timeout of the probe client.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The probe client's whole budget.
const PROBE_BUDGET: Duration = Duration::from_secs(3);
/// Longest bandwidth measurement a client may ask for.
pub const MAX_BANDWIDTH_MS: u64 = 2000;
/// Round trips measured for the latency.
const PINGS: usize = 5;
/// Size of each bulk write.
const CHUNK: usize = 64 * 1024;
/// Where `ip netns add` puts namespace handles.
const NETNS_DIR: &str = "/run/netns";
/// Longest wait for the short-lived QEMU used for CPU model expansion.
const QEMU_EXPANSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `f` inside network namespace `ns` (on a fresh thread that entered it), or directly
/// when `ns` is `None`. Sockets created by `f` stay in that namespace for their whole life and
/// may be used from any thread afterwards.
pub(crate) fn in_netns<T: Send + 'static>(
    ns: Option<&str>,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let Some(ns) = ns else {
        return f();
    };
    if ns.is_empty() || ns.contains('/') || ns == "." || ns == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid network namespace name {ns:?}"),
        ));
    }
    let path = PathBuf::from(NETNS_DIR).join(ns);
    let name = ns.to_string();
    std::thread::Builder::new()
        .name("ferry-netns".into())
        .spawn(move || {
            let file = File::open(&path).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot open network namespace {name}: {e}"),
                )
            })?;
            // SAFETY: the fd is valid for the duration of the call; setns changes only this
            // (fresh, short-lived) thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot enter network namespace {name}: {e}"),
                ));
            }
            f()
        })?
        .join()
        .map_err(|_| io::Error::other(format!("closure run in network namespace {ns} panicked")))?
}

/// Binds a port of `first..=last` on `ip` for a probe, searching from the top of the range
/// because QEMU's `migrate-incoming` binds from the bottom, and only if another port of the
/// range is still free afterwards: a probe must never take the port a migration needs. `None`
/// when no port can be spared.
fn bind_probe_port(ip: IpAddr, first: u16, last: u16) -> io::Result<Option<TcpListener>> {
    for port in (first..=last).rev() {
        let listener = match TcpListener::bind(SocketAddr::new(ip, port)) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e),
        };
        // Ports above `port` are taken; one below must be free for a migration.
        let spare = (first..port).any(|p| TcpListener::bind(SocketAddr::new(ip, p)).is_ok());
        return Ok(spare.then_some(listener));
    }
    Ok(None)
}

/// The agent's one probe listener: set while it is open. Held by the listener's thread, so it
/// is released when the listener closes, however that happens.
#[derive(Debug, Default)]
pub(crate) struct ProbeGate(AtomicBool);

/// Proof of holding the [`ProbeGate`]; releases it on drop.
#[derive(Debug)]
pub(crate) struct ProbeSlot(Arc<ProbeGate>);

impl ProbeGate {
    /// The slot, unless a probe listener is open.
    pub(crate) fn try_take(self: &Arc<Self>) -> Option<ProbeSlot> {
        self.0
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| ProbeSlot(self.clone()))
    }
}

impl Drop for ProbeSlot {
    fn drop(&mut self) {
        self.0 .0.store(false, Ordering::Release);
    }
}

fn probe_busy(message: String) -> AgentError {
    AgentError::conflict(
        PROBE_BUSY,
        message,
        "the probe is skipped; the migration port is tried when the migration starts",
    )
}

/// Opens the probe listener: at most one at a time ([`ProbeGate`]), on a port a migration can
/// spare ([`bind_probe_port`]).
pub(crate) fn open_probe_listener(
    gate: &Arc<ProbeGate>,
    ns: Option<&str>,
    ip: IpAddr,
    first: u16,
    last: u16,
) -> Result<(TcpListener, ProbeSlot), AgentError> {
    // A listener whose probe just ended closes a moment after its client got the answer;
    // wait that moment out rather than refuse the next probe.
    let deadline = Instant::now() + GATE_WAIT;
    let slot = loop {
        match gate.try_take() {
            Some(slot) => break slot,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            None => {
                return Err(probe_busy(
                    "a probe listener is already open on this host".into(),
                ))
            }
        }
    };
    let ns = ns.map(str::to_string);
    let bound = in_netns(ns.as_deref(), move || bind_probe_port(ip, first, last))
        .map_err(|e| AgentError::Internal(format!("cannot open a probe listener on {ip}: {e}")))?;
    match bound {
        Some(listener) => Ok((listener, slot)),
        None => Err(probe_busy(format!(
            "fewer than two ports of {first}-{last} on {ip} are free; a probe would take one a \
             migration may need"
        ))),
    }
}

/// `POST /v1/probe/listen`.
pub(crate) async fn probe_listen(agent: &Arc<Agent>) -> Result<ProbeListening, AgentError> {
    let ip = agent.config.migration_addr;
    let range = agent.port_range;
    let ns = agent.config.netns.clone();
    let gate = agent.probe_gate.clone();
    let (listener, slot) = tokio::task::spawn_blocking(move || {
        open_probe_listener(&gate, ns.as_deref(), ip, range.first, range.last)
    })
    .await
    .map_err(|e| AgentError::Internal(format!("probe listener panicked: {e}")))??;
    let addr = listener
        .local_addr()
        .map_err(|e| AgentError::Internal(format!("probe listener: {e}")))?;
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    serve_probe(listener, token.clone(), LISTEN_FOR, slot)
        .map_err(|e| AgentError::Internal(format!("cannot start the probe listener: {e}")))?;
    debug!(%addr, "probe listener open");
    Ok(ProbeListening {
        addr: addr.to_string(),
        token,
    })
}

/// Accepts on `listener` for `period` in a background thread and serves the connections one
/// after the other, until one presenting `token` has been served; then closes the listener and
/// lets go of `slot`. One connection at a time bounds the bulk traffic a probe can cause.
pub(crate) fn serve_probe(
    listener: TcpListener,
    token: String,
    period: Duration,
    slot: ProbeSlot,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + period;
    std::thread::Builder::new()
        .name("ferry-probe".into())
        .spawn(move || {
            let _slot = slot;
            let mut served = 0;
            while Instant::now() < deadline && served < MAX_PROBE_CONNECTIONS {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        served += 1;
                        match serve_connection(stream, &token, deadline) {
                            Ok(()) => break,
                            Err(e) => debug!(%peer, error = %e, "probe connection ended"),
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => {
                        debug!(error = %e, "probe accept failed");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
            debug!("probe listener closed");
        })?;
    Ok(())
}

/// Time left until `deadline`, at least 1 ms (socket timeouts refuse zero).
fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// Reads one line of at most 128 bytes; `None` at end of stream.
fn read_line(reader: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut line = String::new();
    let n = reader.by_ref().take(128).read_line(&mut line)?;
    if n == 0 {
        return Ok(None);
    }
    Ok(Some(line.trim_end_matches(['\n', '\r']).to_string()))
}

/// The listener's side of one probe connection.
fn serve_connection(stream: TcpStream, token: &str, deadline: Instant) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(left(deadline).min(Duration::from_secs(2))))?;
    stream.set_write_timeout(Some(left(deadline)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(CHUNK, stream);
    if read_line(&mut reader)?.as_deref() != Some(token) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "wrong token",
        ));
    }
    writer.write_all(b"ok\n")?;
    loop {
        reader.get_ref().set_read_timeout(Some(left(deadline)))?;
        let Some(line) = read_line(&mut reader)? else {
            return Ok(());
        };
        match line.as_str() {
            "bulk" => {
                let mut buf = vec![0u8; CHUNK];
                let mut total: u64 = 0;
                loop {
                    match reader.read(&mut buf)? {
                        0 => break,
                        n => total += n as u64,
                    }
                }
                writer.write_all(format!("{total}\n").as_bytes())?;
                return Ok(());
            }
            _ => writer.write_all(format!("{line}\n").as_bytes())?,
        }
    }
}

/// Checks a `ProbeConnect` request; bad input is a 400.
fn validate_connect(req: &ProbeConnect) -> Result<SocketAddr, AgentError> {
    if req.bandwidth_ms > MAX_BANDWIDTH_MS {
        return Err(AgentError::BadRequest(format!(
            "bandwidth_ms {} is above {MAX_BANDWIDTH_MS}",
            req.bandwidth_ms
        )));
    }
    if req.token.is_empty() || req.token.len() > 100 || req.token.contains(['\n', '\r']) {
        return Err(AgentError::BadRequest(
            "token must be one non-empty line of at most 100 bytes".into(),
        ));
    }
    req.addr
        .parse()
        .map_err(|_| AgentError::BadRequest(format!("addr '{}' is not ip:port", req.addr)))
}

/// `POST /v1/probe/connect`: connects from this host's migration namespace.
pub(crate) async fn probe_connect(
    agent: &Arc<Agent>,
    req: ProbeConnect,
) -> Result<ProbeResult, AgentError> {
    let addr = validate_connect(&req)?;
    let ns = agent.config.netns.clone();
    tokio::task::spawn_blocking(move || {
        run_probe(
            ns.as_deref(),
            addr,
            &req.token,
            Duration::from_millis(req.bandwidth_ms),
        )
    })
    .await
    .map_err(|e| AgentError::Internal(format!("probe client panicked: {e}")))
}

/// The client side, bounded by [`PROBE_BUDGET`]. Never fails: what went wrong is in `error`.
pub(crate) fn run_probe(
    ns: Option<&str>,
    addr: SocketAddr,
    token: &str,
    bandwidth: Duration,
) -> ProbeResult {
    let start = Instant::now();
    let deadline = start + PROBE_BUDGET;
    let failed = |error: String| ProbeResult {
        connected: false,
        latency_ms: None,
        bandwidth_mbit_s: None,
        error: Some(error),
    };
    let stream = match in_netns(ns, move || {
        TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
    }) {
        Ok(s) => s,
        Err(e) => return failed(format!("cannot connect to {addr}: {e}")),
    };
    let latency = match handshake_and_ping(&stream, token, deadline) {
        Ok(l) => l,
        Err(e) => return failed(format!("probe listener {addr}: {e}")),
    };
    let mut result = ProbeResult {
        connected: true,
        latency_ms: Some(latency),
        bandwidth_mbit_s: None,
        error: None,
    };
    if !bandwidth.is_zero() {
        match push_bulk(&stream, bandwidth, deadline) {
            Ok(mbit) => result.bandwidth_mbit_s = Some(mbit),
            Err(e) => result.error = Some(format!("bandwidth measurement to {addr} failed: {e}")),
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    result
}

/// Sends the token, waits for `ok`, and returns the median of [`PINGS`] round trips in ms.
fn handshake_and_ping(stream: &TcpStream, token: &str, deadline: Instant) -> io::Result<f64> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(left(deadline)))?;
    stream.set_write_timeout(Some(left(deadline)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    writer.write_all(format!("{token}\n").as_bytes())?;
    match read_line(&mut reader) {
        Ok(Some(l)) if l == "ok" => {}
        Ok(_) | Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the listener refused the token (or is not a probe listener)",
            ))
        }
    }
    let mut rtts = Vec::with_capacity(PINGS);
    for _ in 0..PINGS {
        let t = Instant::now();
        writer.write_all(b"ping\n")?;
        match read_line(&mut reader)? {
            Some(l) if l == "ping" => rtts.push(t.elapsed().as_secs_f64() * 1000.0),
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected ping answer {other:?}"),
                ))
            }
        }
    }
    Ok(median(&mut rtts))
}

/// The median of `v` (mean of the middle two for an even count); 0 for none.
fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// Pushes data for `duration` (cut short to leave time for the answer before `deadline`) and
/// returns Mbit/s from the byte count the listener received.
fn push_bulk(stream: &TcpStream, duration: Duration, deadline: Instant) -> io::Result<f64> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    writer.write_all(b"bulk\n")?;
    let start = Instant::now();
    let stop = (start + duration).min(deadline - Duration::from_millis(300));
    let chunk = vec![0x5au8; CHUNK];
    while Instant::now() < stop {
        stream.set_write_timeout(Some(left(stop)))?;
        match writer.write(&chunk) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(e) => return Err(e),
        }
    }
    stream.shutdown(Shutdown::Write)?;
    stream.set_read_timeout(Some(left(deadline)))?;
    let answer = read_line(&mut reader)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no byte count"))?;
    let bytes: u64 = answer
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad count {answer:?}")))?;
    let secs = start.elapsed().as_secs_f64().max(1e-6);
    Ok(bytes as f64 * 8.0 / secs / 1e6)
}

/// QEMU feature names whose /proc/cpuinfo spelling is not just the QEMU name with `-` and `.`
/// turned into `_`.
const RENAMES: &[(&str, &str)] = &[
    ("ds", "dts"),
    ("tsc-deadline", "tsc_deadline_timer"),
    ("cr8legacy", "cr8_legacy"),
    ("spec-ctrl", "ibrs"),
    ("sse3", "pni"),
    ("xd", "nx"),
    ("i64", "lm"),
    ("pclmuldq", "pclmulqdq"),
];

/// Properties that are no requirement on the host CPU: `hypervisor` is synthesised by QEMU
/// for every guest, `svm`/`vmx*` are nested virtualisation (QEMU drops them when the host
/// lacks them), `kvm*` are KVM paravirtual features.
fn not_a_host_requirement(name: &str) -> bool {
    name == "hypervisor" || name == "svm" || name.starts_with("vmx") || name.starts_with("kvm")
}

/// The /proc/cpuinfo spelling of a QEMU feature name.
///
/// Rule: a few names differ outright ([`RENAMES`]: `ds` -> `dts`, `tsc-deadline` ->
/// `tsc_deadline_timer`, `cr8legacy` -> `cr8_legacy`, `spec-ctrl` -> `ibrs`, and the aliases
/// `sse3`/`xd`/`i64`/`pclmuldq`); every other name has `-` and `.` replaced by `_`
/// (`sse4.2` -> `sse4_2`, `lahf-lm` -> `lahf_lm`, `avx512-vnni` -> `avx512_vnni`). QEMU's
/// `pni` is already cpuinfo's name for SSE3.
pub fn cpuinfo_name(qemu: &str) -> String {
    if let Some((_, linux)) = RENAMES.iter().find(|(q, _)| *q == qemu) {
        return linux.to_string();
    }
    qemu.replace(['-', '.'], "_")
}

/// The required features of a static expansion: props that are `true`, in cpuinfo spelling,
/// without those that are no host requirement; sorted and deduplicated.
pub fn required_features(props: &Map<String, Value>) -> Vec<String> {
    let mut out: Vec<String> = props
        .iter()
        .filter(|(name, v)| v.as_bool() == Some(true) && !not_a_host_requirement(name))
        .map(|(name, _)| cpuinfo_name(name))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Whether a CPU model name is plausible (QEMU names use letters, digits, `-`, `.`, `_`).
fn valid_model_name(model: &str) -> bool {
    !model.is_empty()
        && model.len() <= 64
        && model
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// `GET /v1/cpu-models/{model}`: cached per model; the first request runs QEMU once.
pub(crate) async fn cpu_model_features(
    agent: &Arc<Agent>,
    model: &str,
) -> Result<CpuModelFeatures, AgentError> {
    if !valid_model_name(model) {
        return Err(AgentError::CpuModelUnknown(model.to_string()));
    }
    let cached = agent
        .cpu_models
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(model)
        .cloned();
    let features = match cached {
        Some(f) => f,
        None => {
            let f = expand_static(agent, model).await?;
            agent
                .cpu_models
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(model.to_string(), f.clone());
            f
        }
    };
    Ok(CpuModelFeatures {
        model: model.to_string(),
        features,
    })
}

/// Expands `models` in the background, so that the first migration's checks find them
/// known (an expansion runs a short-lived QEMU: about a tenth of a second, which a
/// migration's start would otherwise wait for). Failures only mean a later check expands.
pub(crate) fn warm_cpu_models(agent: &Arc<Agent>, models: Vec<String>) {
    let warm = agent.clone();
    agent.track(tokio::spawn(async move {
        for model in models {
            if let Err(e) = cpu_model_features(&warm, &model).await {
                debug!(model, error = %e, "CPU model not expanded ahead");
            }
        }
    }));
}

/// Runs a short-lived `-machine none` QEMU and asks it for the static expansion of `model`.
async fn expand_static(agent: &Agent, model: &str) -> Result<Vec<String>, AgentError> {
    let run = agent.config.state_dir.join("run");
    std::fs::create_dir_all(&run).map_err(AgentError::io(&run))?;
    let mut nonce = [0u8; 4];
    rand::thread_rng().fill_bytes(&mut nonce);
    let sock = run.join(format!("cpu-{}.qmp", hex::encode(nonce)));
    let mut child = tokio::process::Command::new(&agent.config.qemu_binary)
        .args(["-machine", "none", "-nodefaults", "-display", "none"])
        .args(["-accel", agent.facts.accel.name()])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            AgentError::Internal(format!(
                "cannot run {}: {e}",
                agent.config.qemu_binary.display()
            ))
        })?;
    let result = async {
        let qmp = Qmp::connect(&sock, QEMU_EXPANSION_TIMEOUT)
            .await?
            .with_timeout(QEMU_EXPANSION_TIMEOUT);
        let reply = qmp
            .execute(&QueryCpuModelExpansion::new(
                CpuModelExpansionType::Static,
                model,
            ))
            .await;
        let _ = qmp.quit().await;
        reply
    }
    .await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    let _ = std::fs::remove_file(&sock);
    match result {
        Ok(info) => Ok(required_features(&info.model.props.unwrap_or_default())),
        Err(e) if is_unknown_model(&e) => Err(AgentError::CpuModelUnknown(model.to_string())),
        Err(e) => Err(AgentError::Qmp(e)),
    }
}

/// QEMU's answer for a model it does not know: `GenericError` "CPU model 'x' not found".
fn is_unknown_model(e: &QmpError) -> bool {
    match e {
        QmpError::Command { class, desc, .. } => {
            class == "GenericError" && desc.contains("not found")
        }
        _ => false,
    }
}

/// Recorded expansions, for tests of the name mapping.
#[cfg(test)]
fn recorded(model: &str) -> Map<String, Value> {
    let path = format!(
        "{}/tests/recorded/cpu-model-expansion-static-{model}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["return"]["model"]["props"].as_object().unwrap().clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_names_map_to_cpuinfo_names() {
        assert_eq!(cpuinfo_name("sse4.2"), "sse4_2");
        assert_eq!(cpuinfo_name("sse4.1"), "sse4_1");
        assert_eq!(cpuinfo_name("lahf-lm"), "lahf_lm");
        assert_eq!(cpuinfo_name("pni"), "pni");
        assert_eq!(cpuinfo_name("sse3"), "pni");
        assert_eq!(cpuinfo_name("avx512-vnni"), "avx512_vnni");
        assert_eq!(cpuinfo_name("tsc-deadline"), "tsc_deadline_timer");
        assert_eq!(cpuinfo_name("ds"), "dts");
        assert_eq!(cpuinfo_name("avx2"), "avx2");
    }

    #[test]
    fn recorded_expansions_give_cpuinfo_features() {
        let q = required_features(&recorded("qemu64"));
        for f in ["sse2", "pni", "lahf_lm", "cx16", "lm", "nx", "syscall"] {
            assert!(q.contains(&f.to_string()), "{f} missing from {q:?}");
        }
        for f in ["hypervisor", "svm", "lahf-lm", "avx2"] {
            assert!(!q.contains(&f.to_string()), "{f} in {q:?}");
        }
        let w = required_features(&recorded("Westmere"));
        for f in ["sse4_1", "sse4_2", "ssse3", "aes", "pclmulqdq", "popcnt"] {
            assert!(w.contains(&f.to_string()), "{f} missing from {w:?}");
        }
        assert!(
            q.iter().all(|f| w.contains(f) || f == "svm"),
            "Westmere ⊇ qemu64"
        );
        // Every name is in cpuinfo spelling; this machine's flags (minus the hypervisor bit)
        // include all of Westmere's.
        assert!(w.iter().all(|f| !f.contains(['-', '.'])), "{w:?}");
        assert!(!q.contains(&"family".to_string()));
    }

    #[test]
    fn connect_requests_are_checked() {
        let req = |addr: &str, bw| ProbeConnect {
            addr: addr.into(),
            token: "t".into(),
            bandwidth_ms: bw,
        };
        assert!(validate_connect(&req("10.0.0.1:49152", 2000)).is_ok());
        for bad in [
            req("10.0.0.1:49152", 2001),
            req("10.0.0.1", 0),
            req("x:1", 0),
        ] {
            assert_eq!(
                validate_connect(&bad).unwrap_err().status().as_u16(),
                400,
                "{bad:?}"
            );
        }
        let mut no_token = req("10.0.0.1:1", 0);
        no_token.token.clear();
        assert!(validate_connect(&no_token).is_err());
    }

    /// A free range of `n` consecutive loopback ports (bound and released again).
    fn free_range(n: u16) -> (u16, u16) {
        for base in (20000..60000u16).step_by(97) {
            let held: Vec<TcpListener> = (base..base + n)
                .filter_map(|p| TcpListener::bind(("127.0.0.1", p)).ok())
                .collect();
            if held.len() == usize::from(n) {
                return (base, base + n - 1);
            }
        }
        panic!("no {n} free consecutive loopback ports");
    }

    /// A probe takes the top port of the range, never the last free one, and only one probe
    /// listener is open at a time: the migration range stays usable for QEMU, which binds from
    /// the bottom.
    #[test]
    fn probes_leave_the_migration_range_usable() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let (first, last) = free_range(3);
        let gate = Arc::new(ProbeGate::default());
        let (listener, slot) = open_probe_listener(&gate, None, ip, first, last).unwrap();
        assert_eq!(listener.local_addr().unwrap().port(), last, "from the top");
        // A second probe while the first listener is open is refused, not given a port.
        let busy = open_probe_listener(&gate, None, ip, first, last).unwrap_err();
        assert_eq!(busy.code(), PROBE_BUSY);
        assert_eq!(busy.status().as_u16(), 409);
        // The bottom of the range is still free for a migration.
        let migration = TcpListener::bind((ip, first)).expect("first port free");
        drop(slot);
        drop(listener);

        // With only one port free, a probe would take it: refused.
        let _taken = TcpListener::bind((ip, first + 1)).unwrap();
        let _taken2 = TcpListener::bind((ip, last)).unwrap();
        drop(migration);
        let err = open_probe_listener(&gate, None, ip, first, last).unwrap_err();
        assert_eq!(err.code(), PROBE_BUSY, "{err}");
        assert!(
            TcpListener::bind((ip, first)).is_ok(),
            "the last port stays free"
        );
        // And the gate was released by the refused attempt.
        assert!(gate.try_take().is_some());
    }

    /// The listener closes after the first connection with the right token, releasing the
    /// agent's probe slot.
    #[test]
    fn the_probe_listener_closes_after_one_probe() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Arc::new(ProbeGate::default());
        let slot = gate.try_take().unwrap();
        serve_probe(listener, "t".into(), Duration::from_secs(5), slot).unwrap();
        assert!(gate.try_take().is_none(), "held while open");
        let r = run_probe(None, addr, "t", Duration::ZERO);
        assert!(r.connected, "{r:?}");
        let deadline = Instant::now() + Duration::from_secs(2);
        while gate.0.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(gate.try_take().is_some(), "released after one probe");
        assert!(TcpListener::bind(addr).is_ok(), "port given back");
    }

    #[test]
    fn median_of_round_trips() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0, 5.0, 4.0]), 3.0);
        assert_eq!(median(&mut [1.0, 2.0]), 1.5);
        assert_eq!(median(&mut []), 0.0);
    }

    #[test]
    fn probe_over_loopback_measures_and_refuses_wrong_tokens() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Arc::new(ProbeGate::default());
        let slot = gate.try_take().unwrap();
        serve_probe(listener, "secret".into(), Duration::from_secs(5), slot).unwrap();
        let wrong = run_probe(None, addr, "guess", Duration::ZERO);
        assert!(!wrong.connected && wrong.error.is_some(), "{wrong:?}");
        let t = Instant::now();
        let r = run_probe(None, addr, "secret", Duration::from_millis(300));
        assert!(r.connected, "{r:?}");
        assert!(r.latency_ms.unwrap() > 0.0);
        assert!(r.bandwidth_mbit_s.unwrap() > 0.0, "{r:?}");
        assert!(t.elapsed() < PROBE_BUDGET + Duration::from_millis(500));
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let r = run_probe(None, closed_addr, "secret", Duration::ZERO);
        assert!(!r.connected && r.error.is_some(), "{r:?}");
    }
}
