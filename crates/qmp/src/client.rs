//! The QMP connection: one reader task, one writer task, replies matched by id.
//!
//! QMP is line-delimited JSON over a stream socket. Replies carry the `id` we put on each
//! command, and events can arrive at any time between them. A background reader routes
//! each line: events to a broadcast channel, replies to the oneshot channel of the waiting
//! command. Writes go through a writer task so that a caller giving up (timeout, dropped
//! future) can never leave half a command on the socket.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, trace, warn};

use crate::commands::{Command, QemuVersion, VersionInfo};
use crate::error::{excerpt, QmpError};
use crate::events::Event;

/// Default per-command timeout. Long enough for QEMU under load (TCG, a busy migration
/// thread), short enough that a wedged QEMU is noticed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How many events a slow subscriber may fall behind before it sees `Lagged`.
const EVENT_CAPACITY: usize = 1024;

/// How many ids of abandoned commands (timed out or dropped) we remember, so that their
/// late replies are ignored quietly instead of being reported as protocol errors.
const ABANDONED_MEMORY: usize = 256;

/// Pause between connection attempts while QEMU has not created its socket yet.
const CONNECT_RETRY: Duration = Duration::from_millis(50);

/// Even with an exhausted connect timeout, give QEMU this long to send its greeting once
/// the socket accepted us.
const MIN_GREETING_WAIT: Duration = Duration::from_secs(1);

/// An async QMP client.
///
/// Cheap to clone: clones share one connection, one reader and one writer task. Commands
/// from several clones may run concurrently; each is matched to its reply by id. When the
/// last clone is dropped, the background tasks end and the socket is closed.
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
    timeout: Duration,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("path", &self.inner.path)
            .field("version", &self.inner.version)
            .field("timeout", &self.timeout)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// State owned by the `Qmp` handles; dropping it stops the tasks.
struct Inner {
    shared: Arc<Shared>,
    events: broadcast::Sender<Event>,
    version: QemuVersion,
    capabilities: Vec<String>,
    /// Out-of-band execution was offered and enabled (see [`Qmp::execute_oob`]).
    oob: bool,
    path: PathBuf,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The reader would otherwise wait on the socket forever; aborting it drops the read
        // half, and the writer ends when its channel (in `shared`) is gone or on abort.
        self.reader.abort();
        self.writer.abort();
    }
}

/// State shared between the handles and the background tasks.
struct Shared {
    state: Mutex<State>,
    closed_tx: watch::Sender<bool>,
}

struct State {
    next_id: u64,
    pending: BTreeMap<u64, Pending>,
    abandoned: VecDeque<u64>,
    closed: bool,
    /// `None` once the connection is closed, which also lets the writer task finish.
    outgoing: Option<mpsc::UnboundedSender<Outgoing>>,
}

struct Pending {
    command: String,
    reply: oneshot::Sender<Result<Value, QmpError>>,
}

struct Outgoing {
    id: u64,
    line: Vec<u8>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map inconsistent in a way that
        // matters here; keep going rather than propagate the poison.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the connection closed and fails every waiting command with `Closed`.
    fn close(&self) {
        let pending = {
            let mut st = self.lock();
            st.closed = true;
            st.outgoing = None;
            std::mem::take(&mut st.pending)
        };
        for (_, p) in pending {
            let _ = p.reply.send(Err(QmpError::Closed));
        }
        self.closed_tx.send_replace(true);
    }

    /// Completes the command with this id, if it is still waiting.
    fn resolve(&self, id: u64, result: Result<Value, QmpError>) -> bool {
        let pending = self.lock().pending.remove(&id);
        match pending {
            Some(p) => {
                let _ = p.reply.send(result);
                true
            }
            None => false,
        }
    }

    /// Reports a message that cannot be attributed to a command. QEMU answers commands in
    /// the order it received them, so it is charged to the oldest waiting command; with none
    /// waiting it is only logged. Either way nobody hangs and nothing panics.
    fn protocol_error(&self, detail: String) {
        let oldest = self.lock().pending.pop_first();
        match oldest {
            Some((_, p)) => {
                warn!(command = %p.command, %detail, "QMP protocol error");
                let _ = p.reply.send(Err(QmpError::Protocol {
                    command: Some(p.command),
                    detail,
                }));
            }
            None => warn!(%detail, "QMP protocol error with no command waiting"),
        }
    }

    fn was_abandoned(&self, id: u64) -> bool {
        self.lock().abandoned.contains(&id)
    }
}

/// Removes a command from the pending map when its caller stops waiting (reply, timeout or
/// dropped future), remembering the id so a late reply is recognised.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if st.pending.remove(&self.id).is_some() {
            if st.abandoned.len() >= ABANDONED_MEMORY {
                st.abandoned.pop_front();
            }
            st.abandoned.push_back(self.id);
        }
    }
}

