//! `thermostat.v1.HeaterControlService`: live heater commands and per-sensor state.

use std::pin::Pin;
use std::time::Duration;

use futures::{FutureExt, Stream};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::authorize;
use super::convert::setpoint_to_proto;
use super::limits::{Limits, SubscriptionSlot};
use crate::domain::{Action, BuildingId, Identity, Scope, SensorId, ValidationError};
use crate::error::{Error, Result};
use crate::proto::timestamp;
use crate::proto::v1 as pb;
use crate::security::{Authenticator, Credentials};
use crate::store::Store;
use crate::stream::engine::{Filter, LiveEvent, SnapshotCoverage, SnapshotCursor, SnapshotPart};
use crate::stream::ControlHandle;
use crate::telemetry;

pub struct HeaterApi {
    control: ControlHandle,
    store: Store,
    limits: Limits,
    /// Checks an open subscription's credentials again every `recheck`.
    auth: Authenticator,
    recheck: Duration,
    shutdown: CancellationToken,
}

impl HeaterApi {
    pub fn new(
        control: ControlHandle,
        store: Store,
        limits: Limits,
        auth: Authenticator,
        recheck: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            control,
            store,
            limits,
            auth,
            recheck,
            shutdown,
        }
    }

    async fn state(
        &self,
        who: &Identity,
        req: pb::GetSensorStateRequest,
    ) -> Result<pb::SensorState> {
        let sensor = SensorId::parse(req.sensor_id)?;
        let not_found = || Error::NotFound {
            kind: "sensor",
            id: sensor.to_string(),
        };
        // Read without a scope: a setpoint of another building must hide the whole sensor, not
        // just its setpoint.
        let row = self.store.sensor_setpoint(&sensor).await?;
        let view = self
            .control
            .sensor(sensor.clone())
            .await
            .ok_or(Error::ShuttingDown)?;
        // The sensor's building: its setpoint row's, also a deleted one (moved to another
        // building and deleted there, it is that building's, not the one of its last command),
        // else its last command's. A sensor known only by its readings belongs to no building
        // yet, so only callers with `*` see it.
        let (row_building, setpoint) = row.unzip();
        let setpoint = setpoint.flatten();
        let building =
            row_building.or_else(|| view.last_command.as_ref().map(|e| e.building_id.clone()));
        let visible = match &building {
            Some(building) => who.scope.contains_str(building),
            None => who.scope == Scope::All,
        };
        if !visible
            || (setpoint.is_none() && view.last_reading.is_none() && view.last_command.is_none())
        {
            return Err(not_found());
        }
        let setpoint = setpoint.as_ref().map(setpoint_to_proto);
        // A sensor moved between buildings keeps the last command sent while it was elsewhere;
        // that command belongs to the other building.
        let last_command = view
            .last_command
            .filter(|e| who.scope.contains_str(&e.building_id));
        Ok(pb::SensorState {
            sensor_id: sensor.to_string(),
            setpoint,
            last_reading: view.last_reading.map(|r| pb::SensorReading {
                sensor_id: sensor.to_string(),
                temperature_celsius: Some(r.temperature.value()),
                reading_time: Some(timestamp(r.time)),
            }),
            last_command,
        })
    }

    async fn subscribe(
        &self,
        who: Identity,
        credentials: Credentials,
        req: pb::SubscribeHeaterCommandsRequest,
    ) -> Result<EventStream> {
        let sensors = req
            .sensor_ids
            .into_iter()
            .map(|id| {
                SensorId::parse(id).map_err(|e| ValidationError::new("sensor_ids", e.message))
            })
            .collect::<Result<_, _>>()?;
        let building = match req.building_id.as_str() {
            "" => None,
            id => Some(BuildingId::parse(id)?),
        };
        let filter = Filter { sensors, building };
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let slot = self.limits.subscription(&who.subject)?;
        // Subscribe before taking the snapshot, so no command falls between the two; the
        // overlap is told by the live events' numbers (`SnapshotCoverage`).
        let live = self.control.subscribe();
        // The first part now, so that a loop that is stopping fails the call itself.
        let mut sent = SnapshotCoverage::default();
        let snapshot = if req.send_initial_state {
            let part = self
                .control
                .snapshot(filter.clone(), SnapshotCursor::default())
                .await
                .ok_or(Error::ShuttingDown)?;
            sent.add(&part);
            part
        } else {
            SnapshotPart::default()
        };
        let subscription = Subscription {
            sent,
            snapshot: snapshot.events.into_iter(),
            more: snapshot.next,
            control: self.control.clone(),
            live,
            catches_up: req.send_initial_state,
            filter,
            scope: who.scope,
            credentials,
            recheck: tokio::time::interval_at(
                tokio::time::Instant::now() + self.recheck,
                self.recheck,
            ),
            shutdown: self.shutdown.clone(),
            ended: false,
            events_sent: metrics::counter!(telemetry::SUBSCRIBER_EVENTS),
            _slot: slot,
        };
        metrics::gauge!(telemetry::SUBSCRIBERS).increment(1.0);
        Ok(Box::pin(futures::stream::unfold(
            subscription,
            Subscription::next,
        )))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::HeaterCommandEvent, Status>> + Send>>;

/// One subscriber's stream, reading the shared broadcast only when the client reads. One that
/// falls behind the buffer is caught up from the heaters' last commands if it asked for the
/// initial state (sent as a snapshot, then live again), else ended with RESOURCE_EXHAUSTED.
struct Subscription {
    /// The part of the snapshot (or catch-up) not sent yet, and where the next part starts:
    /// parts are taken from the engine as the client reads.
    snapshot: std::vec::IntoIter<pb::HeaterCommandEvent>,
    more: Option<SnapshotCursor>,
    control: ControlHandle,
    live: broadcast::Receiver<LiveEvent>,
    /// Whether falling behind is caught up from the engine's state rather than the end.
    catches_up: bool,
    filter: Filter,
    /// The caller's buildings: commands of others are never sent, whatever the filter says.
    scope: Scope,
    /// Checked again every `recheck`: an expired or revoked credential ends the stream, and a
    /// narrowed scope applies from then on.
    credentials: Credentials,
    recheck: tokio::time::Interval,
    /// What the snapshot (or the last catch-up) sent: drops the live events it already
    /// reflects, and tells a catch-up what is newer.
    sent: SnapshotCoverage,
    shutdown: CancellationToken,
    ended: bool,
    /// Events handed to the stream (a handle, so that counting one is an atomic add).
    events_sent: metrics::Counter,
    /// Counts against the caller's subscription limit while the stream is open.
    _slot: SubscriptionSlot,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        metrics::gauge!(telemetry::SUBSCRIBERS).decrement(1.0);
    }
}

