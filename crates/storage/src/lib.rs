//! Disk images on datastores, below the agent and above the tools that touch them.
//!
//! Everything Ferry does to an image file happens here: creating and inspecting images with
//! `qemu-img` ([`qemu_img`]), and (for cold migration) copying an image's content between
//! hosts and proving both sides hold the same bytes. The agent decides *which* file; this
//! crate only knows *how*, so it is tested on temporary files without any agent.

pub mod qemu_img;
