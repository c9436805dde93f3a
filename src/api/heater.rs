//! `thermostat.v1.HeaterControlService`: live heater commands and per-sensor state.

use std::pin::Pin;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::convert::{
    effective_to_proto, level_entry_to_proto, segment_to_proto, setpoint_to_proto, values_to_proto,
};
use super::effective;
use super::equipment::{out_of_service_to_proto, protection_to_proto, EquipmentApi};
use super::limits::{Limits, Slot};
use super::{authorize, reader};
use crate::config::CelsiusRange;
use crate::domain::control::{self, Band, HeaterCommand};
use crate::domain::protection::{Gate, Limit, Protection, Switched};
use crate::domain::{Action, BuildingId, Celsius, Identity, Scope, SensorId, ValidationError};
use crate::error::{Error, Result};
use crate::proto::v1 as pb;
use crate::proto::{from_timestamp, timestamp};
use crate::security::{Authenticator, Credentials};
use crate::store::{Levels, Store};
use crate::stream::codec::{command_to_proto, limit_to_proto, reason_to_proto};
use crate::stream::engine::SensorView;
use crate::stream::feed::{Caller, Filter, Start, Subscription, Update};
use crate::stream::ControlHandle;
use tokio_stream::wrappers::BroadcastStream;

/// How far ahead a dry run, or a sensor state's next change, looks.
const MAX_DRY_RUN_AHEAD: chrono::TimeDelta = chrono::TimeDelta::days(31);

/// The longest `sensor_ids` filter: each snapshot part looks every id up.
pub const MAX_FILTER_SENSORS: usize = 1000;

/// What the loop decides by, for the calls that rehearse or explain its decisions.
#[derive(Debug, Clone, Copy)]
pub struct LoopRules {
    /// `READING_RANGE_CELSIUS`.
    pub readings: CelsiusRange,
    /// The heaters' limits.
    pub protection: Protection,
}