impl Qmp {
    /// Connects to a QMP unix socket, reads the greeting and sends `qmp_capabilities`.
    ///
    /// Retries while the socket does not exist yet or refuses connections (QEMU still
    /// starting) until `timeout`; other connect errors fail at once. The greeting must then
    /// arrive within what is left of `timeout` (at least one second): a QMP server socket
    /// serves one client at a time, so a missing greeting usually means another client is
    /// connected.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) => {
                    let retryable = matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    );
                    let now = Instant::now();
                    if !retryable || now >= deadline {
                        return Err(QmpError::Connect {
                            path: path.to_path_buf(),
                            source: e,
                        });
                    }
                    tokio::time::sleep(CONNECT_RETRY.min(deadline - now)).await;
                }
            }
        };
        let (read_half, write_half) = stream.into_split();
        let mut reader = BufReader::new(read_half);

        let greeting_wait = deadline
            .saturating_duration_since(Instant::now())
            .max(MIN_GREETING_WAIT);
        // QEMU 10 was seen to send an event (RESUME) ahead of the greeting to a client that
        // connected while the guest started; events before the greeting are skipped.
        let greeting_deadline = Instant::now() + greeting_wait;
        let mut line = Vec::new();
        for _ in 0..MAX_EVENTS_BEFORE_GREETING {
            line.clear();
            let wait = greeting_deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(wait, reader.read_until(b'\n', &mut line)).await {
                Err(_) => {
                    return Err(QmpError::Timeout {
                        command: "QMP greeting".into(),
                        after: greeting_wait,
                    })
                }
                Ok(Err(e)) => return Err(QmpError::Io(e)),
                Ok(Ok(0)) => return Err(QmpError::Closed),
                Ok(Ok(_)) => {}
            }
            if !is_event(&line) {
                break;
            }
            debug!(path = %path.display(), "event before the QMP greeting skipped");
        }
        let (version, capabilities) = parse_greeting(&line)?;
        debug!(path = %path.display(), %version, "QMP greeting");

        let (closed_tx, _) = watch::channel(false);
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_id: 1,
                pending: BTreeMap::new(),
                abandoned: VecDeque::new(),
                closed: false,
                outgoing: Some(out_tx),
            }),
            closed_tx,
        });
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let reader = tokio::spawn(read_loop(reader, shared.clone(), events.clone()));
        let writer = tokio::spawn(write_loop(write_half, out_rx, shared.clone()));
        let oob = capabilities.iter().any(|c| c == "oob");
        let qmp = Qmp {
            inner: Arc::new(Inner {
                shared,
                events,
                version,
                capabilities,
                oob,
                path: path.to_path_buf(),
                reader,
                writer,
            }),
            timeout: DEFAULT_TIMEOUT,
        };
        // Out-of-band commands are what still answers while QEMU's main thread is blocked,
        // e.g. a post-copy destination waiting for a page from a broken stream.
        let enable = oob.then(|| json!({"enable": ["oob"]}));
        qmp.send("qmp_capabilities", enable, false).await?;
        Ok(qmp)
    }

    /// Runs a command out of band (`exec-oob`), ahead of queued commands and without the main
    /// thread; only commands QEMU marks `allow-oob` (`migrate-recover`, `migrate-pause`, ...).
    /// Falls back to in-band execution when QEMU did not offer OOB.
    pub async fn execute_oob<C: Command>(&self, cmd: &C) -> Result<C::Output, QmpError> {
        let args = command_args::<C>(cmd)?;
        let ret = self.send(C::NAME, args, self.inner.oob).await?;
        decode_return::<C::Output>(C::NAME, ret)
    }

    /// Runs any command and returns its `return` value. `args`, when given, must be a
    /// JSON object; it is sent as `arguments`.
    ///
    /// Fails with [`QmpError::Command`] when QEMU rejects the command, [`QmpError::Timeout`]
    /// after the per-command timeout (see [`Qmp::with_timeout`]) and [`QmpError::Closed`]
    /// when QEMU goes away first.
    pub async fn execute_raw(&self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        self.send(command, args, false).await
    }

    async fn send(&self, command: &str, args: Option<Value>, oob: bool) -> Result<Value, QmpError> {
        let shared = &*self.inner.shared;
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut st = shared.lock();
            let Some(outgoing) = st.outgoing.clone() else {
                return Err(QmpError::Closed);
            };
            let id = st.next_id;
            st.next_id += 1;
            let mut msg = Map::new();
            let verb = if oob { "exec-oob" } else { "execute" };
            msg.insert(verb.into(), json!(command));
            match args {
                None => {}
                Some(Value::Object(a)) => {
                    msg.insert("arguments".into(), Value::Object(a));
                }
                Some(other) => {
                    return Err(QmpError::Protocol {
                        command: Some(command.to_string()),
                        detail: format!(
                            "arguments must be a JSON object, not {}",
                            excerpt(&other.to_string())
                        ),
                    })
                }
            }
            msg.insert("id".into(), json!(id));
            let mut line = Value::Object(msg).to_string().into_bytes();
            line.push(b'\n');
            st.pending.insert(
                id,
                Pending {
                    command: command.to_string(),
                    reply: tx,
                },
            );
            // Sent while holding the lock so that the socket order matches id order,
            // which `protocol_error` relies on.
            if outgoing.send(Outgoing { id, line }).is_err() {
                st.pending.remove(&id);
                return Err(QmpError::Closed);
            }
            id
        };
        let _guard = PendingGuard { shared, id };
        debug!(command, id, "QMP send");

        match tokio::time::timeout(self.timeout, rx).await {
            Err(_) => Err(QmpError::Timeout {
                command: command.to_string(),
                after: self.timeout,
            }),
            // The sender vanished without an answer: only happens when shutting down.
            Ok(Err(_)) => Err(QmpError::Closed),
            Ok(Ok(result)) => result,
        }
    }

    /// Runs a typed command and decodes its reply into `C::Output`.
    pub async fn execute<C: Command>(&self, cmd: &C) -> Result<C::Output, QmpError> {
        let args = command_args::<C>(cmd)?;
        let ret = self.execute_raw(C::NAME, args).await?;
        decode_return::<C::Output>(C::NAME, ret)
    }

    /// Sends `quit`. QEMU may close the socket before its reply gets out, so a `Closed`
    /// connection counts as success here.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute(&crate::commands::Quit).await {
            Ok(()) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Subscribes to asynchronous events. Only events received after this call are seen;
    /// a subscriber that falls more than 1024 events behind gets `RecvError::Lagged`.
    /// The channel closes when the last `Qmp` clone is dropped.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// QEMU's version from the greeting (no round trip).
    pub fn version(&self) -> &QemuVersion {
        &self.inner.version
    }

    /// The capabilities QEMU offered in its greeting (e.g. `oob`, which is enabled).
    pub fn capabilities(&self) -> &[String] {
        &self.inner.capabilities
    }

    /// The socket path this client connected to, for log messages.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Returns this handle with another per-command timeout (default 10 s). Other clones
    /// keep theirs, so one slow command (e.g. a long `query-cpu-model-expansion`) can get
    /// more time without changing the rest.
    pub fn with_timeout(self, d: Duration) -> Self {
        Qmp { timeout: d, ..self }
    }

    /// The per-command timeout of this handle.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// True once the connection is gone; every command would fail with `Closed`.
    pub fn is_closed(&self) -> bool {
        *self.inner.shared.closed_tx.borrow()
    }

    /// Resolves when the connection closes (QEMU exited or closed the monitor), so a
    /// supervisor can notice a dead QEMU without polling.
    pub async fn closed(&self) {
        let mut rx = self.inner.shared.closed_tx.subscribe();
        // `wait_for` only fails if the sender is dropped, which `self` prevents.
        let _ = rx.wait_for(|closed| *closed).await;
    }
}

