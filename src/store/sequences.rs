//! The reservation of heater command sequences (see `stream::sequences`): one row that only
//! grows.

use super::Store;
use crate::error::Result;

impl Store {
    /// The highest sequence any replica may have produced.
    pub async fn sequences_reserved(&self) -> Result<u64> {
        let reserved: i64 = sqlx::query_scalar("SELECT reserved FROM command_sequence_reservation")
            .fetch_one(&self.pool)
            .await?;
        Ok(reserved as u64)
    }

    /// Reserves every sequence up to `through` (or more if already reserved) plus `ahead`, and
    /// returns the new reservation.
    pub async fn reserve_sequences(&self, through: u64, ahead: u64) -> Result<u64> {
        let reserved: i64 = sqlx::query_scalar(
            "UPDATE command_sequence_reservation \
             SET reserved = GREATEST(reserved, $1) + $2 RETURNING reserved",
        )
        .bind(i64::try_from(through).unwrap_or(i64::MAX))
        .bind(ahead as i64)
        .fetch_one(&self.pool)
        .await?;
        Ok(reserved as u64)
    }
}
