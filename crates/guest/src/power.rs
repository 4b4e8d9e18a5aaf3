//! The ACPI power button: a graceful stop of an instance presses it (QMP `system_powerdown`),
//! and an OS powers off cleanly. Busybox has no acpid, so PID 1 listens itself and powers the
//! machine off, as a real OS would, instead of leaving the host to wait for its timeout.

use std::io::Read;
use std::os::raw::c_int;
use std::time::Duration;

use crate::log;

extern "C" {
    fn sync();
    fn reboot(cmd: c_int) -> c_int;
}

/// `LINUX_REBOOT_CMD_POWER_OFF`.
const POWER_OFF: c_int = 0x4321_fedc_u32 as c_int;
/// `EV_KEY` and `KEY_POWER` of linux/input-event-codes.h.
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;
/// `struct input_event` on x86_64: a 16-byte timeval, then type, code and value.
const EVENT_SIZE: usize = 24;

/// Watches every power button input device in the background.
pub fn watch_power_button() {
    std::thread::spawn(|| {
        // The `button` module registers its devices right after insmod; give udev-less sysfs
        // a moment.
        for _ in 0..50 {
            let devices = power_buttons();
            if !devices.is_empty() {
                for dev in devices {
                    std::thread::spawn(move || listen(&dev));
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        log("no power button input device; ACPI shutdown requests are ignored");
    });
}

/// `/dev/input/eventN` of every device named "Power Button".
fn power_buttons() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/class/input") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let label = std::fs::read_to_string(e.path().join("device/name")).ok()?;
            (name.starts_with("event") && label.trim() == "Power Button")
                .then(|| format!("/dev/input/{name}"))
        })
        .collect()
}

fn listen(dev: &str) {
    let mut file = match std::fs::File::open(dev) {
        Ok(f) => f,
        Err(e) => return log(&format!("power button {dev}: {e}")),
    };
    let mut ev = [0u8; EVENT_SIZE];
    while file.read_exact(&mut ev).is_ok() {
        if is_power_press(&ev) {
            log("power button pressed: powering off");
            // SAFETY: sync(2) and reboot(2) take no pointers; PID 1 may power off.
            unsafe {
                sync();
                reboot(POWER_OFF);
            }
        }
    }
}

/// Whether one raw input event is the power key going down.
fn is_power_press(ev: &[u8; EVENT_SIZE]) -> bool {
    let kind = u16::from_ne_bytes([ev[16], ev[17]]);
    let code = u16::from_ne_bytes([ev[18], ev[19]]);
    let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
    kind == EV_KEY && code == KEY_POWER && value == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u16, code: u16, value: i32) -> [u8; EVENT_SIZE] {
        let mut ev = [0u8; EVENT_SIZE];
        ev[16..18].copy_from_slice(&kind.to_ne_bytes());
        ev[18..20].copy_from_slice(&code.to_ne_bytes());
        ev[20..24].copy_from_slice(&value.to_ne_bytes());
        ev
    }

    #[test]
    fn only_the_power_key_going_down_powers_off() {
        assert!(is_power_press(&event(EV_KEY, KEY_POWER, 1)));
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 0)), "release");
        assert!(!is_power_press(&event(EV_KEY, 30, 1)), "another key");
        assert!(!is_power_press(&event(0, 0, 0)), "sync event");
    }
}
