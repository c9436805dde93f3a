-- Heater settings per building (sensor_id = '') and per sensor in it: limits that override the
-- service's, field by field (NULL inherits), and out of service. Few rows; every replica reads
-- the whole table on a change (the NOTIFY below) and with every setpoint resync.

CREATE TABLE heater_settings (
    building_id           text        NOT NULL CHECK (building_id ~ '^[A-Za-z0-9._:/-]{1,128}$'),
    sensor_id             text        NOT NULL DEFAULT ''
                          CHECK (sensor_id = '' OR sensor_id ~ '^[A-Za-z0-9._:/-]{1,128}$'),
    -- Milliseconds, 0 to 7 days; 0 turns the limit off, NULL inherits it.
    min_on_ms             bigint      CHECK (min_on_ms BETWEEN 0 AND 604800000),
    min_off_ms            bigint      CHECK (min_off_ms BETWEEN 0 AND 604800000),
    max_run_ms            bigint      CHECK (max_run_ms BETWEEN 0 AND 604800000),
    run_cooldown_ms       bigint      CHECK (run_cooldown_ms BETWEEN 0 AND 604800000),
    keep_alive_ms         bigint      CHECK (keep_alive_ms BETWEEN 0 AND 604800000),
    out_of_service_since  timestamptz,
    out_of_service_reason text        NOT NULL DEFAULT ''
                          CHECK (char_length(out_of_service_reason) <= 256),
    out_of_service_by     text        NOT NULL DEFAULT '',
    keep_heater_state     boolean     NOT NULL DEFAULT false,
    revision              bigint      NOT NULL CHECK (revision >= 1),
    update_time           timestamptz NOT NULL,
    updated_by            text        NOT NULL,
    PRIMARY KEY (building_id, sensor_id)
);

-- Only a hint that something changed: listeners read the whole table again.
CREATE FUNCTION heater_settings_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('thermostat_heater_settings', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER heater_settings_notify AFTER INSERT OR UPDATE OR DELETE ON heater_settings
    FOR EACH STATEMENT EXECUTE FUNCTION heater_settings_notify();