/// Parses `{"QMP": {"version": {...}, "capabilities": [...]}}`.
/// A typed command's `arguments`: `None` for commands without any.
fn command_args<C: Command>(cmd: &C) -> Result<Option<Value>, QmpError> {
    let args = serde_json::to_value(cmd).map_err(|e| QmpError::Protocol {
        command: Some(C::NAME.to_string()),
        detail: format!("cannot serialize arguments: {e}"),
    })?;
    Ok(match args {
        Value::Null => None,
        Value::Object(m) if m.is_empty() => None,
        other => Some(other),
    })
}

/// Events QEMU may send before its greeting that are skipped.
const MAX_EVENTS_BEFORE_GREETING: usize = 16;

fn is_event(line: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(line)
        .map(|v| v.get("event").is_some())
        .unwrap_or(false)
}

fn parse_greeting(line: &[u8]) -> Result<(QemuVersion, Vec<String>), QmpError> {
    #[derive(Deserialize)]
    struct Greeting {
        #[serde(rename = "QMP")]
        qmp: GreetingBody,
    }
    #[derive(Deserialize)]
    struct GreetingBody {
        version: VersionInfo,
        #[serde(default)]
        capabilities: Vec<String>,
    }
    let text = String::from_utf8_lossy(line);
    let g: Greeting = serde_json::from_str(text.trim()).map_err(|e| QmpError::Protocol {
        command: Some("QMP greeting".into()),
        detail: format!("not a QMP greeting ({e}): {}", excerpt(text.trim())),
    })?;
    Ok((g.qmp.version.into(), g.qmp.capabilities))
}

