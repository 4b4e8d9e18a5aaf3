//! Lab hosts as network namespaces on one machine.
//!
//! Ferry's tests, benchmarks and demo need several "hypervisor hosts" with separate guest and
//! migration networks, but run on a single machine. Each host is a network namespace with its
//! own guest bridge; a "switch" namespace joins them with two bridges (guest network `brg`,
//! migration network `brm`), and a "client" namespace stands where users of the guests would be.
//!
//! ```text
//!  ferry-L-client        ferry-L-sw                 ferry-L-hvI
//!  eth0 10.77.0.2 ──── clientg ┐
//!                              brg ── hvIg ────────── up0 ── br0 ── tapX (VM)
//!                              brm ── hvIm ────────── mig0 10.78.0.(10+I)
//! ```
//!
//! Everything is driven by plain `ip` commands so a failure can be reproduced by hand from the
//! command line carried in the error, and no interface ever appears in the root namespace.

mod cmd;
mod error;
mod first_bytes;
mod lab;
mod names;
mod sockets;

pub use cmd::netns_command;
pub use error::NetError;
pub use first_bytes::{record_rx, RxRecording, RxTrace};
pub use lab::{
    destroy_lab, list_labs, migration_rx_bytes, remove_orphan_test_labs, LabHostNet, LabNet,
};
pub use names::{
    client_netns_name, host_netns_name, switch_netns_name, unique_test_lab_name, validate_lab_name,
    validate_tap_name, MAX_HOSTS, MAX_LAB_NAME_LEN, MAX_TAP_NAME_LEN,
};
pub use sockets::{
    free_local_ports, in_netns, tcp_connect_in, tcp_listen_in, tcp_throughput, udp_bind_in,
};
