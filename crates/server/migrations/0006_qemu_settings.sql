-- Live migrations: the migration capabilities and parameters the source QEMU ran with, read
-- back from it when its memory stream started, as JSON (ferry_migrate::QemuSettings).
ALTER TABLE migrations ADD COLUMN qemu_settings TEXT;