pub struct HeaterApi {
    control: ControlHandle,
    store: Store,
    limits: Limits,
    /// The readings the loop accepts (`READING_RANGE_CELSIUS`): what a dry run may ask about.
    readings: CelsiusRange,
    /// PutHeaterLimits, GetHeaterSettings, SetOutOfService.
    equipment: EquipmentApi,
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
        rules: LoopRules,
        auth: Authenticator,
        recheck: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            equipment: EquipmentApi::new(store.clone(), limits.clone(), rules.protection),
            control,
            store,
            limits,
            readings: rules.readings,
            auth,
            recheck,
            shutdown,
        }
    }

    /// Where the effective setpoint comes from (its level's entry), and its next change as the
    /// levels and the schedule stand: the second segment from now.
    async fn source_and_next(
        &self,
        levels: &Levels,
        sensor: &SensorId,
        scope: &Scope,
        now: DateTime<Utc>,
    ) -> Result<(Option<pb::SetpointLevelEntry>, Option<pb::PreviewSegment>)> {
        let source = levels
            .entries
            .iter()
            .find(|e| e.level == levels.effective)
            .map(level_entry_to_proto);
        let next =
            effective::effective_between(&self.store, sensor, scope, now, now + MAX_DRY_RUN_AHEAD)
                .await?
                .into_iter()
                .nth(1)
                .map(segment_to_proto);
        Ok((source, next))
    }

    /// Until when `last` holds under `protection`, if beyond `now`; when its run ends, if it
    /// is an ON; and when it is next repeated, for a keep-alive.
    fn holds(
        protection: &Protection,
        last: &pb::HeaterCommandEvent,
        now: DateTime<Utc>,
    ) -> [Option<prost_types::Timestamp>; 3] {
        let switched = Self::switched(last);
        let hold = switched
            .as_ref()
            .map(|last| protection.hold_until(last))
            .filter(|until| *until > now);
        let run = switched.as_ref().and_then(|last| protection.run_ends(last));
        let sent = last.decided_at.as_ref().and_then(from_timestamp);
        let repeat = switched
            .zip(sent)
            .and_then(|(s, sent)| protection.next_repeat(&s, sent));
        [hold, run, repeat].map(|t| t.map(timestamp))
    }

    /// The last command as its hold counts it, if it names a command and when it switched.
    fn switched(last: &pb::HeaterCommandEvent) -> Option<Switched> {
        let command = match last.command() {
            pb::HeaterCommand::On => HeaterCommand::On,
            pb::HeaterCommand::Off => HeaterCommand::Off,
            pb::HeaterCommand::Unspecified => return None,
        };
        Some(Switched {
            command,
            at: from_timestamp(last.switched_at.as_ref().or(last.decided_at.as_ref())?)?,
            forced_off: last.reason() == pb::CommandReason::MaxRunTime,
        })
    }

    /// Until when, and by which limit, the last command's hold keeps a switch to `wanted` at
    /// `at` back; never when SAFETY decides (`safety`).
    fn held_back(
        protection: &Protection,
        wanted: Option<HeaterCommand>,
        last: Option<&Switched>,
        at: DateTime<Utc>,
        safety: bool,
    ) -> Option<(DateTime<Utc>, Limit)> {
        let last = last?;
        match protection.gate(wanted?, Some(last), at, safety) {
            Gate::After(until) => Some((until, Protection::holding_limit(last))),
            Gate::Now => None,
        }
    }

    /// What the loop would decide for `req`, with no side effect.
    async fn dry_run_answer(
        &self,
        who: &Identity,
        req: pb::DryRunRequest,
    ) -> Result<pb::DryRunResponse> {
        let sensor = SensorId::parse(req.sensor_id)?;
        let celsius = Celsius::new(req.temperature_celsius)
            .filter(|c| self.readings.contains(c.value()))
            .ok_or_else(|| {
                ValidationError::new(
                    "temperature_celsius",
                    format!(
                        "must be a finite number within READING_RANGE_CELSIUS {}",
                        self.readings
                    ),
                )
            })?;
        let now = Utc::now();
        let at = match &req.time {
            None => now,
            Some(t) => from_timestamp(t)
                .filter(|t| *t <= now + MAX_DRY_RUN_AHEAD)
                .ok_or_else(|| {
                    ValidationError::new("time", "must be a valid time at most 31 days ahead")
                })?
                .max(now),
        };
        let segment = effective::effective_at(&self.store, &sensor, &who.scope, at).await?;
        let values = segment.values;
        let lower = values.desired.value() - values.down_delta.value();
        let upper = values.desired.value() + values.up_delta.value();
        let decided = control::rule(Band::from_thresholds(lower, upper), celsius);
        let view = self
            .control
            .sensor(sensor.clone())
            .await
            .ok_or(Error::ShuttingDown)?;
        let last_command = view
            .last_command
            .filter(|e| who.scope.contains_str(&e.building_id));
        // Out of service, nothing is sent.
        let would_send = view.settings.out_of_service.is_none()
            && decided.is_some_and(|(command, _)| {
                last_command
                    .as_ref()
                    .is_none_or(|last| last.command() != command_to_proto(command))
            });
        let (schedule_id, preset) = segment.tag.unwrap_or_default();
        let protection = &view.settings.protection;
        let switched = last_command.as_ref().and_then(Self::switched);
        let safety = segment.level == crate::domain::levels::Level::Safety;
        let wanted = decided.filter(|_| would_send).map(|(command, _)| command);
        let held = Self::held_back(protection, wanted, switched.as_ref(), at, safety);
        Ok(pb::DryRunResponse {
            deferred_until: held.map(|(until, _)| timestamp(until)),
            limit: held.map_or(0, |(_, limit)| limit_to_proto(limit) as i32),
            // Out of service nothing is sent, not even a maximum run's OFF.
            run_ends: switched
                .filter(|_| view.settings.out_of_service.is_none())
                .and_then(|last| protection.run_ends(&last))
                .map(timestamp),
            out_of_service: view.settings.out_of_service.is_some(),
            sensor_id: sensor.to_string(),
            time: Some(timestamp(at)),
            command: decided.map_or(0, |(c, _)| command_to_proto(c) as i32),
            reason: decided.map_or(0, |(_, r)| reason_to_proto(r) as i32),
            would_send,
            level: i32::from(segment.level.number()),
            values: Some(values_to_proto(&values)),
            lower_celsius: lower,
            upper_celsius: upper,
            schedule_id,
            preset,
            last_command,
        })
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
        // The level in force, when the setpoint is live and visible.
        let levels = match &setpoint {
            Some(_) => Some(self.store.levels(&sensor, &who.scope).await?),
            None => None,
        };
        let setpoint = setpoint.as_ref().map(setpoint_to_proto);
        let controlled = setpoint.is_some();
        let now = Utc::now();
        let (effective_source, next_change) = match &levels {
            Some(levels) => {
                self.source_and_next(levels, &sensor, &who.scope, now)
                    .await?
            }
            None => (None, None),
        };
        // A sensor moved between buildings keeps the last command sent while it was elsewhere;
        // that command belongs to the other building.
        let last_command = view
            .last_command
            .clone()
            .filter(|e| who.scope.contains_str(&e.building_id));
        let state = Self::equipment_state(who, &view, last_command.as_ref(), controlled, now);
        Ok(pb::SensorState {
            sensor_id: sensor.to_string(),
            setpoint,
            reading_age: view.last_reading.and_then(|r| {
                // Received on another replica whose clock runs ahead: zero, not absent.
                let age = (now - r.received).max(chrono::TimeDelta::zero());
                prost_types::Duration::try_from(age.to_std().ok()?).ok()
            }),
            effective_source,
            next_change,
            last_reading: view.last_reading.map(|r| pb::SensorReading {
                sensor_id: sensor.to_string(),
                temperature_celsius: Some(r.temperature.value()),
                reading_time: Some(timestamp(r.time)),
            }),
            last_command,
            setpoint_level: levels
                .as_ref()
                .map_or(0, |l| i32::from(l.effective.number())),
            effective_setpoint: levels.as_ref().and_then(effective_to_proto),
            ..state
        })
    }

    /// The heater's side of a sensor's state: holds in force, limits, out of service, keep-alive
    /// and reported state.
    fn equipment_state(
        who: &Identity,
        view: &SensorView,
        last_command: Option<&pb::HeaterCommandEvent>,
        controlled: bool,
        now: DateTime<Utc>,
    ) -> pb::SensorState {
        let settings = &view.settings;
        let [hold_until, run_ends, next_keep_alive] = match last_command {
            Some(last) => Self::holds(&settings.protection, last, now),
            None => [None, None, None],
        };
        pb::SensorState {
            hold_until,
            run_ends,
            // Repeated only for a controlled heater in service that follows its command.
            next_keep_alive: next_keep_alive.filter(|_| {
                controlled
                    && settings.out_of_service.is_none()
                    && view.status.as_ref().is_none_or(|s| s.following)
            }),
            out_of_service: settings
                .out_of_service
                .as_ref()
                .map(out_of_service_to_proto),
            limits: Some(protection_to_proto(&settings.protection)),
            heater_status: view
                .status
                .clone()
                .filter(|status| who.scope.contains_str(&status.building_id)),
            ..pb::SensorState::default()
        }
    }

    /// Opens a feed of the heaters `sensor_ids` and `building_id` pick, within the caller's
    /// buildings, rechecking its credentials while open; the slot counts it against the
    /// caller's subscription limit while it is open.
    async fn open(
        &self,
        who: Identity,
        credentials: Credentials,
        sensor_ids: Vec<String>,
        building_id: &str,
        start: Start,
    ) -> Result<(Subscription, Slot, Filter)> {
        if sensor_ids.len() > MAX_FILTER_SENSORS {
            return Err(ValidationError::new(
                "sensor_ids",
                format!("at most {MAX_FILTER_SENSORS} ids; subscribe by building_id for more"),
            )
            .into());
        }
        let sensors = sensor_ids
            .into_iter()
            .map(|id| {
                SensorId::parse(id).map_err(|e| ValidationError::new("sensor_ids", e.message))
            })
            .collect::<Result<_, _>>()?;
        let building = match building_id {
            "" => None,
            id => Some(BuildingId::parse(id)?),
        };
        let filter = Filter {
            sensors,
            building,
            scope: who.scope,
        };
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let slot = self.limits.subscription(&who.subject)?;
        let caller = Caller {
            recheck: Box::new(move || {
                let who = credentials.authenticate()?;
                who.check(Action::Read)
                    .map_err(|denied| Error::PermissionDenied(denied.to_string()))?;
                Ok(who.scope)
            }),
            every: self.recheck,
        };
        let subscription = self
            .control
            .open_feed(filter.clone(), start, caller, self.shutdown.clone())
            .await
            .ok_or(Error::ShuttingDown)?;
        Ok((subscription, slot, filter))
    }

    async fn subscribe(
        &self,
        who: Identity,
        credentials: Credentials,
        req: pb::SubscribeHeaterCommandsRequest,
    ) -> Result<EventStream> {
        let start = Start {
            initial_state: req.send_initial_state,
            ..Start::default()
        };
        let (subscription, slot, _) = self
            .open(who, credentials, req.sensor_ids, &req.building_id, start)
            .await?;
        Ok(Box::pin(subscription.into_stream().filter_map(
            move |item| {
                let _open = &slot;
                std::future::ready(match item {
                    Ok(Update::Event(event)) => Some(Ok(event)),
                    Ok(Update::SnapshotComplete) => None,
                    Err(end) => Some(Err(Status::from(end))),
                })
            },
        )))
    }

    async fn watch(
        &self,
        who: Identity,
        credentials: Credentials,
        req: pb::WatchHeaterCommandsRequest,
    ) -> Result<WatchStream> {
        let resume_from = req
            .resume_from
            .map(|t| {
                DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(u32::MAX))
                    .ok_or_else(|| ValidationError::new("resume_from", "is not a valid time"))
            })
            .transpose()?;
        let start = Start {
            initial_state: true,
            marks_snapshot_end: true,
            // Commands decided on another replica, or read back late, just before the client
            // left: resumed with a margin, and the client drops repeats by `sequence`.
            decided_since: resume_from.map(|t| t - RESUME_MARGIN),
        };
        let statuses = self.control.statuses();
        let (subscription, slot, filter) = self
            .open(who, credentials, req.sensor_ids, &req.building_id, start)
            .await?;
        let resumed = resume_from.is_some();
        use pb::watch_heater_commands_response::Kind;
        let commands = subscription.into_stream().map(move |item| {
            let _open = &slot;
            let kind = match item.map_err(Status::from)? {
                Update::Event(event) => Kind::Event(event),
                Update::SnapshotComplete => Kind::SnapshotComplete(pb::SnapshotComplete {
                    as_of: Some(timestamp(Utc::now())),
                    resumed,
                }),
            };
            Ok(pb::WatchHeaterCommandsResponse { kind: Some(kind) })
        });
        // Live only, best effort: one a watch fell behind on is skipped (GetSensorState has
        // the current status).
        let statuses = BroadcastStream::new(statuses).filter_map(move |status| {
            std::future::ready(
                status
                    .ok()
                    .filter(|s| filter.admits(&s.sensor_id, &s.building_id))
                    .map(|s| {
                        Some(Ok(pb::WatchHeaterCommandsResponse {
                            kind: Some(Kind::HeaterStatus(s)),
                        }))
                    }),
            )
        });
        // The watch ends with its commands (an error, the server stopping).
        let commands = commands
            .map(Some)
            .chain(futures::stream::once(std::future::ready(None)));
        Ok(Box::pin(
            futures::stream::select(commands, statuses)
                .take_while(|item| std::future::ready(item.is_some()))
                .filter_map(std::future::ready),
        ))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::HeaterCommandEvent, Status>> + Send>>;
type WatchStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchHeaterCommandsResponse, Status>> + Send>>;

/// How far before `resume_from` a resumed watch looks: the replicas' clocks may differ, and a
/// command is read back a moment after it is decided.
const RESUME_MARGIN: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

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

    type WatchHeaterCommandsStream = WatchStream;

    async fn watch_heater_commands(
        &self,
        request: Request<pb::WatchHeaterCommandsRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let who = authorize(&request, Action::Read)?;
        let credentials = Credentials::of(&request, self.auth.clone());
        Ok(Response::new(
            self.watch(who, credentials, request.into_inner()).await?,
        ))
    }

    async fn get_sensor_state(
        &self,
        request: Request<pb::GetSensorStateRequest>,
    ) -> Result<Response<pb::SensorState>, Status> {
        let (who, _slot) = reader(&request, &self.limits)?;
        Ok(Response::new(self.state(&who, request.into_inner()).await?))
    }

    async fn dry_run(
        &self,
        request: Request<pb::DryRunRequest>,
    ) -> Result<Response<pb::DryRunResponse>, Status> {
        let (who, _slot) = reader(&request, &self.limits)?;
        Ok(Response::new(
            self.dry_run_answer(&who, request.into_inner()).await?,
        ))
    }

    async fn put_heater_limits(
        &self,
        request: Request<pb::PutHeaterLimitsRequest>,
    ) -> Result<Response<pb::HeaterSettings>, Status> {
        Ok(Response::new(self.equipment.put_limits(request).await?))
    }

    async fn get_heater_settings(
        &self,
        request: Request<pb::GetHeaterSettingsRequest>,
    ) -> Result<Response<pb::HeaterSettings>, Status> {
        let _slot = reader(&request, &self.limits)?.1;
        Ok(Response::new(self.equipment.get(request).await?))
    }

    async fn set_out_of_service(
        &self,
        request: Request<pb::SetOutOfServiceRequest>,
    ) -> Result<Response<pb::HeaterSettings>, Status> {
        Ok(Response::new(
            self.equipment.set_out_of_service(request).await?,
        ))
    }
}
