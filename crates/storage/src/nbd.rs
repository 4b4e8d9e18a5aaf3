//! A minimal NBD client: enough to read an export whole, and to learn which ranges read as
//! zeros without reading them.
//!
//! Ferry reads images through `qemu-nbd` rather than parsing qcow2 itself, so that what it
//! hashes is exactly what a guest would read, whatever the format and allocation. Only the
//! parts of the protocol (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>)
//! that need are implemented: the fixed newstyle handshake, `NBD_OPT_GO` (falling back to
//! `NBD_OPT_EXPORT_NAME` for old servers), structured replies and the `base:allocation`
//! metadata context when the server offers them, and `NBD_CMD_READ`, `NBD_CMD_BLOCK_STATUS`
//! and `NBD_CMD_DISC` in transmission, one request at a time. Every exchange has a time limit;
//! after a timeout or a protocol violation the connection is considered broken and refuses
//! further requests, since its replies can no longer be matched to requests.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_BIT: u32 = 1 << 31;
const REP_ERR_UNSUP: u32 = REP_ERR_BIT + 1;
const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT + 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TRANSMISSION_READ_ONLY: u16 = 1 << 1;

const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;
const CMD_BLOCK_STATUS: u16 = 7;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;

const STATE_HOLE: u32 = 1;
const STATE_ZERO: u32 = 2;

/// The largest option reply this client accepts: real ones are a few dozen bytes, so a larger
/// length is a confused or hostile server, not a reason to allocate.
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// The largest read this client asks for; NBD servers accept at least 32 MiB, QEMU's announce
/// their own limit, and a smaller request keeps memory per connection bounded.
pub const MAX_READ: u32 = 4 << 20;
const BLOCK_STATUS_CONTEXT: &str = "base:allocation";

/// What talking NBD can fail with. Codes are stable (`nbd-*`).
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The connection could not be made or broke.
    #[error("NBD connection: {0}")]
    Io(#[from] std::io::Error),
    /// A step took longer than the client's time limit.
    #[error("NBD server did not answer {what} within {} ms", .limit.as_millis())]
    Timeout { what: &'static str, limit: Duration },
    /// The server said something this client does not understand or that breaks the protocol.
    #[error("NBD protocol: {0}")]
    Protocol(String),
    /// The server does not have the export we asked for.
    #[error("NBD server has no export named {0:?}")]
    ExportNotFound(String),
    /// The server refused a request with an errno.
    #[error("NBD server failed {what}: error {errno}{}", if .message.is_empty() { String::new() } else { format!(" ({})", .message) })]
    Server {
        what: &'static str,
        errno: u32,
        message: String,
    },
    /// An earlier timeout or protocol error left the connection unusable.
    #[error("NBD connection is broken by an earlier error")]
    Broken,
    /// A request outside the export or larger than the client allows.
    #[error("invalid NBD request: {0}")]
    InvalidRequest(String),
}

impl NbdError {
    /// A stable, kebab-case identifier of the error kind.
    pub fn code(&self) -> &'static str {
        match self {
            NbdError::Io(_) => "nbd-io",
            NbdError::Timeout { .. } => "nbd-timeout",
            NbdError::Protocol(_) => "nbd-protocol",
            NbdError::ExportNotFound(_) => "nbd-export-not-found",
            NbdError::Server { .. } => "nbd-server-error",
            NbdError::Broken => "nbd-broken",
            NbdError::InvalidRequest(_) => "nbd-invalid-request",
        }
    }

    /// What to do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            NbdError::Io(_) | NbdError::Timeout { .. } | NbdError::Broken => {
                "check that the NBD server (qemu-nbd) still runs and is reachable"
            }
            NbdError::Protocol(_) => "the server is not an NBD server this client understands",
            NbdError::ExportNotFound(_) => "check the export name the server was started with",
            NbdError::Server { .. } => {
                "the server's log says why it refused (I/O error on the image?)"
            }
            NbdError::InvalidRequest(_) => "a bug in the caller: the request is outside the export",
        }
    }
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The export to open ("" is the default export).
    pub export: String,
    /// Limit of every exchange: the handshake and each request.
    pub timeout: Duration,
    /// Negotiate structured replies and `base:allocation`, so that
    /// [`NbdClient::block_status`] can tell zero ranges.
    pub block_status: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            export: String::new(),
            timeout: Duration::from_secs(30),
            block_status: true,
        }
    }
}

