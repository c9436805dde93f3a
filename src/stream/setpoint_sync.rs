//! Keeps the engine's setpoint cache current on every replica. A NOTIFY from the database, sent
//! by a trigger on every committed change whoever made it, carries the new version, which goes
//! to the engine as it is (PostgreSQL lets any role that can connect to the database notify, so
//! the database must not be shared with untrusted roles). A full re-read happens whenever the
//! listener (re)connects, since notifications sent while it was away are lost, shortly after
//! notifications it cannot read, and every `SETPOINT_RESYNC_INTERVAL` as a safety net. The engine
//! ignores revisions older than the one it has, so a cached revision never goes backwards.
//! The heater settings (limits, out of service) ride along: a few rows, read whole on their
//! own NOTIFY and with every resync.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use sqlx::postgres::PgListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::engine::Input;
use super::stats::LoopStats;
use super::StreamError;
use crate::config::CelsiusRange;
use crate::domain::control;
use crate::domain::protection::Protection;
use crate::store::{SetpointVersion, Store, SETTINGS_CHANNEL};

/// The NOTIFY channel written by the `setpoints_notify` trigger (see migrations).
pub const CHANNEL: &str = "thermostat_setpoints";

/// Pause before reconnecting a failed listener.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// After a notification it cannot read, the listener resyncs once this much later, however
/// many more arrive meanwhile: a burst costs one full read, not one each.
const UNREADABLE_RESYNC_DELAY: Duration = Duration::from_secs(1);

/// Sends every setpoint version to the engine, and counts (and names one of) the setpoints
/// whose band no reading in `accepted` could switch.
async fn full_resync(
    store: &Store,
    engine: &mpsc::Sender<Input>,
    stats: &LoopStats,
    accepted: CelsiusRange,
) -> Result<(), StreamError> {
    let mut versions = std::pin::pin!(store.setpoint_versions());
    let mut count = 0u64;
    let (mut out_of_reach, mut example) = (0u64, None);
    while let Some(version) = versions.try_next().await.map_err(StreamError::Store)? {
        let unreachable = version
            .setpoint
            .as_ref()
            .and_then(|setpoint| control::out_of_reach(setpoint, &accepted.range()));
        if let Some(field) = unreachable {
            out_of_reach += 1;
            example.get_or_insert_with(|| (version.sensor_id.to_string(), field));
        }
        engine
            .send(Input::Setpoint(version))
            .await
            .map_err(|_| StreamError::Stopped("engine"))?;
        count += 1;
    }
    tracing::debug!(count, "setpoint resync");
    stats.out_of_reach.store(out_of_reach, Ordering::Relaxed);
    metrics::gauge!(crate::telemetry::SETPOINTS_OUT_OF_REACH).set(out_of_reach as f64);
    // Every full read, while it lasts: an operator narrowed the range under stored setpoints.
    if let Some((sensor, field)) = example {
        tracing::warn!(
            count = out_of_reach,
            example = %sensor,
            field,
            range = %accepted,
            "setpoints whose band lies outside READING_RANGE_CELSIUS: no accepted reading can switch their heaters both ways"
        );
    }
    LoopStats::bump(&stats.resyncs);
    crate::telemetry::record_resync();
    Ok(())
}

/// What keeps the engine's setpoint cache current: the database, the engine, and how
/// readings are judged and how often everything is read again.
pub struct Sync {
    pub store: Store,
    pub engine: mpsc::Sender<Input>,
    pub stats: Arc<LoopStats>,
    pub reading_range: CelsiusRange,
    pub resync_interval: Duration,
    /// The service's heater limits, under the buildings' and sensors' own.
    pub protection: Protection,
}

impl Sync {
    /// Keeps the cache current until `shutdown`. `loaded` is told once the first full read has
    /// been handed to the engine: the cache is complete from then on.
    pub async fn run(
        self,
        loaded: oneshot::Sender<()>,
        shutdown: CancellationToken,
    ) -> Result<(), StreamError> {
        let mut loaded = Some(loaded);
        while !shutdown.is_cancelled() {
            match self.listen(&mut loaded, &shutdown).await {
                Ok(()) => {}
                Err(e @ StreamError::Stopped(_)) => return Err(e),
                // Lost while listening: listen again, then read everything, at once.
                Err(StreamError::ListenerLost) => tracing::info!("setpoint listener reconnecting"),
                Err(e) => {
                    tracing::warn!(error = %e, "setpoint listener failed; reconnecting");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(RECONNECT_DELAY) => {}
                    }
                }
            }
        }
        Ok(())
    }

    async fn resync(&self) -> Result<(), StreamError> {
        self.reload_settings().await?;
        full_resync(&self.store, &self.engine, &self.stats, self.reading_range).await
    }

    /// Hands the whole heater settings table to the engine.
    async fn reload_settings(&self) -> Result<(), StreamError> {
        let table = self
            .store
            .heater_settings_table(self.protection)
            .await
            .map_err(StreamError::Store)?;
        self.engine
            .send(Input::Settings(Arc::new(table)))
            .await
            .map_err(|_| StreamError::Stopped("engine"))
    }

    async fn listen(
        &self,
        loaded: &mut Option<oneshot::Sender<()>>,
        shutdown: &CancellationToken,
    ) -> Result<(), StreamError> {
        let db = |e| StreamError::Store(crate::Error::from(e));
        let mut listener = PgListener::connect_with(self.store.pool())
            .await
            .map_err(db)?;
        listener
            .listen_all([CHANNEL, SETTINGS_CHANNEL])
            .await
            .map_err(db)?;
        // Listening first, then reading everything: no change can fall between the two.
        self.resync().await?;
        if let Some(loaded) = loaded.take() {
            let _ = loaded.send(());
        }
        let mut resync = tokio::time::interval(self.resync_interval);
        resync.reset();
        // Whether the next tick was brought forward for an unreadable notification.
        let mut forced = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = resync.tick() => {
                    forced = false;
                    self.resync().await?;
                }
                notification = listener.try_recv() => match notification.map_err(db)? {
                    Some(n) if n.channel() == SETTINGS_CHANNEL => self.reload_settings().await?,
                    // The notification carries the committed version: no need to read it back.
                    Some(notification) => match SetpointVersion::from_notification(notification.payload()) {
                        Ok(version) => self.engine
                            .send(Input::Setpoint(version))
                            .await
                            .map_err(|_| StreamError::Stopped("engine"))?,
                        // Not from our trigger's current version: what changed is unknown.
                        // Logged once per resync, not once per notification of a burst.
                        Err(e) if !forced => {
                            tracing::warn!(error = %e, "unreadable setpoint notification; resyncing shortly");
                            forced = true;
                            resync.reset_at(tokio::time::Instant::now() + UNREADABLE_RESYNC_DELAY);
                        }
                        Err(e) => tracing::debug!(error = %e, "unreadable setpoint notification"),
                    },
                    // The connection was lost: notifications may have been missed. PgListener
                    // would listen again only at the next call, after a resync made now: a
                    // change between the two would be missed for good. A new listener listens
                    // first, then reads.
                    None => return Err(StreamError::ListenerLost),
                },
            }
        }
    }
}