/// Decodes a `return` value into the command's output type. QEMU answers commands without
/// a result with `{}`, which `()` (and other unit-like outputs) accept as well.
fn decode_return<T: serde::de::DeserializeOwned>(command: &str, ret: Value) -> Result<T, QmpError> {
    match T::deserialize(&ret) {
        Ok(v) => Ok(v),
        Err(e) => {
            if ret.as_object().is_some_and(Map::is_empty) {
                if let Ok(v) = T::deserialize(Value::Null) {
                    return Ok(v);
                }
            }
            Err(QmpError::Decode {
                command: command.to_string(),
                detail: format!("{e}; reply was {}", excerpt(&ret.to_string())),
            })
        }
    }
}

async fn write_loop(
    mut socket: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
) {
    while let Some(Outgoing { id, line }) = rx.recv().await {
        trace!(line = %String::from_utf8_lossy(&line).trim_end(), "QMP >");
        if let Err(e) = socket.write_all(&line).await {
            use std::io::ErrorKind::*;
            let gone = matches!(e.kind(), BrokenPipe | ConnectionReset | NotConnected);
            warn!(id, error = %e, "QMP write failed");
            let err = if gone {
                QmpError::Closed
            } else {
                QmpError::Io(e)
            };
            shared.resolve(id, Err(err));
            // The stream may now hold half a command: nothing after it can be trusted.
            shared.close();
            return;
        }
    }
}

async fn read_loop(
    mut socket: BufReader<OwnedReadHalf>,
    shared: Arc<Shared>,
    events: broadcast::Sender<Event>,
) {
    let mut line = Vec::new();
    loop {
        line.clear();
        match socket.read_until(b'\n', &mut line).await {
            Ok(0) => {
                debug!("QMP socket closed by QEMU");
                break;
            }
            Ok(_) => handle_line(&line, &shared, &events),
            // QEMU exiting (quit, kill) resets the socket: that is a close, not a fault.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                debug!("QMP socket reset by QEMU");
                break;
            }
            Err(e) => {
                warn!(error = %e, "QMP read failed");
                break;
            }
        }
    }
    shared.close();
}

/// Routes one received line: event, reply, or protocol error.
fn handle_line(line: &[u8], shared: &Shared, events: &broadcast::Sender<Event>) {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    if text.is_empty() {
        return;
    }
    trace!(line = text, "QMP <");
    let msg = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return shared.protocol_error(format!("expected a JSON object: {}", excerpt(text)))
        }
        Err(e) => return shared.protocol_error(format!("not JSON ({e}): {}", excerpt(text))),
    };
    if msg.contains_key("event") {
        match Event::from_json(&msg) {
            Some(ev) => {
                debug!(event = %ev.name, "QMP event");
                // No subscribers is fine: nobody asked for events.
                let _ = events.send(ev);
            }
            None => warn!(line = %excerpt(text), "ignoring malformed QMP event"),
        }
        return;
    }
    if !(msg.contains_key("return") || msg.contains_key("error")) {
        return shared.protocol_error(format!("unexpected message: {}", excerpt(text)));
    }
    let Some(id) = msg.get("id").and_then(Value::as_u64) else {
        return shared.protocol_error(format!("reply without a valid id: {}", excerpt(text)));
    };
    let result = reply_result(shared, id, msg, text);
    if !shared.resolve(id, result) {
        if shared.was_abandoned(id) {
            debug!(id, "dropping late reply to an abandoned command");
        } else {
            shared.protocol_error(format!("reply for unknown id {id}: {}", excerpt(text)));
        }
    }
}

/// Turns a reply object into the command's result.
fn reply_result(
    shared: &Shared,
    id: u64,
    mut msg: Map<String, Value>,
    text: &str,
) -> Result<Value, QmpError> {
    let command = || {
        shared
            .lock()
            .pending
            .get(&id)
            .map_or_else(|| format!("command #{id}"), |p| p.command.clone())
    };
    if let Some(ret) = msg.remove("return") {
        return Ok(ret);
    }
    let err = msg.get("error");
    let class = err.and_then(|e| e.get("class")).and_then(Value::as_str);
    let desc = err.and_then(|e| e.get("desc")).and_then(Value::as_str);
    match (class, desc) {
        (Some(class), Some(desc)) => Err(QmpError::Command {
            command: command(),
            class: class.to_string(),
            desc: desc.to_string(),
        }),
        _ => Err(QmpError::Protocol {
            command: Some(command()),
            detail: format!("malformed error reply: {}", excerpt(text)),
        }),
    }
}