/// A run of bytes with the same allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// Not allocated in the image (reads come from a backing file or are zeros).
    pub hole: bool,
    /// Reads as zeros.
    pub zero: bool,
}

/// An open NBD export, in transmission phase.
#[derive(Debug)]
pub struct NbdClient<S> {
    stream: S,
    size: u64,
    transmission_flags: u16,
    structured: bool,
    /// The id of `base:allocation`, when the server agreed to it.
    allocation_context: Option<u32>,
    max_read: u32,
    next_cookie: u64,
    timeout: Duration,
    broken: bool,
}

impl NbdClient<UnixStream> {
    /// Connects to a server listening on a unix socket.
    pub async fn connect_unix(
        path: &Path,
        opts: &ConnectOptions,
    ) -> Result<NbdClient<UnixStream>, NbdError> {
        let stream = within(opts.timeout, "the connection", async {
            Ok(UnixStream::connect(path).await?)
        })
        .await?;
        NbdClient::handshake(stream, opts).await
    }
}

impl NbdClient<TcpStream> {
    /// Connects to a server listening on TCP.
    pub async fn connect_tcp(
        addr: SocketAddr,
        opts: &ConnectOptions,
    ) -> Result<NbdClient<TcpStream>, NbdError> {
        let stream = within(opts.timeout, "the connection", async {
            Ok(TcpStream::connect(addr).await?)
        })
        .await?;
        stream.set_nodelay(true)?;
        NbdClient::handshake(stream, opts).await
    }
}

async fn within<T>(
    limit: Duration,
    what: &'static str,
    f: impl std::future::Future<Output = Result<T, NbdError>>,
) -> Result<T, NbdError> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| NbdError::Timeout { what, limit })?
}

/// What the handshake learned, before transmission starts.
struct Negotiated {
    size: u64,
    flags: u16,
    structured: bool,
    allocation_context: Option<u32>,
    max_read: u32,
}

