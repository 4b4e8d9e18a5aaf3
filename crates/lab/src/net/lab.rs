//! Creating, describing and removing a lab: the switch, the hosts and the client.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::cmd::{ip, ip_in};
use super::names::{
    client_netns_name, host_netns_name, lab_of_netns, switch_netns_name, test_lab_pid,
    validate_lab_name, validate_tap_name, MAX_HOSTS, NETNS_PREFIX,
};
use super::NetError;

/// Bridge in the switch namespace joining the hosts' guest bridges and the client.
const SWITCH_GUEST_BRIDGE: &str = "brg";
/// Bridge in the switch namespace joining the hosts' migration interfaces.
const SWITCH_MIGRATION_BRIDGE: &str = "brm";
/// Guest bridge in each host namespace; VM taps are enslaved to it.
const HOST_GUEST_BRIDGE: &str = "br0";
/// Host-side uplink of the guest bridge.
const HOST_UPLINK: &str = "up0";
/// Host-side interface on the migration network.
/// The host's interface on the migration network (its traffic counters measure what a
/// migration sent).
pub(super) const HOST_MIGRATION_IF: &str = "mig0";

/// Bytes a lab host's migration interface (in namespace `netns`) has received, as the kernel
/// counts them (whole frames, headers included): what a migration put on the wire.
pub fn migration_rx_bytes(netns: &str) -> Option<u64> {
    let out = std::process::Command::new("ip")
        .args([
            "-n",
            netns,
            "-s",
            "-j",
            "link",
            "show",
            "dev",
            HOST_MIGRATION_IF,
        ])
        .output()
        .ok()?;
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    links.get(0)?.pointer("/stats64/rx/bytes")?.as_u64()
}
/// Client-side interface on the guest network.
const CLIENT_IF: &str = "eth0";
/// Switch-side name of the client's veth.
const CLIENT_SWITCH_PORT: &str = "clientg";
/// Prefix length of the migration network 10.78.0.0/24.
const MIGRATION_PREFIX: u8 = 24;
/// How long `destroy` waits for killed processes to leave a namespace.
const KILL_WAIT: Duration = Duration::from_secs(3);

/// One lab host's network: its namespace, its migration address and its guest bridge.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabHostNet {
    /// Host name within the lab, "hv1".."hv8".
    pub name: String,
    /// Namespace the host's processes (agent, QEMU) run in.
    pub netns: String,
    /// The host's address on the migration network (10.78.0.(10+i)/24).
    pub migration_addr: Ipv4Addr,
    /// Bridge in the host namespace where VM taps go.
    pub guest_bridge: String,
}

/// A lab: several hosts, a switch and a client, each a network namespace on this machine.
///
/// A value returned by [`LabNet::create`] owns the lab and removes it when dropped, so a failing
/// test cannot leave namespaces behind. Values obtained by deserializing or by
/// [`LabNet::attach`] only describe a lab and never remove it on drop (reading a state file must
/// not tear the lab down); call [`LabNet::destroy`] explicitly for that.
#[derive(Debug, Serialize, Deserialize)]
pub struct LabNet {
    /// The lab's name, `[a-z0-9-]{1,20}`.
    pub lab: String,
    /// The hosts, hv1 first.
    pub hosts: Vec<LabHostNet>,
    /// Namespace standing for the users of the guests.
    pub client_netns: String,
    /// The client's address on the guest network.
    pub client_addr: Ipv4Addr,
    /// Namespace holding the guest and migration bridges.
    pub switch_netns: String,
    /// Whether dropping this value removes the lab.
    #[serde(skip)]
    owns_lab: bool,
}

impl LabNet {
    /// Prefix length of the guest network 10.77.0.0/24, for guests' static addresses.
    pub const GUEST_PREFIX: u8 = 24;
    /// Largest index accepted by [`LabNet::guest_addr`] (10.77.0.254).
    pub const MAX_GUEST_INDEX: u8 = 154;

    /// Creates the lab; first removes a stale lab of the same name (left by a crashed run).
    ///
    /// On failure, everything created so far is removed and the error carries the failing
    /// command line and its stderr.
    pub fn create(lab: &str, hosts: usize) -> Result<LabNet, NetError> {
        validate_lab_name(lab)?;
        if hosts == 0 || hosts > MAX_HOSTS {
            return Err(NetError::InvalidHostCount {
                count: hosts,
                max: MAX_HOSTS,
            });
        }
        if list_labs().iter().any(|l| l == lab) {
            tracing::warn!(lab, "removing stale lab of the same name");
            destroy_lab(lab);
        }
        let net = LabNet::describe(lab, hosts, true);
        // On error `net` is dropped here and, owning the lab, removes what was built.
        net.build()?;
        tracing::info!(lab, hosts, "lab network created");
        Ok(net)
    }

