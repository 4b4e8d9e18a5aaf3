//! A NIC's static IPv4 settings, and how QEMU hands them to a guest that boots from its own
//! disk.
//!
//! Why here: the API, the agent, the CLI and the lab all speak of a guest's address the way
//! the lab guest's kernel command line does (`ferry.ip=ADDR/PREFIX`, `ferry.gw=GW`); one
//! parser and one set of rules keeps them from drifting apart. A disk-booted guest has no
//! command line Ferry controls, so QEMU puts the settings into an SMBIOS OEM string (type 11)
//! that the guest reads from its firmware tables (the Debian image's `ferry-net` unit does).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::spec::NicSpec;

/// Prefix of the SMBIOS OEM strings Ferry writes, one per NIC with a static address:
/// `ferry.netN=ADDR/PREFIX[,gw=GW],mac=MAC`, N the NIC's index.
pub const SMBIOS_NET_PREFIX: &str = "ferry.net";

/// An IPv4 address and the length of its subnet's prefix, written `A.B.C.D/PREFIX` (the
/// vocabulary of the lab guest's `ferry.ip=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    /// 1 to 32.
    pub prefix: u8,
}

impl Ipv4Cidr {
    /// The subnet's mask as a number.
    fn mask(self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    /// Whether `other` lies in this address's subnet.
    pub fn contains(self, other: Ipv4Addr) -> bool {
        u32::from(self.addr) & self.mask() == u32::from(other) & self.mask()
    }

    /// The subnet's own (all host bits zero) and broadcast (all ones) addresses, which no
    /// host may use; `None` for /31 and /32, which have neither (RFC 3021).
    fn reserved(self) -> Option<(Ipv4Addr, Ipv4Addr)> {
        (self.prefix <= 30).then(|| {
            let net = u32::from(self.addr) & self.mask();
            (Ipv4Addr::from(net), Ipv4Addr::from(net | !self.mask()))
        })
    }

    /// Checks that this can be a guest's own address, and `gateway` its router: the errors
    /// are one sentence each, naming the value. Checked where a spec enters Ferry (server,
    /// agent, QEMU spec), so a guest never boots into an address it cannot use.
    pub fn check_host(self, gateway: Option<Ipv4Addr>) -> Result<(), String> {
        check_unicast(self.addr, "address")?;
        if let Some((net, bcast)) = self.reserved() {
            if self.addr == net {
                return Err(format!("{self} is its subnet's network address"));
            }
            if self.addr == bcast {
                return Err(format!("{self} is its subnet's broadcast address"));
            }
        }
        let Some(gw) = gateway else { return Ok(()) };
        check_unicast(gw, "gateway")?;
        if gw == self.addr {
            return Err(format!("gateway {gw} is the NIC's own address"));
        }
        if !self.contains(gw) {
            return Err(format!("gateway {gw} is outside the NIC's subnet {self}"));
        }
        if self
            .reserved()
            .is_some_and(|(net, bcast)| gw == net || gw == bcast)
        {
            return Err(format!(
                "gateway {gw} is the network or broadcast address of {self}"
            ));
        }
        Ok(())
    }
}

fn check_unicast(a: Ipv4Addr, what: &str) -> Result<(), String> {
    let kind = if a.is_unspecified() {
        "unspecified"
    } else if a.is_loopback() {
        "a loopback address"
    } else if a.is_multicast() {
        "a multicast address"
    } else if a.is_broadcast() {
        "the broadcast address"
    } else if a.octets()[0] >= 240 {
        "a reserved (240.0.0.0/4) address"
    } else {
        return Ok(());
    };
    Err(format!("{what} {a} is {kind}, not a host's"))
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;
    /// `A.B.C.D/PREFIX` exactly: no spaces, no leading zeros, prefix 1 to 32.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shape = || format!("{s:?} is not ADDR/PREFIX such as 10.77.0.50/24");
        let (addr, prefix) = s.split_once('/').ok_or_else(shape)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| shape())?;
        let prefix: u8 = (!prefix.is_empty()
            && prefix.len() <= 2
            && prefix.bytes().all(|b| b.is_ascii_digit())
            && !(prefix.len() > 1 && prefix.starts_with('0')))
        .then(|| prefix.parse().ok())
        .flatten()
        .ok_or_else(shape)?;
        if !(1..=32).contains(&prefix) {
            return Err(format!(
                "{s:?} has prefix length {prefix}; it must be 1 to 32"
            ));
        }
        Ok(Ipv4Cidr { addr, prefix })
    }
}

impl TryFrom<String> for Ipv4Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Ipv4Cidr> for String {
    fn from(c: Ipv4Cidr) -> String {
        c.to_string()
    }
}

/// Parses a gateway: a plain dotted IPv4 address.
pub fn parse_gateway(s: &str) -> Result<Ipv4Addr, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not an IPv4 address such as 10.77.0.1"))
}

