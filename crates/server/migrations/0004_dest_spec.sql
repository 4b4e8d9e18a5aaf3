-- Block migrations: the instance's spec as it is on the destination (local disks mapped to
-- the destination's datastores), as JSON (ferry_api::instances::InstanceSpec). The commit
-- writes it into the instance in the same statement that moves the instance.
ALTER TABLE migrations ADD COLUMN dest_spec TEXT;
