//! Sequences that never go back, even when the command topic loses a sensor's records (a
//! deleted topic, a lost broker). A replica produces a sequence only once PostgreSQL holds a
//! reservation at least as high, and a sensor whose last command it does not know starts above
//! every reservation made before its partition was assigned.

use std::time::Duration;

use crate::store::Store;

use super::StreamError;

/// Sequences reserved at a time: one database round trip per this many of the highest
/// sequence's steps. A sensor first commanded after a reassignment starts up to this far above
/// the last sequence issued anywhere.
const BLOCK: u64 = 1000;
/// How long a reservation is retried while the database is unreachable before the loop stops.
const RETRY_FOR: Duration = Duration::from_secs(30);

pub struct Sequences {
    /// `None` only in unit tests of the engine, which never lose a topic.
    store: Option<Store>,
    /// No sequence above this is produced before a new reservation.
    reserved: u64,
    /// A sensor without a known last command numbers its first command above this.
    floor: u64,
}

impl Sequences {
    pub fn new(store: Store) -> Self {
        Self {
            store: Some(store),
            reserved: 0,
            floor: 0,
        }
    }

    #[cfg(test)]
    pub fn unreserved() -> Self {
        Self {
            store: None,
            reserved: u64::MAX,
            floor: 0,
        }
    }

    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Raises the floor to every sequence reserved so far: called on an assignment, after the
    /// partitions' previous owners stopped producing.
    pub async fn raise_floor(&mut self) -> Result<(), StreamError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        self.floor = retry(|| store.sequences_reserved()).await?;
        Ok(())
    }

    /// Waits until `sequence` is reserved.
    pub async fn cover(&mut self, sequence: u64) -> Result<(), StreamError> {
        if sequence <= self.reserved {
            return Ok(());
        }
        let Some(store) = &self.store else {
            return Ok(());
        };
        self.reserved = retry(|| store.reserve_sequences(sequence, BLOCK)).await?;
        Ok(())
    }
}

async fn retry<F, Fut>(mut call: F) -> Result<u64, StreamError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::error::Result<u64>>,
{
    let give_up = tokio::time::Instant::now() + RETRY_FOR;
    let mut pause = Duration::from_millis(100);
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(e) if tokio::time::Instant::now() >= give_up => return Err(StreamError::Store(e)),
            Err(e) => {
                tracing::warn!(error = %e, "reserving command sequences; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}