/// The SMBIOS OEM string for NIC `index`, if it has a static address:
/// `ferry.netN=ADDR/PREFIX[,gw=GW],mac=MAC`. Unescaped; QEMU's option syntax doubles the
/// commas (see [`smbios_arg`]).
pub fn smbios_net_string(index: usize, nic: &NicSpec) -> Option<String> {
    let cidr = nic.ipv4?;
    let gw = nic.gateway.map(|g| format!(",gw={g}")).unwrap_or_default();
    Some(format!(
        "{SMBIOS_NET_PREFIX}{index}={cidr}{gw},mac={}",
        nic.mac
    ))
}

/// The value of one `-smbios` option carrying `strings` as type 11 OEM strings, or `None`
/// when there are none. A comma inside an option value is written `,,`.
pub fn smbios_arg(strings: &[String]) -> Option<String> {
    if strings.is_empty() {
        return None;
    }
    let mut arg = String::from("type=11");
    for s in strings {
        arg.push_str(",value=");
        arg.push_str(&s.replace(',', ",,"));
    }
    Some(arg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::MacAddr;

    fn c(s: &str) -> Ipv4Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_strictly_and_round_trips() {
        assert_eq!(
            c("10.77.0.50/24"),
            Ipv4Cidr {
                addr: Ipv4Addr::new(10, 77, 0, 50),
                prefix: 24
            }
        );
        assert_eq!(c("10.77.0.50/24").to_string(), "10.77.0.50/24");
        for bad in [
            "",
            "10.77.0.50",
            "10.77.0.50/",
            "10.77.0.50/0",
            "10.77.0.50/33",
            "10.77.0.50/024",
            "10.77.0.50/+4",
            " 10.77.0.50/24",
            "10.77.0.050/24",
            "10.77.0/24",
            "10.77.0.50/24/1",
            "::1/64",
        ] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad:?}");
        }
        let j = serde_json::to_string(&c("10.0.0.1/8")).unwrap();
        assert_eq!(j, "\"10.0.0.1/8\"");
        assert!(serde_json::from_str::<Ipv4Cidr>("\"10.0.0.1\"").is_err());
    }

    #[test]
    fn host_rules() {
        let gw = |s: &str| Some(s.parse::<Ipv4Addr>().unwrap());
        assert!(c("10.77.0.50/24").check_host(gw("10.77.0.1")).is_ok());
        assert!(c("10.77.0.50/24").check_host(None).is_ok());
        assert!(c("10.0.0.0/31").check_host(gw("10.0.0.1")).is_ok());
        assert!(c("10.0.0.7/32").check_host(None).is_ok());
        for (cidr, g, needle) in [
            ("10.77.0.0/24", None, "network address"),
            ("10.77.0.255/24", None, "broadcast address"),
            ("0.0.0.0/8", None, "unspecified"),
            ("127.0.0.5/8", None, "loopback"),
            ("224.0.0.5/4", None, "multicast"),
            ("250.0.0.5/8", None, "reserved"),
            ("10.77.0.50/24", gw("10.77.1.1"), "outside"),
            ("10.77.0.50/24", gw("10.77.0.50"), "own address"),
            ("10.77.0.50/24", gw("10.77.0.255"), "broadcast"),
            ("10.77.0.50/24", gw("0.0.0.0"), "unspecified"),
            ("10.0.0.7/32", gw("10.0.0.1"), "outside"),
        ] {
            let e = c(cidr).check_host(g).unwrap_err();
            assert!(e.contains(needle), "{cidr} {g:?}: {e}");
        }
        assert!(parse_gateway("10.77.0.1").is_ok());
        assert!(parse_gateway("10.77.0.1/24").is_err());
    }

    #[test]
    fn smbios_strings_escape_commas() {
        let mut nic = NicSpec {
            tap: "t".into(),
            mac: MacAddr::local(1),
            ipv4: None,
            gateway: None,
        };
        assert_eq!(smbios_net_string(0, &nic), None);
        nic.ipv4 = Some(c("10.77.0.50/24"));
        assert_eq!(
            smbios_net_string(2, &nic).unwrap(),
            "ferry.net2=10.77.0.50/24,mac=52:54:00:00:00:01"
        );
        nic.gateway = Some(Ipv4Addr::new(10, 77, 0, 1));
        let s = smbios_net_string(0, &nic).unwrap();
        assert_eq!(
            s,
            "ferry.net0=10.77.0.50/24,gw=10.77.0.1,mac=52:54:00:00:00:01"
        );
        assert_eq!(smbios_arg(&[]), None);
        assert_eq!(
            smbios_arg(&[s, "a".into()]).unwrap(),
            "type=11,value=ferry.net0=10.77.0.50/24,,gw=10.77.0.1,,mac=52:54:00:00:00:01,value=a"
        );
    }
}
