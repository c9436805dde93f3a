-- Setpoints and their history.
--
-- A deleted setpoint stays in `setpoints` as a tombstone (`deleted = true`) so that the
-- per-sensor revision keeps counting across delete and re-create: a revision is never reused,
-- which keeps history keys unique and lets caches on other replicas order changes by revision.
-- The CHECK constraints repeat the API's validation as a backstop; NaN and +-Infinity fail them
-- because they are outside every BETWEEN range in PostgreSQL.

CREATE TABLE setpoints (
    sensor_id          text             NOT NULL PRIMARY KEY
                       CHECK (sensor_id ~ '^[A-Za-z0-9._:/-]{1,128}$'),
    building_id        text             NOT NULL
                       CHECK (building_id ~ '^[A-Za-z0-9._:/-]{1,128}$'),
    desired_celsius    double precision NOT NULL CHECK (desired_celsius BETWEEN -50 AND 100),
    up_delta_celsius   double precision NOT NULL CHECK (up_delta_celsius BETWEEN 0 AND 20),
    down_delta_celsius double precision NOT NULL CHECK (down_delta_celsius BETWEEN 0 AND 20),
    revision           bigint           NOT NULL CHECK (revision >= 1),
    update_time        timestamptz      NOT NULL,
    updated_by         text             NOT NULL,
    reason             text             NOT NULL DEFAULT '' CHECK (char_length(reason) <= 256),
    deleted            boolean          NOT NULL DEFAULT false
);

-- ListSetpoints filtered by building, in sensor order.
CREATE INDEX setpoints_live_by_building ON setpoints (building_id, sensor_id) WHERE NOT deleted;

CREATE TABLE setpoint_history (
    sensor_id          text             NOT NULL,
    revision           bigint           NOT NULL,
    building_id        text             NOT NULL,
    -- NULL exactly when the change is a deletion.
    desired_celsius    double precision,
    up_delta_celsius   double precision,
    down_delta_celsius double precision,
    deleted            boolean          NOT NULL,
    change_time        timestamptz      NOT NULL,
    changed_by         text             NOT NULL,
    reason             text             NOT NULL DEFAULT '',
    PRIMARY KEY (sensor_id, revision),
    CHECK (deleted = (desired_celsius IS NULL))
);

-- Other replicas keep an in-memory cache of setpoints; this tells them which row to re-read.
-- The payload is only a hint ("sensor_id"); listeners re-read the row and never trust it.
CREATE FUNCTION setpoints_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('thermostat_setpoints', NEW.sensor_id);
    RETURN NULL;
END;
$$;

CREATE TRIGGER setpoints_notify AFTER INSERT OR UPDATE ON setpoints
    FOR EACH ROW EXECUTE FUNCTION setpoints_notify();