    /// Describes an existing lab from its namespaces, without taking ownership of it.
    ///
    /// Lets `ferry lab` commands and tools work with a lab started by another process.
    pub fn attach(lab: &str) -> Result<LabNet, NetError> {
        validate_lab_name(lab)?;
        let namespaces = lab_namespaces(lab);
        if !namespaces.contains(&switch_netns_name(lab)) {
            return Err(NetError::LabNotFound {
                lab: lab.to_string(),
            });
        }
        let mut indexes: Vec<usize> = namespaces
            .iter()
            .filter_map(|ns| ns.strip_prefix(&format!("{NETNS_PREFIX}{lab}-hv")))
            .filter_map(|n| n.parse().ok())
            .collect();
        indexes.sort_unstable();
        let mut net = LabNet::describe(lab, 0, false);
        net.hosts = indexes.into_iter().map(|i| host_net(lab, i)).collect();
        Ok(net)
    }

    /// The lab's layout for `hosts` hosts, without touching the system.
    fn describe(lab: &str, hosts: usize, owns_lab: bool) -> LabNet {
        LabNet {
            lab: lab.to_string(),
            hosts: (1..=hosts).map(|i| host_net(lab, i)).collect(),
            client_netns: client_netns_name(lab),
            client_addr: Ipv4Addr::new(10, 77, 0, 2),
            switch_netns: switch_netns_name(lab),
            owns_lab,
        }
    }

    /// Creates the namespaces, bridges and veths of the whole lab.
    fn build(&self) -> Result<(), NetError> {
        self.build_switch()?;
        for (i, host) in self.hosts.iter().enumerate() {
            self.build_host(i + 1, host)?;
        }
        self.build_client()
    }

    /// The switch namespace with its two bridges.
    fn build_switch(&self) -> Result<(), NetError> {
        add_netns(&self.switch_netns)?;
        for bridge in [SWITCH_GUEST_BRIDGE, SWITCH_MIGRATION_BRIDGE] {
            add_bridge(&self.switch_netns, bridge)?;
        }
        Ok(())
    }

    /// One host: its guest bridge with an uplink to `brg`, and its migration interface on `brm`.
    fn build_host(&self, index: usize, host: &LabHostNet) -> Result<(), NetError> {
        let ns = host.netns.as_str();
        add_netns(ns)?;
        add_bridge(ns, &host.guest_bridge)?;
        let guest_port = format!("hv{index}g");
        self.add_uplink(ns, HOST_UPLINK, &guest_port, SWITCH_GUEST_BRIDGE)?;
        ip_in(
            ns,
            &["link", "set", HOST_UPLINK, "master", &host.guest_bridge],
        )?;
        let mig_port = format!("hv{index}m");
        self.add_uplink(ns, HOST_MIGRATION_IF, &mig_port, SWITCH_MIGRATION_BRIDGE)?;
        let addr = format!("{}/{MIGRATION_PREFIX}", host.migration_addr);
        ip_in(ns, &["addr", "add", &addr, "dev", HOST_MIGRATION_IF]).map(drop)
    }

    /// The client namespace with its address on the guest network.
    fn build_client(&self) -> Result<(), NetError> {
        let ns = self.client_netns.as_str();
        add_netns(ns)?;
        self.add_uplink(ns, CLIENT_IF, CLIENT_SWITCH_PORT, SWITCH_GUEST_BRIDGE)?;
        let addr = format!("{}/{}", self.client_addr, Self::GUEST_PREFIX);
        ip_in(ns, &["addr", "add", &addr, "dev", CLIENT_IF]).map(drop)
    }

    /// A veth from `inner` in `ns` to `port` in the switch, enslaved to `switch_bridge`, both
    /// ends up. Created directly across namespaces so it never appears in the root namespace.
    fn add_uplink(
        &self,
        ns: &str,
        inner: &str,
        port: &str,
        switch_bridge: &str,
    ) -> Result<(), NetError> {
        let sw = self.switch_netns.as_str();
        ip_in(
            ns,
            &[
                "link", "add", inner, "type", "veth", "peer", "name", port, "netns", sw,
            ],
        )?;
        ip_in(sw, &["link", "set", port, "master", switch_bridge, "up"])?;
        ip_in(ns, &["link", "set", inner, "up"]).map(drop)
    }

