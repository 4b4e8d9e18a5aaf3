//! Disk images on datastores, below the agent and above the tools that touch them.
//!
//! Everything Ferry does to an image file happens here: creating and inspecting images with
//! `qemu-img` ([`qemu_img`]), and (for cold migration) copying an image's content between
//! hosts ([`copy`]) and proving both sides hold the same bytes ([`checksum`], read through
//! the small NBD client [`nbd`]). The agent decides *which* file; this crate only knows
//! *how*, so it is tested on temporary files without any agent.

pub mod checksum;
pub mod copy;
pub mod nbd;
pub mod qemu_img;
pub mod tool;

#[cfg(test)]
mod testutil;
