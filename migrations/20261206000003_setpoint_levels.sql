-- A sensor's setpoint becomes a small priority array (docs/setpoint-levels.md): the `setpoints`
-- row is its DEFAULT level (1), what PutSetpoint writes; `setpoint_levels` holds the levels
-- above it, OVERRIDE (3) and SAFETY (4), each with an optional expiry. The highest level present
-- and not expired decides: `winning_level` says which, and the notification and the control
-- loop's full re-read both take the effective setpoint from it.
--
-- Every change of any level raises the sensor's one revision (`setpoints.revision`), so the
-- loop's caches still order changes by it, and is one history row (with its level).
-- `default_revision` keeps the revision at which the DEFAULT level itself was last written.

-- No foreign key to `setpoints`: its rows are never removed (setpoints_no_delete), and a key
-- would make a TRUNCATE fail before that trigger could say why.
CREATE TABLE setpoint_levels (
    sensor_id          text             NOT NULL,
    level              smallint         NOT NULL CHECK (level IN (3, 4)),
    desired_celsius    double precision NOT NULL CHECK (desired_celsius BETWEEN -50 AND 100),
    up_delta_celsius   double precision NOT NULL CHECK (up_delta_celsius BETWEEN 0 AND 20),
    down_delta_celsius double precision NOT NULL CHECK (down_delta_celsius BETWEEN 0 AND 20),
    expire_time        timestamptz,
    revision           bigint           NOT NULL CHECK (revision >= 1),
    update_time        timestamptz      NOT NULL,
    updated_by         text             NOT NULL,
    reason             text             NOT NULL DEFAULT '' CHECK (char_length(reason) <= 256),
    PRIMARY KEY (sensor_id, level)
);

-- The expiry upkeep's search.
CREATE INDEX setpoint_levels_by_expiry ON setpoint_levels (expire_time)
    WHERE expire_time IS NOT NULL;

ALTER TABLE setpoint_history
    ADD COLUMN level smallint NOT NULL DEFAULT 1,
    ADD COLUMN expire_time timestamptz;

-- Set once for every existing row without telling the replicas (nothing they use changes).
ALTER TABLE setpoints ADD COLUMN default_revision bigint;
ALTER TABLE setpoints DISABLE TRIGGER setpoints_notify;
UPDATE setpoints SET default_revision = revision;
ALTER TABLE setpoints ENABLE TRIGGER setpoints_notify;
ALTER TABLE setpoints ALTER COLUMN default_revision SET NOT NULL;

-- A write of the DEFAULT level's own values (not a mere revision raise by another level).
CREATE FUNCTION setpoints_default_revision() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT'
       OR (NEW.building_id, NEW.desired_celsius, NEW.up_delta_celsius, NEW.down_delta_celsius,
           NEW.deleted)
          IS DISTINCT FROM (OLD.building_id, OLD.desired_celsius, OLD.up_delta_celsius,
                            OLD.down_delta_celsius, OLD.deleted) THEN
        NEW.default_revision := NEW.revision;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER setpoints_default_revision BEFORE INSERT OR UPDATE ON setpoints
    FOR EACH ROW EXECUTE FUNCTION setpoints_default_revision();

-- Deleting a setpoint (DeleteSetpoint's tombstone) deletes the sensor's levels with it: a sensor
-- created again starts from its DEFAULT level alone. Named to run before setpoints_notify.
CREATE FUNCTION setpoints_drop_levels() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM setpoint_levels WHERE sensor_id = NEW.sensor_id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER setpoints_drop_levels AFTER UPDATE ON setpoints
    FOR EACH ROW WHEN (NEW.deleted AND NOT OLD.deleted)
    EXECUTE FUNCTION setpoints_drop_levels();

-- The rule: the highest level above DEFAULT present at `at` and not expired then, if any
-- (none: DEFAULT decides). The one place it is written.
CREATE FUNCTION winning_level(sensor text, at timestamptz) RETURNS SETOF setpoint_levels
LANGUAGE sql STABLE AS $$
    SELECT * FROM setpoint_levels
    WHERE sensor_id = sensor AND (expire_time IS NULL OR expire_time > at)
    ORDER BY level DESC
    LIMIT 1
$$;

-- The notification now carries the effective setpoint and the level it comes from.
CREATE OR REPLACE FUNCTION setpoints_notify() RETURNS trigger LANGUAGE plpgsql
SET extra_float_digits = 1 AS $$
DECLARE
    top setpoint_levels;
BEGIN
    SELECT * INTO top FROM winning_level(NEW.sensor_id, now());
    PERFORM pg_notify('thermostat_setpoints', json_build_object(
        'sensor_id', NEW.sensor_id,
        'building_id', NEW.building_id,
        'desired_celsius', COALESCE(top.desired_celsius, NEW.desired_celsius),
        'up_delta_celsius', COALESCE(top.up_delta_celsius, NEW.up_delta_celsius),
        'down_delta_celsius', COALESCE(top.down_delta_celsius, NEW.down_delta_celsius),
        'revision', NEW.revision,
        'deleted', NEW.deleted,
        'level', COALESCE(top.level, 1),
        'level_revision', COALESCE(top.revision, NEW.default_revision))::text);
    RETURN NULL;
END;
$$;
