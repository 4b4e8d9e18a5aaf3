-- The last link bandwidth the pre-flight probe measured between two hosts (Mbit/s), and when
-- (unix milliseconds). A host pair that already has a learned send rate reuses it instead of
-- pushing data again before each migration: a migration then starts in milliseconds, also
-- after a server restart or a long pause between migrations.
CREATE TABLE links (
    source TEXT NOT NULL,
    destination TEXT NOT NULL,
    bandwidth_mbit_s DOUBLE PRECISION NOT NULL,
    measured_at BIGINT NOT NULL,
    PRIMARY KEY (source, destination)
);

-- How much longer than its last pages QEMU's pause was between two hosts (the device state
-- and the hand-over), learned like the rate (ferry_migrate::plan::observed_switchover_ms):
-- the plan adds it to the predicted pause. Milliseconds; NULL until a migration taught it.
ALTER TABLE send_rates ADD COLUMN switchover_ms DOUBLE PRECISION;