impl<S: AsyncRead + AsyncWrite + Unpin> NbdClient<S> {
    /// Runs the fixed newstyle handshake on an open stream and opens `opts.export`.
    pub async fn handshake(mut stream: S, opts: &ConnectOptions) -> Result<Self, NbdError> {
        let negotiated =
            within(opts.timeout, "the handshake", negotiate(&mut stream, opts)).await?;
        Ok(NbdClient {
            stream,
            size: negotiated.size,
            transmission_flags: negotiated.flags,
            structured: negotiated.structured,
            allocation_context: negotiated.allocation_context,
            max_read: negotiated.max_read,
            next_cookie: 1,
            timeout: opts.timeout,
            broken: false,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The server exports read-only.
    pub fn read_only(&self) -> bool {
        self.transmission_flags & TRANSMISSION_READ_ONLY != 0
    }

    /// Whether [`NbdClient::block_status`] is available.
    pub fn has_block_status(&self) -> bool {
        self.allocation_context.is_some()
    }

    /// The largest read this connection allows.
    pub fn max_read(&self) -> u32 {
        self.max_read
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        if self.broken {
            return Err(NbdError::Broken);
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(NbdError::InvalidRequest(format!(
                "{len} bytes at {offset} reach past the export's {} bytes",
                self.size
            ))),
        }
    }

    /// Reads `buf.len()` bytes at `offset` (at most [`NbdClient::max_read`]).
    pub async fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let len = u32::try_from(buf.len())
            .ok()
            .filter(|l| *l <= self.max_read)
            .ok_or_else(|| {
                NbdError::InvalidRequest(format!(
                    "a read of {} bytes is larger than {}",
                    buf.len(),
                    self.max_read
                ))
            })?;
        self.check_range(offset, u64::from(len))?;
        if len == 0 {
            return Ok(());
        }
        let limit = self.timeout;
        let result = tokio::time::timeout(limit, self.read_inner(offset, buf)).await;
        self.settle(result, "a read")
    }

    /// The allocation state of the range at `offset`, from its start: the server may answer
    /// for less than `len` bytes (never zero bytes), and the extents cover at most `len`.
    pub async fn block_status(&mut self, offset: u64, len: u32) -> Result<Vec<Extent>, NbdError> {
        let Some(context) = self.allocation_context else {
            return Err(NbdError::InvalidRequest(
                "the server offered no base:allocation context".into(),
            ));
        };
        self.check_range(offset, u64::from(len))?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let limit = self.timeout;
        let result =
            tokio::time::timeout(limit, self.block_status_inner(offset, len, context)).await;
        let mut extents = self.settle(result, "a block status request")?;
        // Clip to what was asked: servers may describe a little beyond.
        let mut left = u64::from(len);
        extents.retain_mut(|e| {
            if left == 0 {
                return false;
            }
            e.length = e.length.min(left);
            left -= e.length;
            true
        });
        if extents.is_empty() {
            self.broken = true;
            return Err(NbdError::Protocol("block status described no bytes".into()));
        }
        Ok(extents)
    }

    /// Ends the session politely (`NBD_CMD_DISC`) and closes the connection.
    pub async fn disconnect(mut self) -> Result<(), NbdError> {
        if self.broken {
            return Ok(());
        }
        let cookie = self.cookie();
        let limit = self.timeout;
        within(limit, "the disconnect", async {
            write_request(&mut self.stream, CMD_DISC, 0, cookie, 0, 0).await?;
            self.stream.shutdown().await?;
            Ok(())
        })
        .await
    }

    fn cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        c
    }

    /// A request's outcome: a timeout or a protocol error breaks the connection.
    fn settle<T>(
        &mut self,
        result: Result<Result<T, NbdError>, tokio::time::error::Elapsed>,
        what: &'static str,
    ) -> Result<T, NbdError> {
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if !matches!(e, NbdError::Server { .. }) {
                    self.broken = true;
                }
                Err(e)
            }
            Err(_) => {
                self.broken = true;
                Err(NbdError::Timeout {
                    what,
                    limit: self.timeout,
                })
            }
        }
    }

    async fn read_inner(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let cookie = self.cookie();
        let len = buf.len() as u32;
        write_request(&mut self.stream, CMD_READ, 0, cookie, offset, len).await?;
        let magic = self.stream.read_u32().await?;
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let errno = self.stream.read_u32().await?;
                expect_cookie(cookie, self.stream.read_u64().await?)?;
                if errno != 0 {
                    return Err(NbdError::Server {
                        what: "a read",
                        errno,
                        message: String::new(),
                    });
                }
                self.stream.read_exact(buf).await?;
                Ok(())
            }
            STRUCTURED_REPLY_MAGIC if self.structured => {
                self.read_chunks(cookie, offset, buf, magic).await
            }
            other => Err(NbdError::Protocol(format!(
                "reply magic {other:#x} to a read"
            ))),
        }
    }

    /// The chunks of a structured read reply, until the one flagged done.
    async fn read_chunks(
        &mut self,
        cookie: u64,
        offset: u64,
        buf: &mut [u8],
        first_magic: u32,
    ) -> Result<(), NbdError> {
        let mut magic = first_magic;
        let mut covered: u64 = 0;
        let mut failure = None;
        loop {
            if magic != STRUCTURED_REPLY_MAGIC {
                return Err(NbdError::Protocol(format!(
                    "reply magic {magic:#x} inside a structured reply"
                )));
            }
            let flags = self.stream.read_u16().await?;
            let kind = self.stream.read_u16().await?;
            expect_cookie(cookie, self.stream.read_u64().await?)?;
            let length = self.stream.read_u32().await?;
            match kind {
                REPLY_TYPE_NONE => {
                    if length != 0 {
                        return Err(NbdError::Protocol("NONE chunk with a payload".into()));
                    }
                }
                REPLY_TYPE_OFFSET_DATA => {
                    if length < 8 {
                        return Err(NbdError::Protocol("short OFFSET_DATA chunk".into()));
                    }
                    let at = self.stream.read_u64().await?;
                    let n = u64::from(length - 8);
                    let start = chunk_start(offset, at, n, buf.len())?;
                    self.stream
                        .read_exact(&mut buf[start..start + n as usize])
                        .await?;
                    covered += n;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    if length != 12 {
                        return Err(NbdError::Protocol("OFFSET_HOLE chunk of wrong size".into()));
                    }
                    let at = self.stream.read_u64().await?;
                    let n = u64::from(self.stream.read_u32().await?);
                    let start = chunk_start(offset, at, n, buf.len())?;
                    buf[start..start + n as usize].fill(0);
                    covered += n;
                }
                k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                    failure = Some(self.error_chunk(length, "a read").await?);
                }
                other => {
                    // Unknown non-error chunk types must be skipped.
                    self.skip(length, other).await?;
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
            magic = self.stream.read_u32().await?;
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if covered != buf.len() as u64 {
            return Err(NbdError::Protocol(format!(
                "a read of {} bytes was answered with {covered}",
                buf.len()
            )));
        }
        Ok(())
    }

    async fn block_status_inner(
        &mut self,
        offset: u64,
        len: u32,
        context: u32,
    ) -> Result<Vec<Extent>, NbdError> {
        let cookie = self.cookie();
        write_request(&mut self.stream, CMD_BLOCK_STATUS, 0, cookie, offset, len).await?;
        let mut extents = Vec::new();
        let mut failure = None;
        loop {
            let magic = self.stream.read_u32().await?;
            if magic == SIMPLE_REPLY_MAGIC {
                // Only errors may come as simple replies to a block status request.
                let errno = self.stream.read_u32().await?;
                expect_cookie(cookie, self.stream.read_u64().await?)?;
                return Err(NbdError::Server {
                    what: "a block status request",
                    errno,
                    message: String::new(),
                });
            }
            if magic != STRUCTURED_REPLY_MAGIC {
                return Err(NbdError::Protocol(format!(
                    "reply magic {magic:#x} to a block status request"
                )));
            }
            let flags = self.stream.read_u16().await?;
            let kind = self.stream.read_u16().await?;
            expect_cookie(cookie, self.stream.read_u64().await?)?;
            let length = self.stream.read_u32().await?;
            match kind {
                REPLY_TYPE_NONE => {}
                REPLY_TYPE_BLOCK_STATUS => {
                    if length < 4 || (length - 4) % 8 != 0 || length > MAX_OPTION_REPLY * 16 {
                        return Err(NbdError::Protocol(format!(
                            "BLOCK_STATUS chunk of {length} bytes"
                        )));
                    }
                    let wanted = self.stream.read_u32().await? == context;
                    for _ in 0..(length - 4) / 8 {
                        let n = self.stream.read_u32().await?;
                        let state = self.stream.read_u32().await?;
                        if n == 0 {
                            return Err(NbdError::Protocol("zero-length extent".into()));
                        }
                        if wanted {
                            extents.push(Extent {
                                length: u64::from(n),
                                hole: state & STATE_HOLE != 0,
                                zero: state & STATE_ZERO != 0,
                            });
                        }
                    }
                }
                k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                    failure = Some(self.error_chunk(length, "a block status request").await?);
                }
                other => self.skip(length, other).await?,
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(extents),
        }
    }

    /// An error chunk's errno and message (the offset of `ERROR_OFFSET` is skipped).
    async fn error_chunk(&mut self, length: u32, what: &'static str) -> Result<NbdError, NbdError> {
        if !(6..=MAX_OPTION_REPLY).contains(&length) {
            return Err(NbdError::Protocol(format!("error chunk of {length} bytes")));
        }
        let mut payload = vec![0u8; length as usize];
        self.stream.read_exact(&mut payload).await?;
        let errno = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
        let msg_len = usize::from(u16::from_be_bytes([payload[4], payload[5]]));
        let message = payload
            .get(6..6 + msg_len)
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .unwrap_or_default();
        Ok(NbdError::Server {
            what,
            errno,
            message,
        })
    }

    async fn skip(&mut self, length: u32, kind: u16) -> Result<(), NbdError> {
        if length > MAX_OPTION_REPLY {
            return Err(NbdError::Protocol(format!(
                "unknown chunk type {kind} of {length} bytes"
            )));
        }
        let mut sink = vec![0u8; length as usize];
        self.stream.read_exact(&mut sink).await?;
        Ok(())
    }
}

fn expect_cookie(sent: u64, got: u64) -> Result<(), NbdError> {
    if sent == got {
        Ok(())
    } else {
        Err(NbdError::Protocol(format!(
            "reply for request {got} while waiting for {sent}"
        )))
    }
}

/// Where a chunk of `n` bytes at export offset `at` lands in a read buffer for `offset`.
fn chunk_start(offset: u64, at: u64, n: u64, buf_len: usize) -> Result<usize, NbdError> {
    let start = at
        .checked_sub(offset)
        .filter(|s| s.checked_add(n).is_some_and(|end| end <= buf_len as u64))
        .ok_or_else(|| {
            NbdError::Protocol(format!(
                "a chunk of {n} bytes at {at} lies outside the read at {offset}"
            ))
        })?;
    Ok(start as usize)
}

async fn write_request<S: AsyncWrite + Unpin>(
    stream: &mut S,
    kind: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    len: u32,
) -> Result<(), NbdError> {
    let mut req = Vec::with_capacity(28);
    req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    req.extend_from_slice(&flags.to_be_bytes());
    req.extend_from_slice(&kind.to_be_bytes());
    req.extend_from_slice(&cookie.to_be_bytes());
    req.extend_from_slice(&offset.to_be_bytes());
    req.extend_from_slice(&len.to_be_bytes());
    stream.write_all(&req).await?;
    stream.flush().await?;
    Ok(())
}

async fn send_option<S: AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    let len = u32::try_from(data.len())
        .map_err(|_| NbdError::InvalidRequest("option data too long".into()))?;
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(data);
    stream.write_all(&msg).await?;
    stream.flush().await?;
    Ok(())
}