    /// The host named `name` ("hv1"), or an error listing the hosts the lab has.
    pub fn host(&self, name: &str) -> Result<&LabHostNet, NetError> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .ok_or_else(|| NetError::UnknownHost {
                name: name.to_string(),
                known: self.hosts.iter().map(|h| h.name.clone()).collect(),
            })
    }

    /// The static address of guest number `index` on the guest network: 10.77.0.(100+index).
    ///
    /// Guests get fixed addresses so tests and the client know where to find them without
    /// DHCP. Indexes above [`LabNet::MAX_GUEST_INDEX`] all map to 10.77.0.254.
    pub fn guest_addr(&self, index: u8) -> Ipv4Addr {
        let last = index.min(Self::MAX_GUEST_INDEX) + 100;
        Ipv4Addr::new(10, 77, 0, last)
    }

    /// Creates tap `tap` in `host`'s namespace, enslaved to its guest bridge and up, ready for
    /// QEMU (`-netdev tap,ifname=TAP,script=no,downscript=no` run inside the namespace).
    pub fn add_tap(&self, host: &str, tap: &str) -> Result<(), NetError> {
        validate_tap_name(tap)?;
        let host = self.host(host)?;
        let ns = host.netns.as_str();
        ip_in(ns, &["tuntap", "add", "dev", tap, "mode", "tap"])?;
        let attached = ip_in(ns, &["link", "set", tap, "master", &host.guest_bridge])
            .and_then(|_| ip_in(ns, &["link", "set", tap, "up"]));
        if let Err(e) = attached {
            let _ = ip_in(ns, &["link", "del", tap]);
            return Err(e);
        }
        Ok(())
    }

    /// Removes tap `tap` from `host`; removing a tap that does not exist succeeds, so cleanup
    /// paths can call it unconditionally.
    pub fn remove_tap(&self, host: &str, tap: &str) -> Result<(), NetError> {
        validate_tap_name(tap)?;
        let ns = self.host(host)?.netns.as_str();
        match ip_in(ns, &["link", "del", tap]) {
            Ok(_) => Ok(()),
            Err(e) if ip_in(ns, &["link", "show", "dev", tap]).is_ok() => Err(e),
            Err(_) => Ok(()),
        }
    }

    /// Kills every process still running inside the lab's namespaces and deletes the
    /// namespaces. Idempotent and best effort: failures are logged, never returned or panicked
    /// on, because this runs from `Drop` and cleanup paths.
    pub fn destroy(&self) {
        destroy_lab(&self.lab);
    }

    /// Whether dropping this value removes the lab.
    pub fn owns_lab(&self) -> bool {
        self.owns_lab
    }

    /// Gives up ownership: the lab outlives this value (and the process), as `ferry lab up`
    /// needs. The returned value still describes the lab and can `destroy` it explicitly.
    pub fn into_persistent(mut self) -> LabNet {
        self.owns_lab = false;
        self
    }

    /// Keeps the lab running after this value is gone; remove it later with [`destroy_lab`].
    pub fn leak(self) {
        drop(self.into_persistent());
    }
}

impl Drop for LabNet {
    fn drop(&mut self) {
        if self.owns_lab {
            self.destroy();
        }
    }
}

/// The layout of host number `index` (1-based) of `lab`.
fn host_net(lab: &str, index: usize) -> LabHostNet {
    let name = format!("hv{index}");
    let last = u8::try_from(10 + index).unwrap_or(u8::MAX);
    LabHostNet {
        netns: host_netns_name(lab, &name),
        name,
        migration_addr: Ipv4Addr::new(10, 78, 0, last),
        guest_bridge: HOST_GUEST_BRIDGE.to_string(),
    }
}

/// Creates namespace `ns` with its loopback up (local services bind to 127.0.0.1).
fn add_netns(ns: &str) -> Result<(), NetError> {
    ip(&["netns", "add", ns])?;
    ip_in(ns, &["link", "set", "lo", "up"]).map(drop)
}

/// Creates bridge `bridge` in `ns` and brings it up.
fn add_bridge(ns: &str, bridge: &str) -> Result<(), NetError> {
    ip_in(ns, &["link", "add", bridge, "type", "bridge"])?;
    ip_in(ns, &["link", "set", bridge, "up"]).map(drop)
}

