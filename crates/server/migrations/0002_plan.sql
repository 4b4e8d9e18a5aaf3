-- The auto policy's plan of a live migration and the engine parameters it chose, as JSON
-- (ferry_api::migrations::MigrationPlan); set once, when the job is prepared.
ALTER TABLE migrations ADD COLUMN plan TEXT;
