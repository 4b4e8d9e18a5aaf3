-- What a live migration cost the guest (ferry_migrate::GuestImpact as JSON): the vCPU
-- throttle's history, peak and time above 50 %, the guest CPU it took, QEMU's pause and what
-- observers outside the guest saw.
ALTER TABLE migrations ADD COLUMN impact TEXT;