/// Every network namespace on the machine, from `ip netns list`.
fn list_netns() -> Vec<String> {
    match ip(&["netns", "list"]) {
        Ok(out) => out
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list network namespaces");
            Vec::new()
        }
    }
}

/// The namespaces belonging to `lab`.
fn lab_namespaces(lab: &str) -> Vec<String> {
    list_netns()
        .into_iter()
        .filter(|ns| lab_of_netns(ns) == Some(lab))
        .collect()
}

/// Lists lab names that currently have namespaces, sorted.
///
/// Read from `ip netns list` so labs left by other (or crashed) processes are found too.
pub fn list_labs() -> Vec<String> {
    let mut labs: Vec<String> = list_netns()
        .iter()
        .filter_map(|ns| lab_of_netns(ns))
        .map(str::to_string)
        .collect();
    labs.sort();
    labs.dedup();
    labs
}

/// Removes a lab by name even if no `LabNet` value exists (for `ferry lab down` and stale
/// cleanup). Kills processes inside its namespaces first, so no QEMU keeps a deleted
/// namespace's interfaces alive. Best effort: failures are logged.
pub fn destroy_lab(lab: &str) {
    if let Err(e) = validate_lab_name(lab) {
        tracing::warn!(error = %e, "not destroying lab");
        return;
    }
    let namespaces = lab_namespaces(lab);
    for ns in &namespaces {
        kill_netns_processes(ns);
    }
    for ns in &namespaces {
        if let Err(e) = ip(&["netns", "del", ns]) {
            tracing::warn!(error = %e, "cannot delete lab namespace");
        }
    }
    if !namespaces.is_empty() {
        tracing::info!(lab, "lab network destroyed");
    }
}

/// The pids of processes in namespace `ns`, except this process.
fn netns_pids(ns: &str) -> Vec<i32> {
    let own = std::process::id() as i32;
    match ip(&["netns", "pids", ns]) {
        Ok(out) => out
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|&p| p > 1 && p != own)
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list processes of lab namespace");
            Vec::new()
        }
    }
}

/// SIGKILLs the processes in `ns` and waits (bounded) until none are left.
fn kill_netns_processes(ns: &str) {
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        let pids = netns_pids(ns);
        if pids.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(ns, ?pids, "processes still running in lab namespace");
            return;
        }
        for pid in pids {
            tracing::debug!(ns, pid, "killing process in lab namespace");
            // SAFETY: kill(2) has no memory-safety preconditions; pid > 1 was checked.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether process `pid` exists (EPERM means it exists but belongs to someone else).
fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence; no memory is involved.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes labs named `t<pid>-...` whose creator pid is no longer alive, i.e. labs left by test
/// runs that crashed or were killed before their `Drop` ran.
pub fn remove_orphan_test_labs() {
    for lab in list_labs() {
        if let Some(pid) = test_lab_pid(&lab) {
            if !pid_alive(pid) {
                tracing::info!(lab, pid, "removing orphan test lab");
                destroy_lab(&lab);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let net = LabNet::describe("x", 3, false);
        assert_eq!(net.hosts.len(), 3);
        assert_eq!(net.hosts[2].name, "hv3");
        assert_eq!(net.hosts[2].netns, "ferry-x-hv3");
        assert_eq!(net.hosts[2].migration_addr, Ipv4Addr::new(10, 78, 0, 13));
        assert_eq!(net.guest_addr(0), Ipv4Addr::new(10, 77, 0, 100));
        assert_eq!(net.guest_addr(255), Ipv4Addr::new(10, 77, 0, 254));
        assert_eq!(net.switch_netns, "ferry-x-sw");
        assert_eq!(net.client_netns, "ferry-x-client");
    }

    #[test]
    fn unknown_host_lists_known() {
        let net = LabNet::describe("x", 2, false);
        match net.host("hv9") {
            Err(NetError::UnknownHost { known, .. }) => assert_eq!(known, ["hv1", "hv2"]),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn deserialized_lab_is_not_owned() {
        let net = LabNet::describe("x", 1, false);
        let json = serde_json::to_string(&net).expect("serialize");
        let back: LabNet = serde_json::from_str(&json).expect("deserialize");
        assert!(!back.owns_lab());
        assert_eq!(back.hosts, net.hosts);
    }
}
