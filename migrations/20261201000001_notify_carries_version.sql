-- The setpoint notification carries the new version itself, so that every replica updates its
-- cache from the notification instead of reading the row back: that re-read cost the database
-- as much again as the write (BENCHMARKS.md, benchmark 3), and a batched re-read of many rows
-- could be planned as a sequential scan.
--
-- Only what the control loop needs. The ids are at most 128 characters from a set JSON never
-- escapes, so the payload stays far below NOTIFY's limit of 8000 bytes (past it the write would
-- fail). `extra_float_digits = 1` makes the temperatures' text exact whatever the writing
-- session has set. A replica of an earlier version cannot read this payload: it ignores it and
-- catches up at its next full resync (SETPOINT_RESYNC_INTERVAL).
CREATE OR REPLACE FUNCTION setpoints_notify() RETURNS trigger LANGUAGE plpgsql
SET extra_float_digits = 1 AS $$
BEGIN
    PERFORM pg_notify('thermostat_setpoints', json_build_object(
        'sensor_id', NEW.sensor_id,
        'building_id', NEW.building_id,
        'desired_celsius', NEW.desired_celsius,
        'up_delta_celsius', NEW.up_delta_celsius,
        'down_delta_celsius', NEW.down_delta_celsius,
        'revision', NEW.revision,
        'deleted', NEW.deleted)::text);
    RETURN NULL;
END;
$$;
