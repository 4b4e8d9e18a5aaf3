//! What a CLI command can fail with, and the exit code each failure maps to.
//!
//! Scripts branch on the exit code (did the migration fail, or could we not even reach the
//! server?), humans read the `error[code]` line and its hint; both come from here so they never
//! disagree.

use ferry_api::{ApiError, ErrorBody};
use ferry_chaos::ChaosError;
use ferry_lab::LabError;

/// Exit codes of every `ferry` command; `ferry --help` and the README list them.
pub mod exit {
    pub const OK: u8 = 0;
    /// The server refused the request, or the command line or configuration is wrong.
    pub const ERROR: u8 = 1;
    /// A migration the command waited for ended Failed.
    pub const MIGRATION_FAILED: u8 = 2;
    /// A migration the command waited for ended Cancelled.
    pub const MIGRATION_CANCELLED: u8 = 3;
    /// The server could not be reached.
    pub const UNREACHABLE: u8 = 4;
    /// The server rejected the credential (HTTP 401 or 403).
    pub const AUTH: u8 = 5;
    /// Stdout was closed before the output was written (`ferry host list | head -1`): 128 +
    /// SIGPIPE, as a shell reports it for programs that die of the signal.
    pub const STDOUT_CLOSED: u8 = 141;
}

/// The help text's exit code table, shared by `--help` and the README.
pub const EXIT_CODES_HELP: &str = "Exit codes:
  0  success
  1  API or usage error (the server refused the request, bad arguments or configuration)
  2  the migration waited for ended Failed
  3  the migration waited for ended Cancelled
  4  cannot reach the server
  5  authentication error (HTTP 401/403: missing or wrong token)
  141  stdout was closed before everything was written (e.g. piped into head)";

/// A failure of a CLI command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A call to the server (or an agent) failed.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The lab (namespaces, guest image, QEMU) failed.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// Anything else the CLI itself detects: configuration, arguments, local files, daemons.
    #[error("{0}")]
    Local(ErrorBody),
}

impl From<ChaosError> for CliError {
    fn from(e: ChaosError) -> CliError {
        match e {
            ChaosError::Api(e) => CliError::Api(e),
            ChaosError::Lab(e) => CliError::Lab(e),
            e => CliError::Local(e.body()),
        }
    }
}

impl From<ferry_bench::BenchError> for CliError {
    fn from(e: ferry_bench::BenchError) -> CliError {
        use ferry_bench::BenchError;
        match e {
            BenchError::Api(e) => CliError::Api(e),
            BenchError::Lab(e) => CliError::Lab(e),
            BenchError::Chaos(e) => e.into(),
            BenchError::Daemon(body) => CliError::Local(body),
            e => CliError::new("lab-cluster", e.chain(), ""),
        }
    }
}

impl CliError {
    pub fn new(code: &str, message: impl Into<String>, hint: impl Into<String>) -> CliError {
        CliError::Local(ErrorBody::new(code, message, hint))
    }

    /// The code, sentence and hint the user sees.
    pub fn body(&self) -> ErrorBody {
        match self {
            CliError::Api(e) => e.body(),
            CliError::Lab(e) => ErrorBody::new(e.code(), e.to_string(), e.hint()),
            CliError::Local(b) => b.clone(),
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Api(ApiError::Unreachable { .. }) => exit::UNREACHABLE,
            CliError::Api(ApiError::Status {
                status: 401 | 403, ..
            }) => exit::AUTH,
            _ => exit::ERROR,
        }
    }

    /// `error[code]: message` and `  hint: ...`, as printed on stderr.
    pub fn render(&self) -> String {
        render_error(&self.body())
    }
}

/// The two lines every error is printed as.
pub fn render_error(body: &ErrorBody) -> String {
    let mut s = format!("error[{}]: {}", body.code, body.message);
    if !body.hint.is_empty() {
        s.push_str(&format!("\n  hint: {}", body.hint));
    }
    s
}

/// `warning[code]: message` and `  hint: ...`: a request that succeeded but probably not as
/// meant, printed on stderr like an error so that it is read, without failing the command.
pub fn render_warning(w: &ferry_api::instances::Warning) -> String {
    let mut s = format!("warning[{}]: {}", w.code, w.message);
    if !w.hint.is_empty() {
        s.push_str(&format!("\n  hint: {}", w.hint));
    }
    s
}
