-- Weekly schedules and presets per building (docs/schedules.md). A schedule's periods and
-- exceptions are a JSON document the service validates (domain::schedule); its SCHEDULE level
-- (2) is written into `setpoint_levels` for each sensor it covers, by whichever replica first
-- reaches a transition (`next_check`), so that the loop, the notifications and the history
-- treat it as any other level.

ALTER TABLE setpoint_levels
    DROP CONSTRAINT setpoint_levels_level_check,
    ADD CONSTRAINT setpoint_levels_level_check CHECK (level IN (2, 3, 4)),
    -- The schedule a SCHEDULE level comes from.
    ADD COLUMN schedule_building text,
    ADD COLUMN schedule_id text,
    ADD CONSTRAINT setpoint_levels_schedule_source
        CHECK ((level = 2) = (schedule_building IS NOT NULL AND schedule_id IS NOT NULL));

ALTER TABLE setpoint_history ADD COLUMN schedule_id text;

-- A building's pass finds the levels its schedules wrote to sensors that have left it.
CREATE INDEX setpoint_levels_by_schedule ON setpoint_levels (schedule_building)
    WHERE level = 2;

-- A sensor moved to another building stops following the old building's schedule in the same
-- change; the new building's next pass writes its own. Named to run before setpoints_notify.
CREATE FUNCTION setpoints_drop_moved_schedule() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM setpoint_levels
    WHERE sensor_id = NEW.sensor_id AND level = 2 AND schedule_building <> NEW.building_id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER setpoints_drop_moved_schedule AFTER UPDATE ON setpoints
    FOR EACH ROW WHEN (NEW.building_id IS DISTINCT FROM OLD.building_id)
    EXECUTE FUNCTION setpoints_drop_moved_schedule();

-- Named values a schedule's periods refer to (`comfort`, `eco`, `away`). A deletion keeps the
-- row as a tombstone, so that revisions go on if the name is used again.
CREATE TABLE presets (
    building_id        text             NOT NULL,
    name               text             NOT NULL,
    desired_celsius    double precision NOT NULL CHECK (desired_celsius BETWEEN -50 AND 100),
    up_delta_celsius   double precision NOT NULL CHECK (up_delta_celsius BETWEEN 0 AND 20),
    down_delta_celsius double precision NOT NULL CHECK (down_delta_celsius BETWEEN 0 AND 20),
    revision           bigint           NOT NULL CHECK (revision >= 1),
    update_time        timestamptz      NOT NULL,
    updated_by         text             NOT NULL,
    reason             text             NOT NULL DEFAULT '' CHECK (char_length(reason) <= 256),
    deleted            boolean          NOT NULL DEFAULT false,
    PRIMARY KEY (building_id, name)
);

CREATE TABLE preset_history (LIKE presets, change_time timestamptz NOT NULL,
                             PRIMARY KEY (building_id, name, revision));

-- `sensor_ids` empty: every sensor of the building that no other schedule names.
CREATE TABLE schedules (
    building_id text        NOT NULL,
    schedule_id text        NOT NULL,
    sensor_ids  text[]      NOT NULL DEFAULT '{}',
    time_zone   text        NOT NULL,
    body        jsonb       NOT NULL,
    revision    bigint      NOT NULL CHECK (revision >= 1),
    update_time timestamptz NOT NULL,
    updated_by  text        NOT NULL,
    reason      text        NOT NULL DEFAULT '' CHECK (char_length(reason) <= 256),
    deleted     boolean     NOT NULL DEFAULT false,
    -- When the building's SCHEDULE levels are next due to change: its next transition.
    next_check  timestamptz,
    PRIMARY KEY (building_id, schedule_id)
);

CREATE INDEX schedules_due ON schedules (next_check) WHERE NOT deleted;
CREATE UNIQUE INDEX schedules_one_for_the_building ON schedules (building_id)
    WHERE NOT deleted AND sensor_ids = '{}';

CREATE TABLE schedule_history (LIKE schedules EXCLUDING INDEXES, change_time timestamptz NOT NULL,
                               PRIMARY KEY (building_id, schedule_id, revision));
ALTER TABLE schedule_history DROP COLUMN next_check;

-- Every new revision of a preset or schedule is its history row: one place writes it.
CREATE FUNCTION presets_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.revision <> OLD.revision THEN
        INSERT INTO preset_history
        SELECT NEW.*, NEW.update_time;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER presets_history AFTER INSERT OR UPDATE ON presets
    FOR EACH ROW EXECUTE FUNCTION presets_history();

CREATE FUNCTION schedules_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.revision <> OLD.revision THEN
        INSERT INTO schedule_history (building_id, schedule_id, sensor_ids, time_zone, body,
                                      revision, update_time, updated_by, reason, deleted,
                                      change_time)
        VALUES (NEW.building_id, NEW.schedule_id, NEW.sensor_ids, NEW.time_zone, NEW.body,
                NEW.revision, NEW.update_time, NEW.updated_by, NEW.reason, NEW.deleted,
                NEW.update_time);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER schedules_history AFTER INSERT OR UPDATE ON schedules
    FOR EACH ROW EXECUTE FUNCTION schedules_history();