/// One option reply: its type and payload.
async fn option_reply<S: AsyncRead + Unpin>(
    stream: &mut S,
    option: u32,
) -> Result<(u32, Vec<u8>), NbdError> {
    let magic = stream.read_u64().await?;
    if magic != OPT_REPLY_MAGIC {
        return Err(NbdError::Protocol(format!("option reply magic {magic:#x}")));
    }
    let answered = stream.read_u32().await?;
    if answered != option {
        return Err(NbdError::Protocol(format!(
            "reply to option {answered} while waiting for {option}"
        )));
    }
    let kind = stream.read_u32().await?;
    let len = stream.read_u32().await?;
    if len > MAX_OPTION_REPLY {
        return Err(NbdError::Protocol(format!("option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    stream.read_exact(&mut data).await?;
    Ok((kind, data))
}

fn reply_error(kind: u32, data: &[u8], what: &str) -> NbdError {
    let message = String::from_utf8_lossy(data).into_owned();
    NbdError::Protocol(format!(
        "the server refused {what} (reply {:#x}){}",
        kind,
        if message.is_empty() {
            String::new()
        } else {
            format!(": {message}")
        }
    ))
}

/// The whole handshake: greeting, optional structured replies and metadata context, then
/// `GO` (or `EXPORT_NAME` when the server does not know `GO`).
async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    opts: &ConnectOptions,
) -> Result<Negotiated, NbdError> {
    let magic = stream.read_u64().await?;
    if magic != NBDMAGIC {
        return Err(NbdError::Protocol(format!("greeting magic {magic:#x}")));
    }
    let style = stream.read_u64().await?;
    if style == OLDSTYLE_MAGIC {
        return Err(NbdError::Protocol(
            "the server speaks the oldstyle handshake only".into(),
        ));
    }
    if style != IHAVEOPT {
        return Err(NbdError::Protocol(format!("handshake magic {style:#x}")));
    }
    let server_flags = stream.read_u16().await?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Protocol(
            "the server does not offer the fixed newstyle handshake".into(),
        ));
    }
    let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE)
        | if no_zeroes {
            u32::from(FLAG_NO_ZEROES)
        } else {
            0
        };
    stream.write_all(&client_flags.to_be_bytes()).await?;

    let export = opts.export.as_bytes();
    let export_len = u32::try_from(export.len())
        .ok()
        .filter(|l| *l <= 4096)
        .ok_or_else(|| NbdError::InvalidRequest("export name longer than 4096 bytes".into()))?;

    let mut structured = false;
    let mut allocation_context = None;
    if opts.block_status {
        send_option(stream, OPT_STRUCTURED_REPLY, &[]).await?;
        let (kind, _) = option_reply(stream, OPT_STRUCTURED_REPLY).await?;
        structured = kind == REP_ACK;
        if structured {
            let mut data = Vec::new();
            data.extend_from_slice(&export_len.to_be_bytes());
            data.extend_from_slice(export);
            data.extend_from_slice(&1u32.to_be_bytes());
            data.extend_from_slice(&(BLOCK_STATUS_CONTEXT.len() as u32).to_be_bytes());
            data.extend_from_slice(BLOCK_STATUS_CONTEXT.as_bytes());
            send_option(stream, OPT_SET_META_CONTEXT, &data).await?;
            loop {
                let (kind, data) = option_reply(stream, OPT_SET_META_CONTEXT).await?;
                match kind {
                    REP_META_CONTEXT if data.len() >= 4 => {
                        let id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                        if &data[4..] == BLOCK_STATUS_CONTEXT.as_bytes() {
                            allocation_context = Some(id);
                        }
                    }
                    REP_ACK => break,
                    REP_ERR_UNKNOWN => return Err(NbdError::ExportNotFound(opts.export.clone())),
                    // Any other error: no block status, reads still work.
                    k if k & REP_ERR_BIT != 0 => break,
                    other => {
                        return Err(NbdError::Protocol(format!(
                            "reply {other} to SET_META_CONTEXT"
                        )))
                    }
                }
            }
        }
    }

    // GO, asking for the block size limits too.
    let mut data = Vec::new();
    data.extend_from_slice(&export_len.to_be_bytes());
    data.extend_from_slice(export);
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(stream, OPT_GO, &data).await?;
    let mut size = None;
    let mut flags = 0;
    let mut max_read = MAX_READ;
    loop {
        let (kind, data) = option_reply(stream, OPT_GO).await?;
        match kind {
            REP_INFO if data.len() >= 2 => {
                let info = u16::from_be_bytes([data[0], data[1]]);
                if info == INFO_EXPORT && data.len() == 12 {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap_or([0; 8])));
                    flags = u16::from_be_bytes([data[10], data[11]]);
                } else if info == INFO_BLOCK_SIZE && data.len() == 14 {
                    let max = u32::from_be_bytes(data[10..14].try_into().unwrap_or([0; 4]));
                    if max > 0 {
                        max_read = max_read.min(max);
                    }
                }
            }
            REP_INFO => {}
            REP_ACK => break,
            REP_ERR_UNSUP => {
                // A server without GO: the old way, which cannot report a missing export
                // other than by closing the connection.
                send_option(stream, OPT_EXPORT_NAME, export).await?;
                let size = stream.read_u64().await.map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        NbdError::ExportNotFound(opts.export.clone())
                    } else {
                        NbdError::Io(e)
                    }
                })?;
                let flags = stream.read_u16().await?;
                if !no_zeroes {
                    let mut zeroes = [0u8; 124];
                    stream.read_exact(&mut zeroes).await?;
                }
                return Ok(Negotiated {
                    size,
                    flags,
                    // Structured replies were negotiated before, but the metadata context
                    // was tied to GO semantics; reads only.
                    structured,
                    allocation_context: None,
                    max_read,
                });
            }
            REP_ERR_UNKNOWN => return Err(NbdError::ExportNotFound(opts.export.clone())),
            k if k & REP_ERR_BIT != 0 => return Err(reply_error(k, &data, "GO")),
            other => return Err(NbdError::Protocol(format!("reply {other} to GO"))),
        }
    }
    let size =
        size.ok_or_else(|| NbdError::Protocol("GO succeeded without the export size".into()))?;
    Ok(Negotiated {
        size,
        flags,
        structured,
        allocation_context,
        max_read,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_must_lie_inside_the_read() {
        assert_eq!(chunk_start(4096, 4096, 512, 1024).unwrap(), 0);
        assert_eq!(chunk_start(4096, 4608, 512, 1024).unwrap(), 512);
        assert!(chunk_start(4096, 4608, 513, 1024).is_err());
        assert!(chunk_start(4096, 0, 1, 1024).is_err());
        assert!(chunk_start(u64::MAX - 1, u64::MAX - 1, u64::MAX, 10).is_err());
    }

    #[test]
    fn errors_have_codes_and_hints() {
        let errors = [
            NbdError::Io(std::io::Error::other("x")),
            NbdError::Timeout {
                what: "a read",
                limit: Duration::from_secs(1),
            },
            NbdError::Protocol("x".into()),
            NbdError::ExportNotFound("e".into()),
            NbdError::Server {
                what: "a read",
                errno: 5,
                message: "EIO".into(),
            },
            NbdError::Broken,
            NbdError::InvalidRequest("x".into()),
        ];
        for e in errors {
            assert!(e.code().starts_with("nbd-"), "{e}");
            assert!(!e.hint().is_empty());
        }
    }

    /// A scripted server: the greeting and a GO reply only (no structured replies), then a
    /// simple read reply. Proves the handshake and the simple reply path without qemu-nbd.
    #[tokio::test]
    async fn handshake_and_read_against_a_scripted_server() {
        let (client_side, mut server) = tokio::io::duplex(1 << 16);
        let server_task = tokio::spawn(async move {
            server.write_u64(NBDMAGIC).await.unwrap();
            server.write_u64(IHAVEOPT).await.unwrap();
            server
                .write_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
                .await
                .unwrap();
            let flags = server.read_u32().await.unwrap();
            assert_eq!(flags, 3);
            // STRUCTURED_REPLY: refused, so plain replies.
            assert_eq!(server.read_u64().await.unwrap(), IHAVEOPT);
            assert_eq!(server.read_u32().await.unwrap(), OPT_STRUCTURED_REPLY);
            assert_eq!(server.read_u32().await.unwrap(), 0);
            reply(&mut server, OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]).await;
            // GO.
            assert_eq!(server.read_u64().await.unwrap(), IHAVEOPT);
            assert_eq!(server.read_u32().await.unwrap(), OPT_GO);
            let len = server.read_u32().await.unwrap();
            let mut data = vec![0; len as usize];
            server.read_exact(&mut data).await.unwrap();
            assert_eq!(&data[4..8], b"disk");
            let mut info = Vec::new();
            info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
            info.extend_from_slice(&8192u64.to_be_bytes());
            info.extend_from_slice(&TRANSMISSION_READ_ONLY.to_be_bytes());
            reply(&mut server, OPT_GO, REP_INFO, &info).await;
            reply(&mut server, OPT_GO, REP_ACK, &[]).await;
            // One read of 16 bytes at 4096.
            assert_eq!(server.read_u32().await.unwrap(), REQUEST_MAGIC);
            assert_eq!(server.read_u16().await.unwrap(), 0);
            assert_eq!(server.read_u16().await.unwrap(), CMD_READ);
            let cookie = server.read_u64().await.unwrap();
            assert_eq!(server.read_u64().await.unwrap(), 4096);
            assert_eq!(server.read_u32().await.unwrap(), 16);
            server.write_u32(SIMPLE_REPLY_MAGIC).await.unwrap();
            server.write_u32(0).await.unwrap();
            server.write_u64(cookie).await.unwrap();
            server.write_all(&[7u8; 16]).await.unwrap();
            // DISC.
            assert_eq!(server.read_u32().await.unwrap(), REQUEST_MAGIC);
            server.read_u16().await.unwrap();
            assert_eq!(server.read_u16().await.unwrap(), CMD_DISC);
        });
        let opts = ConnectOptions {
            export: "disk".into(),
            timeout: Duration::from_secs(5),
            block_status: true,
        };
        let mut client = NbdClient::handshake(client_side, &opts).await.unwrap();
        assert_eq!(client.size(), 8192);
        assert!(client.read_only());
        assert!(!client.has_block_status());
        let mut buf = [0u8; 16];
        client.read(4096, &mut buf).await.unwrap();
        assert_eq!(buf, [7u8; 16]);
        let past = client.read(8190, &mut buf).await.unwrap_err();
        assert_eq!(past.code(), "nbd-invalid-request");
        client.disconnect().await.unwrap();
        server_task.await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let (client_side, _server) = tokio::io::duplex(1024);
        let opts = ConnectOptions {
            timeout: Duration::from_millis(100),
            ..ConnectOptions::default()
        };
        let err = NbdClient::handshake(client_side, &opts).await.unwrap_err();
        assert_eq!(err.code(), "nbd-timeout", "{err}");
    }

    async fn reply(s: &mut tokio::io::DuplexStream, option: u32, kind: u32, data: &[u8]) {
        s.write_u64(OPT_REPLY_MAGIC).await.unwrap();
        s.write_u32(option).await.unwrap();
        s.write_u32(kind).await.unwrap();
        s.write_u32(data.len() as u32).await.unwrap();
        s.write_all(data).await.unwrap();
    }
}
