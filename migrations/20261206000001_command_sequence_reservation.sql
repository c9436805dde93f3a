-- Heater command sequences must stay above every sequence ever issued, even when the command
-- topic loses a sensor's records. A replica reserves sequences here before it produces them,
-- and a sensor without a known last command starts above what was reserved (stream::sequences).
CREATE TABLE command_sequence_reservation (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    -- No command was produced with a sequence above this.
    reserved bigint NOT NULL CHECK (reserved >= 0)
);
INSERT INTO command_sequence_reservation (reserved) VALUES (0);
