-- Cold migrations with disks: the images copied to the destination, as JSON
-- (Vec<ferry_api::migrations::DiskCopy>), and when the source copies kept until cleanup
-- were removed (unix ms).
ALTER TABLE migrations ADD COLUMN copies TEXT;
ALTER TABLE migrations ADD COLUMN cleaned_up_at BIGINT;
