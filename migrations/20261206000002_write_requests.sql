-- Writes made with a request_id, so that a retry of one gets its first outcome instead of
-- writing again (AIP-155). Recorded in the statement of the write itself: a write and its
-- record land together or not at all. The outcome is the history entry at `revision`.
CREATE TABLE write_requests (
    -- The caller: its kind of credential and subject; request ids are per caller.
    caller     text        NOT NULL,
    request_id text        NOT NULL,
    -- What was asked, so that an id reused for another request is refused.
    request    text        NOT NULL,
    sensor_id  text        NOT NULL,
    revision   bigint      NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (caller, request_id)
);
-- The upkeep forgets records older than REQUEST_ID_WINDOW.
CREATE INDEX write_requests_by_age ON write_requests (created_at);