/// How a stream ends when the server stops under it.
fn shutting_down() -> Status {
    Status::unavailable("server shutting down; subscribe again")
}

impl Subscription {
    /// Authenticates the stream's credentials again; the new scope replaces the old one.
    fn reauthenticate(&mut self) -> Result<(), Status> {
        let who = self.credentials.authenticate()?;
        who.check(Action::Read)
            .map_err(|denied| Status::from(Error::PermissionDenied(denied.to_string())))?;
        self.scope = who.scope;
        Ok(())
    }

    /// The stream's last item: `status`; the next call ends the stream.
    fn end(mut self, status: Status) -> Option<(Result<pb::HeaterCommandEvent, Status>, Self)> {
        self.ended = true;
        Some((Err(status), self))
    }

    async fn next(mut self) -> Option<(Result<pb::HeaterCommandEvent, Status>, Self)> {
        if self.ended {
            return None;
        }
        loop {
            if let Some(event) = self.snapshot.next() {
                if !self.scope.contains_str(&event.building_id) {
                    continue;
                }
                let event = pb::HeaterCommandEvent {
                    snapshot: true,
                    ..event
                };
                self.events_sent.increment(1);
                return Some((Ok(event), self));
            }
            if let Some(from) = self.more.take() {
                // The recheck is otherwise only awaited with the live feed: a snapshot of a
                // million heaters to a slow client must not outlast a revoked credential.
                if self.recheck.tick().now_or_never().is_some() {
                    if let Err(status) = self.reauthenticate() {
                        return self.end(status);
                    }
                }
                let Some(part) = self.control.snapshot(self.filter.clone(), from).await else {
                    return self.end(shutting_down());
                };
                self.sent.add(&part);
                self.snapshot = part.events.into_iter();
                self.more = part.next;
                continue;
            }
            let received = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return self.end(shutting_down()),
                _ = self.recheck.tick() => {
                    if let Err(status) = self.reauthenticate() {
                        return self.end(status);
                    }
                    continue;
                }
                received = self.live.recv() => received,
            };
            match received {
                Ok(live) => {
                    let event = &live.event;
                    if !self.filter.matches(event)
                        || !self.scope.contains_str(&event.building_id)
                        || self.sent.covers(&live)
                    {
                        continue;
                    }
                    self.events_sent.increment(1);
                    return Some((Ok((**event).clone()), self));
                }
                Err(RecvError::Lagged(missed)) if self.catches_up => {
                    metrics::counter!(telemetry::SUBSCRIBERS_BEHIND, "outcome" => "caught_up")
                        .increment(1);
                    tracing::debug!(missed, "subscriber fell behind; catching up");
                    // A fresh place in the feed before the catch-up's first part is taken, as
                    // for the snapshot: what the parts reflect is told by the numbers again.
                    self.live = self.control.subscribe();
                    let sent = std::mem::take(&mut self.sent);
                    self.more = Some(SnapshotCursor::catch_up(sent));
                }
                Err(RecvError::Lagged(missed)) => {
                    metrics::counter!(telemetry::SUBSCRIBERS_BEHIND, "outcome" => "ended")
                        .increment(1);
                    return self.end(Status::resource_exhausted(format!(
                        "subscriber fell behind by {missed} commands; subscribe again with send_initial_state"
                    )));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

#[tonic::async_trait]
impl pb::heater_control_service_server::HeaterControlService for HeaterApi {
    type SubscribeHeaterCommandsStream = EventStream;

    async fn subscribe_heater_commands(
        &self,
        request: Request<pb::SubscribeHeaterCommandsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let who = authorize(&request, Action::Read)?;
        let credentials = Credentials::of(&request, self.auth.clone());
        Ok(Response::new(
            self.subscribe(who, credentials, request.into_inner())
                .await?,
        ))
    }

    async fn get_sensor_state(
        &self,
        request: Request<pb::GetSensorStateRequest>,
    ) -> Result<Response<pb::SensorState>, Status> {
        let who = authorize(&request, Action::Read)?;
        Ok(Response::new(self.state(&who, request.into_inner()).await?))
    }
}
