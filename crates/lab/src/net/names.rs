//! Names of labs, namespaces and taps, and their validation.
//!
//! Namespace names encode the lab and the role (`ferry-{lab}-sw`, `ferry-{lab}-hv{i}`,
//! `ferry-{lab}-client`), so a lab can be found and removed from `ip netns list` alone, even
//! after the process that created it has crashed.

use std::sync::atomic::{AtomicU32, Ordering};

use super::NetError;

/// Prefix of every namespace Ferry's lab creates, so unrelated namespaces are never touched.
pub(crate) const NETNS_PREFIX: &str = "ferry-";
/// Longest lab name; keeps namespace names short and readable.
pub const MAX_LAB_NAME_LEN: usize = 20;
/// Most hosts in one lab: the switch-side interface names and the address plan assume it.
pub const MAX_HOSTS: usize = 8;
/// Longest tap name: the kernel's IFNAMSIZ (16) minus the terminating NUL.
pub const MAX_TAP_NAME_LEN: usize = 15;

/// Checks a lab name against `[a-z0-9-]{1,20}`, so it is safe in namespace names and paths.
pub fn validate_lab_name(lab: &str) -> Result<(), NetError> {
    match lab_name_problem(lab) {
        Some(reason) => Err(NetError::InvalidLabName {
            name: lab.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// What is wrong with a lab name, if anything.
fn lab_name_problem(lab: &str) -> Option<String> {
    if lab.is_empty() {
        return Some("it is empty".to_string());
    }
    if lab.len() > MAX_LAB_NAME_LEN {
        return Some(format!("it is longer than {MAX_LAB_NAME_LEN} characters"));
    }
    lab.chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        .map(|c| format!("character {c:?} is not a lowercase letter, digit or '-'"))
}

/// Interface names the lab itself uses inside a host namespace; a tap must not take (or, on
/// removal, delete) one of them.
const RESERVED_IF_NAMES: [&str; 4] = ["lo", "br0", "up0", "mig0"];

/// Checks a tap name: the kernel limits interface names to 15 bytes, and a conservative
/// character set keeps it from being read as an option or keyword by `ip`.
pub fn validate_tap_name(tap: &str) -> Result<(), NetError> {
    match tap_name_problem(tap) {
        Some(reason) => Err(NetError::InvalidTapName {
            name: tap.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// What is wrong with a tap name, if anything.
fn tap_name_problem(tap: &str) -> Option<String> {
    if tap.is_empty() {
        return Some("it is empty".to_string());
    }
    if tap.len() > MAX_TAP_NAME_LEN {
        return Some(format!(
            "it is {} characters long, but interface names hold at most {MAX_TAP_NAME_LEN}",
            tap.len()
        ));
    }
    if RESERVED_IF_NAMES.contains(&tap) {
        return Some("the lab's own interfaces use that name".to_string());
    }
    if tap.starts_with('-') || tap.starts_with('.') {
        return Some("it starts with '-' or '.'".to_string());
    }
    tap.chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        .map(|c| format!("character {c:?} is not allowed"))
}

/// The switch namespace of `lab`, which holds the guest and migration bridges.
pub fn switch_netns_name(lab: &str) -> String {
    format!("{NETNS_PREFIX}{lab}-sw")
}

/// The namespace of host `host` (e.g. "hv1") in `lab`.
pub fn host_netns_name(lab: &str, host: &str) -> String {
    format!("{NETNS_PREFIX}{lab}-{host}")
}

/// The client namespace of `lab`, from which guests are reached like users would.
pub fn client_netns_name(lab: &str) -> String {
    format!("{NETNS_PREFIX}{lab}-client")
}

/// Splits a namespace name into its lab name if it is one of ours (prefix plus a known role).
pub(crate) fn lab_of_netns(ns: &str) -> Option<&str> {
    let rest = ns.strip_prefix(NETNS_PREFIX)?;
    let (lab, role) = rest.rsplit_once('-')?;
    let is_host = role
        .strip_prefix("hv")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    let known_role = role == "sw" || role == "client" || is_host;
    (known_role && validate_lab_name(lab).is_ok()).then_some(lab)
}

/// The creator pid of a test lab named `t{pid}-{n}`, or None for other names.
pub(crate) fn test_lab_pid(lab: &str) -> Option<i32> {
    let rest = lab.strip_prefix('t')?;
    let (pid, n) = rest.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(n) {
        return None;
    }
    pid.parse().ok()
}

/// A lab name unique to this process and call, `t{pid}-{counter}`.
///
/// Tests run in parallel (threads and processes); the pid keeps processes apart, the counter
/// keeps threads apart, and the pid lets `remove_orphan_test_labs` spot labs left by a crashed
/// test run.
pub fn unique_test_lab_name() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("t{}-{n}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_names() {
        assert!(validate_lab_name("demo-1").is_ok());
        assert!(validate_lab_name("").is_err());
        assert!(validate_lab_name("Demo").is_err());
        assert!(validate_lab_name("a_b").is_err());
        assert!(validate_lab_name(&"a".repeat(21)).is_err());
        assert!(validate_lab_name(&"a".repeat(20)).is_ok());
    }

    #[test]
    fn tap_names() {
        assert!(validate_tap_name("tap-web1").is_ok());
        assert!(validate_tap_name(&"t".repeat(15)).is_ok());
        assert!(validate_tap_name(&"t".repeat(16)).is_err());
        assert!(validate_tap_name("-x").is_err());
        assert!(validate_tap_name("a b").is_err());
        assert!(validate_tap_name("a/b").is_err());
        assert!(validate_tap_name("up0").is_err());
    }

    #[test]
    fn netns_names_round_trip() {
        assert_eq!(lab_of_netns(&switch_netns_name("a-sw")), Some("a-sw"));
        assert_eq!(lab_of_netns(&host_netns_name("x", "hv3")), Some("x"));
        assert_eq!(lab_of_netns(&client_netns_name("t1-2")), Some("t1-2"));
        assert_eq!(lab_of_netns("ferry-x-other"), None);
        assert_eq!(lab_of_netns("ferry-x-hv"), None);
        assert_eq!(lab_of_netns("other-x-sw"), None);
    }

    #[test]
    fn test_lab_pids() {
        assert_eq!(test_lab_pid("t123-0"), Some(123));
        assert_eq!(test_lab_pid("t123"), None);
        assert_eq!(test_lab_pid("demo"), None);
        assert_eq!(test_lab_pid("t12a-0"), None);
        let name = unique_test_lab_name();
        assert_eq!(test_lab_pid(&name), Some(std::process::id() as i32));
        assert!(validate_lab_name(&name).is_ok());
    }
}
