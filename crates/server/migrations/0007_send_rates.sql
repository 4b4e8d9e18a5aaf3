-- How fast QEMU got through guest memory between two hosts, learned from completed live
-- migrations (an exponentially weighted mean, ferry_migrate::plan::learn_rate): the auto
-- policy's plan uses it instead of the raw TCP probe. Bytes per second; `migrations` counts
-- the migrations it was learned from; `updated_at` is unix milliseconds.
CREATE TABLE send_rates (
    source TEXT NOT NULL,
    destination TEXT NOT NULL,
    rate_bps DOUBLE PRECISION NOT NULL,
    migrations BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (source, destination)
);
