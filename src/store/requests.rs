//! Writes made with a request id (AIP-155): recorded by the write's own statement (`PUT_SQL`,
//! `DELETE_SQL`), looked up by a retry, forgotten after the window.

use std::time::Duration;

use super::setpoints::{HistoryEntry, HistoryRow};
use super::Store;
use crate::error::Result;

/// The request id of a write, and what it asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRequest {
    /// Whose: the kind of credential and the subject (ids are per caller).
    pub caller: String,
    pub id: String,
    /// The request itself, written out, to refuse the same id with another request.
    pub request: String,
}

/// A write recorded under a request id: what was asked, and the history entry it wrote.
#[derive(Debug, Clone)]
pub struct RecordedWrite {
    pub request: String,
    pub outcome: HistoryEntry,
}

#[derive(sqlx::FromRow)]
struct RecordedRow {
    request: String,
    #[sqlx(flatten)]
    history: HistoryRow,
}

fn interval(window: Duration) -> String {
    format!("{} milliseconds", window.as_millis())
}

impl Store {
    /// The write `caller` made with `request_id` within `window`, if any.
    pub async fn recorded_write(
        &self,
        caller: &str,
        request_id: &str,
        window: Duration,
    ) -> Result<Option<RecordedWrite>> {
        let row: Option<RecordedRow> = sqlx::query_as(
            "SELECT r.request, h.sensor_id, h.revision, h.building_id, h.desired_celsius, \
                    h.up_delta_celsius, h.down_delta_celsius, h.change_time, h.changed_by, \
                    h.reason, h.level, h.expire_time, h.schedule_id \
             FROM write_requests r \
             JOIN setpoint_history h ON h.sensor_id = r.sensor_id AND h.revision = r.revision \
             WHERE r.caller = $1 AND r.request_id = $2 \
               AND r.created_at > now() - $3::interval",
        )
        .bind(caller)
        .bind(request_id)
        .bind(interval(window))
        .fetch_optional(self.pool())
        .await?;
        row.map(|row| {
            Ok(RecordedWrite {
                request: row.request,
                outcome: row.history.into_entry()?,
            })
        })
        .transpose()
    }

    /// Forgets the writes recorded before `window`; returns how many.
    pub async fn forget_writes(&self, window: Duration) -> Result<u64> {
        let done =
            sqlx::query("DELETE FROM write_requests WHERE created_at < now() - $1::interval")
                .bind(interval(window))
                .execute(self.pool())
                .await?;
        Ok(done.rows_affected())
    }
}
