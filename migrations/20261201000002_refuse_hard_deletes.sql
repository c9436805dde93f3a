-- A setpoint is deleted by DeleteSetpoint, which leaves a tombstone (`deleted = true`) under a
-- new revision. A row removed by SQL instead was never noticed by the replicas (the
-- notification trigger fires on INSERT and UPDATE, and a full re-read cannot see a missing row),
-- which went on controlling the sensor; and re-creating the sensor then failed, its revision 1
-- already in the history. So a DELETE or TRUNCATE of `setpoints` is refused. To purge a sensor
-- for good, an administrator does it in one transaction, and restarts the replicas after:
--   BEGIN; ALTER TABLE setpoints DISABLE TRIGGER setpoints_no_delete;
--   DELETE FROM setpoints WHERE ...; DELETE FROM setpoint_history WHERE ...;
--   ALTER TABLE setpoints ENABLE TRIGGER setpoints_no_delete; COMMIT;
CREATE FUNCTION setpoints_refuse_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'setpoints are deleted with DeleteSetpoint (a tombstone row), not by SQL'
        USING ERRCODE = 'restrict_violation',
              HINT = 'DeleteSetpoint keeps the replicas and the history informed';
END;
$$;

CREATE TRIGGER setpoints_no_delete BEFORE DELETE ON setpoints
    FOR EACH ROW EXECUTE FUNCTION setpoints_refuse_delete();
CREATE TRIGGER setpoints_no_truncate BEFORE TRUNCATE ON setpoints
    FOR EACH STATEMENT EXECUTE FUNCTION setpoints_refuse_delete();
