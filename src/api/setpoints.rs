//! `thermostat.v1.SetpointService`: decode, validate, call the store, encode.

use tonic::{Request, Response, Status};

use super::convert::{
    expected_revision, levels_to_proto, setpoint_from_proto, setpoint_to_proto, setpoint_values,
    transition_to_proto,
};
use super::limits::Limits;
use super::{authorize, page_token, reader};
use crate::domain::levels::{self, Level, LevelValues};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use futures::StreamExt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use prost::Message;

use crate::config::{CelsiusRange, LimitsConfig};
use crate::domain::control;
use crate::domain::{
    Action, BuildingId, Identity, Reason, Scope, SensorId, Setpoint, StoredSetpoint,
    ValidationError,
};
use crate::error::{Error, Result};
use crate::proto::v1 as pb;
use crate::proto::{from_duration, from_timestamp, timestamp};
use crate::store::{HistoryEntry, LevelWrite, PutOutcome, Store, WriteRequest};
use chrono::Utc;
use pb::batch_update_setpoint_result::Result as Outcome;

/// A write's request id, checked, with the request written out (its method and its encoding
/// without the id); `None` when the caller gave none.
fn write_request<M: Message + Clone>(
    who: &Identity,
    method: &str,
    message: &M,
    without_id: impl Fn(&mut M),
    id: &str,
) -> Result<Option<WriteRequest>> {
    if id.is_empty() {
        return Ok(None);
    }
    if id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ValidationError::new(
            "request_id",
            "must be 1 to 64 characters of A-Za-z0-9_-",
        )
        .into());
    }
    let mut request = message.clone();
    without_id(&mut request);
    Ok(Some(WriteRequest {
        caller: format!("{:?}/{}", who.subject.kind, who.subject.name),
        id: id.to_owned(),
        // The method too: two methods' requests may encode to the same bytes.
        request: format!(
            "{method}:{}",
            URL_SAFE_NO_PAD.encode(request.encode_to_vec())
        ),
    }))
}

/// The setpoint a recorded write left.
fn entry_to_proto(entry: HistoryEntry) -> Result<pb::Setpoint> {
    let setpoint = entry
        .setpoint
        .ok_or_else(|| Error::Internal("a recorded Put's history entry is a deletion".into()))?;
    Ok(pb::Setpoint {
        revision: entry.revision,
        update_time: Some(timestamp(entry.change_time)),
        updated_by: entry.changed_by,
        reason: entry.reason,
        ..setpoint_values(&setpoint)
    })
}

/// The most updates one batch holds.
const MAX_BATCH: usize = 1000;
/// A batch takes one write from the caller's rate limit per this many updates.
const UPDATES_PER_WRITE: usize = 100;
/// Sensors of a batch updated at once: their Puts are written together.
const BATCH_CONCURRENCY: usize = 64;

/// A status as the `google.rpc.Status` a batch result carries, with its details.
fn rpc_status(status: Status) -> tonic_types::pb::Status {
    // api::status puts every detail into the status's details, as an encoded google.rpc.Status.
    match tonic_types::pb::Status::decode(status.details()) {
        Ok(decoded) if decoded.code == status.code() as i32 => decoded,
        _ => tonic_types::pb::Status {
            code: status.code() as i32,
            message: status.message().to_owned(),
            details: Vec::new(),
        },
    }
}

/// Reads and writes of one update before it gives up on concurrent writers of the sensor.
const UPDATE_ATTEMPTS: usize = 5;

pub struct SetpointApi {
    store: Store,
    limits: Limits,
    /// The readings the loop accepts (`READING_RANGE_CELSIUS`).
    readings: CelsiusRange,
    /// The bytes a page of a list may take: `MAX_MESSAGE_SIZE` less the rest of a response.
    page_bytes: usize,
    /// How long a write's request id is remembered (`REQUEST_ID_WINDOW`).
    request_window: Duration,
}

impl SetpointApi {
    pub fn new(
        store: Store,
        limits: Limits,
        readings: CelsiusRange,
        config: &LimitsConfig,
    ) -> Self {
        Self {
            store,
            limits,
            readings,
            page_bytes: config
                .max_message_size
                .saturating_sub(page_token::RESPONSE_RESERVE),
            request_window: config.request_id_window,
        }
    }

    /// The role check and the caller's write budget, before any work.
    fn writer<T>(&self, request: &tonic::Request<T>) -> Result<Identity> {
        let who = authorize(request, Action::Write)?;
        self.limits.write(&who.subject)?;
        Ok(who)
    }

    /// Refuses a band that no accepted reading could switch both ways.
    fn within_reach(&self, values: &LevelValues) -> Result<(), ValidationError> {
        let Some(field) = control::values_out_of_reach(values, &self.readings.range()) else {
            return Ok(());
        };
        let desired = values.desired.value();
        let (up, down) = (values.up_delta.value(), values.down_delta.value());
        Err(ValidationError::new(
            field,
            format!(
                "the band {}..{} must lie strictly inside READING_RANGE_CELSIUS {}: readings \
                 outside it are dead-lettered, so none could switch this heater both ways",
                desired - down,
                desired + up,
                self.readings
            ),
        ))
    }

    /// The caller of a write of `level` (a proto number), if its role may write that level.
    fn level_writer<T>(
        &self,
        request: &tonic::Request<T>,
        level: i32,
    ) -> Result<(Identity, Level)> {
        let level = Level::parse_above_default(level)?;
        let who = authorize(request, level.action())?;
        self.limits.write(&who.subject)?;
        Ok((who, level))
    }

    /// A sensor's priority array with its schedule's next transition.
    async fn levels_answer(
        &self,
        sensor_id: &SensorId,
        scope: &Scope,
    ) -> Result<pb::SetpointLevels> {
        let levels = self.store.levels(sensor_id, scope).await?;
        let covering = self
            .store
            .sensor_schedule(&levels.building_id, sensor_id)
            .await?;
        let (schedule_id, next) = match &covering {
            Some(s) => {
                let id = s.record.schedule_id.as_str();
                let next = s.record.schedule.next_change(Utc::now());
                (
                    id.to_owned(),
                    next.map(|c| transition_to_proto(id, &c, &s.presets)),
                )
            }
            None => (String::new(), None),
        };
        Ok(levels_to_proto(&levels, schedule_id, next))
    }

    async fn put(&self, who: &Identity, req: pb::PutSetpointRequest) -> Result<pb::Setpoint> {
        let request = write_request(
            who,
            "PutSetpoint",
            &req,
            |r| r.request_id = String::new(),
            &req.request_id,
        )?;
        let (setpoint, reason) = setpoint_from_proto(req.setpoint)?;
        let expected = expected_revision(req.expected_revision)?;
        let write = self.write(who, &setpoint, &reason, expected, request.as_ref());
        self.once(request.as_ref(), entry_to_proto, async {
            Ok(setpoint_to_proto(&write.await?))
        })
        .await
    }

    /// Applies the masked fields to the stored setpoint. Without an expected revision, a
    /// concurrent change is not an error: the mask is applied again to what is stored then.
    async fn update(&self, who: &Identity, req: pb::UpdateSetpointRequest) -> Result<pb::Setpoint> {
        let request = write_request(
            who,
            "UpdateSetpoint",
            &req,
            |r| r.request_id = String::new(),
            &req.request_id,
        )?;
        let merge = self.merge(who, req, request.as_ref());
        self.once(request.as_ref(), entry_to_proto, merge).await
    }

    async fn merge(
        &self,
        who: &Identity,
        req: pb::UpdateSetpointRequest,
        request: Option<&WriteRequest>,
    ) -> Result<pb::Setpoint> {
        let patch = req
            .setpoint
            .ok_or_else(|| ValidationError::new("setpoint", "is required"))?;
        let sensor_id =
            SensorId::parse(patch.sensor_id.clone()).map_err(|e| e.within("setpoint"))?;
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            return Err(
                ValidationError::new("update_mask", "must name the fields to change").into(),
            );
        }
        let expected = match expected_revision(req.expected_revision)? {
            Some(0) => {
                return Err(ValidationError::new(
                    "expected_revision",
                    "must be at least 1: an update needs an existing setpoint",
                )
                .into())
            }
            other => other,
        };
        let mut raced = None;
        for _ in 0..UPDATE_ATTEMPTS {
            let current = self.store.get_setpoint(&sensor_id, &who.scope).await?;
            if let Some(expected) = expected.filter(|e| *e != current.revision) {
                return Err(Error::RevisionMismatch {
                    expected,
                    actual: current.revision,
                });
            }
            let mut merged = setpoint_values(&current.setpoint);
            for path in &paths {
                match path.as_str() {
                    "desired_celsius" => merged.desired_celsius = patch.desired_celsius,
                    "up_delta_celsius" => merged.up_delta_celsius = patch.up_delta_celsius,
                    "down_delta_celsius" => merged.down_delta_celsius = patch.down_delta_celsius,
                    "building_id" => merged.building_id.clone_from(&patch.building_id),
                    "reason" => merged.reason.clone_from(&patch.reason),
                    other => {
                        return Err(ValidationError::new(
                            "update_mask",
                            format!("{other:?} is not a field an update can change"),
                        )
                        .into())
                    }
                }
            }
            let (setpoint, reason) = setpoint_from_proto(Some(merged))?;
            match self
                .write(who, &setpoint, &reason, Some(current.revision), request)
                .await
            {
                Err(mismatch @ Error::RevisionMismatch { .. }) if expected.is_none() => {
                    raced = Some(mismatch);
                }
                written => return written.map(|stored| setpoint_to_proto(&stored)),
            }
        }
        // Other writers changed the sensor at every attempt: ABORTED, as AIP-193 has it.
        Err(raced.unwrap_or_else(|| Error::Internal("update ran no attempt".into())))
    }

    /// Validates a setpoint against the loop's readings and the caller's buildings, and writes
    /// it.
    async fn write(
        &self,
        who: &Identity,
        setpoint: &Setpoint,
        reason: &Reason,
        expected: Option<i64>,
        request: Option<&WriteRequest>,
    ) -> Result<StoredSetpoint> {
        self.within_reach(&setpoint.values())
            .map_err(|e| e.within("setpoint"))?;
        // The caller named this building itself, so refusing it reveals nothing.
        if !who.sees(&setpoint.building_id) {
            return Err(Error::PermissionDenied(format!(
                "setpoint.building_id {:?} is not among the caller's buildings",
                setpoint.building_id.as_str()
            )));
        }
        let actor = who.subject.as_str();
        let outcome = self
            .store
            .put_setpoint(setpoint, expected, actor, reason, &who.scope, request)
            .await?;
        if let PutOutcome::Written(stored) = &outcome {
            tracing::info!(sensor_id = %stored.setpoint.sensor_id, revision = stored.revision, actor, "setpoint written");
        }
        Ok(outcome.into_stored())
    }

    async fn get(&self, who: &Identity, req: pb::GetSetpointRequest) -> Result<pb::Setpoint> {
        let sensor_id = SensorId::parse(req.sensor_id)?;
        Ok(setpoint_to_proto(
            &self.store.get_setpoint(&sensor_id, &who.scope).await?,
        ))
    }

    async fn list(
        &self,
        who: &Identity,
        req: pb::ListSetpointsRequest,
    ) -> Result<pb::ListSetpointsResponse> {
        let building = match req.building_id.as_str() {
            "" => None,
            id => Some(BuildingId::parse(id)?),
        };
        let limit = page_token::page_size(req.page_size)?;
        let scope = format!("setpoints:{}", req.building_id);
        let after = page_token::decode(&scope, &req.page_token)?;
        // One more than asked tells whether another page exists without a second query.
        let rows = self
            .store
            .list_setpoints(building.as_ref(), &who.scope, after.as_deref(), limit + 1)
            .await?;
        let (setpoints, next_page_token) = page_token::paginate(
            rows,
            limit,
            self.page_bytes,
            &scope,
            |last| last.setpoint.sensor_id.to_string(),
            setpoint_to_proto,
        );
        Ok(pb::ListSetpointsResponse {
            setpoints,
            next_page_token,
        })
    }

    async fn delete(&self, who: &Identity, req: pb::DeleteSetpointRequest) -> Result<()> {
        let request = write_request(
            who,
            "DeleteSetpoint",
            &req,
            |r| r.request_id = String::new(),
            &req.request_id,
        )?;
        let sensor_id = SensorId::parse(req.sensor_id)?;
        let expected = expected_revision(req.expected_revision)?;
        let reason = Reason::parse(req.reason)?;
        let actor = who.subject.as_str();
        let delete = async {
            let revision = self
                .store
                .delete_setpoint(
                    &sensor_id,
                    expected,
                    actor,
                    &reason,
                    &who.scope,
                    request.as_ref(),
                    who.check(Level::Safety.action()).is_ok(),
                )
                .await?;
            tracing::info!(%sensor_id, revision, actor, "setpoint deleted");
            Ok(())
        };
        self.once(request.as_ref(), |_| Ok(()), delete).await
    }

    /// Applies each update as UpdateSetpoint would, several at a time (their Puts are then
    /// written together), those of one sensor in request order.
    async fn batch(
        &self,
        who: &Identity,
        requests: Vec<pb::UpdateSetpointRequest>,
    ) -> Result<pb::BatchUpdateSetpointsResponse> {
        if requests.is_empty() || requests.len() > MAX_BATCH {
            return Err(ValidationError::new(
                "requests",
                format!("must hold 1 to {MAX_BATCH} updates"),
            )
            .into());
        }
        let cost = requests.len().div_ceil(UPDATES_PER_WRITE);
        self.limits.writes(
            &who.subject,
            NonZeroU32::new(cost as u32).unwrap_or(NonZeroU32::MIN),
        )?;
        // Updates of one sensor run one after the other, in request order.
        let mut by_sensor: HashMap<String, Vec<(usize, pb::UpdateSetpointRequest)>> =
            HashMap::new();
        let count = requests.len();
        for (i, request) in requests.into_iter().enumerate() {
            let sensor = request
                .setpoint
                .as_ref()
                .map(|s| s.sensor_id.clone())
                .unwrap_or_default();
            by_sensor.entry(sensor).or_default().push((i, request));
        }
        let mut results = vec![None; count];
        let outcomes: Vec<Vec<(usize, pb::BatchUpdateSetpointResult)>> =
            futures::stream::iter(by_sensor.into_values().map(|updates| async move {
                let mut done = Vec::with_capacity(updates.len());
                for (i, request) in updates {
                    let result = match self.update(who, request).await {
                        Ok(setpoint) => Outcome::Setpoint(setpoint),
                        Err(e) => Outcome::Error(rpc_status(Status::from(e))),
                    };
                    done.push((
                        i,
                        pb::BatchUpdateSetpointResult {
                            result: Some(result),
                        },
                    ));
                }
                done
            }))
            .buffer_unordered(BATCH_CONCURRENCY)
            .collect()
            .await;
        for (i, result) in outcomes.into_iter().flatten() {
            results[i] = Some(result);
        }
        Ok(pb::BatchUpdateSetpointsResponse {
            results: results.into_iter().flatten().collect(),
        })
    }

    /// Runs `write` once per request id (AIP-155): a retry within the window is answered from
    /// the first outcome, also when it raced with the first and lost (a revision mismatch, a
    /// setpoint already deleted).
    async fn once<T>(
        &self,
        request: Option<&WriteRequest>,
        replay: impl Fn(HistoryEntry) -> Result<T>,
        write: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let Some(request) = request else {
            return write.await;
        };
        if let Some(first) = self.replayed(request).await? {
            return replay(first);
        }
        match write.await {
            Err(lost @ (Error::RevisionMismatch { .. } | Error::NotFound { .. })) => {
                match self.replayed(request).await? {
                    Some(first) => replay(first),
                    None => Err(lost),
                }
            }
            done => done,
        }
    }

    /// The first outcome of the write made with this request id, if there was one.
    async fn replayed(&self, request: &WriteRequest) -> Result<Option<HistoryEntry>> {
        let recorded = self
            .store
            .recorded_write(&request.caller, &request.id, self.request_window)
            .await?;
        match recorded {
            Some(first) if first.request != request.request => Err(ValidationError::new(
                "request_id",
                "was used for another request of this caller",
            )
            .into()),
            first => Ok(first.map(|first| first.outcome)),
        }
    }

    async fn write_level(
        &self,
        who: &Identity,
        level: Level,
        req: pb::WriteSetpointLevelRequest,
    ) -> Result<pb::SetpointLevels> {
        let method = "WriteSetpointLevel";
        let request = write_request(
            who,
            method,
            &req,
            |r| r.request_id = String::new(),
            &req.request_id,
        )?;
        let sensor_id = SensorId::parse(req.sensor_id)?;
        let values = LevelValues::new(
            req.desired_celsius,
            req.up_delta_celsius,
            req.down_delta_celsius,
        )?;
        self.within_reach(&values)?;
        let expire_time = req
            .expire_time
            .map(|t| {
                from_timestamp(&t)
                    .ok_or_else(|| ValidationError::new("expire_time", "is not a valid time"))
            })
            .transpose()?;
        let duration = req
            .duration
            .map(|d| {
                from_duration(&d)
                    .ok_or_else(|| ValidationError::new("duration", "is not a valid duration"))
            })
            .transpose()?;
        let reason = Reason::parse(req.reason)?;
        let expected_revision = expected_revision(req.expected_revision)?;
        let written = async {
            // Checked for a first attempt only: the retry of a write that was made is answered
            // even once its expiry has passed.
            let expire_time = levels::expiry_of(expire_time, duration, chrono::Utc::now())?;
            let write = LevelWrite {
                sensor_id: &sensor_id,
                level,
                values,
                expire_time,
                expected_revision,
                actor: who.subject.as_str(),
                reason: &reason,
                scope: &who.scope,
                request: request.as_ref(),
            };
            let revision = self.store.write_level(write).await?;
            tracing::info!(%sensor_id, revision, level = level.name(), ?expire_time, "setpoint level written");
            Ok(())
        };
        self.once(request.as_ref(), |_| Ok(()), written).await?;
        self.levels_answer(&sensor_id, &who.scope).await
    }

    async fn relinquish_level(
        &self,
        who: &Identity,
        level: Level,
        req: pb::RelinquishSetpointLevelRequest,
    ) -> Result<pb::SetpointLevels> {
        let request = write_request(
            who,
            "RelinquishSetpointLevel",
            &req,
            |r| r.request_id = String::new(),
            &req.request_id,
        )?;
        let sensor_id = SensorId::parse(req.sensor_id)?;
        let reason = Reason::parse(req.reason)?;
        let actor = who.subject.as_str();
        let expected = expected_revision(req.expected_revision)?;
        let relinquished = async {
            let revision = self
                .store
                .relinquish_level(
                    &sensor_id,
                    level,
                    expected,
                    actor,
                    &reason,
                    &who.scope,
                    request.as_ref(),
                )
                .await?;
            tracing::info!(%sensor_id, revision, level = level.name(), actor, "setpoint level relinquished");
            Ok(())
        };
        self.once(request.as_ref(), |_| Ok(()), relinquished)
            .await?;
        self.levels_answer(&sensor_id, &who.scope).await
    }

    async fn history(
        &self,
        who: &Identity,
        req: pb::ListSetpointHistoryRequest,
    ) -> Result<pb::ListSetpointHistoryResponse> {
        let sensor_id = SensorId::parse(req.sensor_id)?;
        let limit = page_token::page_size(req.page_size)?;
        let scope = format!("history:{sensor_id}");
        let before = page_token::decode(&scope, &req.page_token)?
            .map(|p| p.parse::<i64>())
            .transpose()
            .map_err(|_| ValidationError::new("page_token", "is malformed"))?;
        let rows = self
            .store
            .setpoint_history(&sensor_id, &who.scope, before, limit + 1)
            .await?;
        let (entries, next_page_token) = page_token::paginate(
            rows,
            limit,
            self.page_bytes,
            &scope,
            |last| last.revision.to_string(),
            |e| pb::SetpointHistoryEntry {
                revision: e.revision,
                deleted: e.setpoint.is_none(),
                setpoint: e.setpoint.as_ref().map(|s| pb::Setpoint {
                    revision: e.revision,
                    update_time: Some(timestamp(e.change_time)),
                    updated_by: e.changed_by.clone(),
                    reason: e.reason.clone(),
                    ..setpoint_values(s)
                }),
                change_time: Some(timestamp(e.change_time)),
                changed_by: e.changed_by.clone(),
                reason: e.reason.clone(),
                level: i32::from(e.level.number()),
                expire_time: e.expire_time.map(timestamp),
                schedule_id: e.schedule_id.clone().unwrap_or_default(),
            },
        );
        Ok(pb::ListSetpointHistoryResponse {
            entries,
            next_page_token,
        })
    }
}

#[tonic::async_trait]
impl pb::setpoint_service_server::SetpointService for SetpointApi {
    async fn put_setpoint(
        &self,
        request: Request<pb::PutSetpointRequest>,
    ) -> Result<Response<pb::Setpoint>, Status> {
        let who = self.writer(&request)?;
        Ok(Response::new(self.put(&who, request.into_inner()).await?))
    }

    async fn update_setpoint(
        &self,
        request: Request<pb::UpdateSetpointRequest>,
    ) -> Result<Response<pb::Setpoint>, Status> {
        let who = self.writer(&request)?;
        Ok(Response::new(
            self.update(&who, request.into_inner()).await?,
        ))
    }

    async fn batch_update_setpoints(
        &self,
        request: Request<pb::BatchUpdateSetpointsRequest>,
    ) -> Result<Response<pb::BatchUpdateSetpointsResponse>, Status> {
        let who = authorize(&request, Action::Write)?;
        let requests = request.into_inner().requests;
        Ok(Response::new(self.batch(&who, requests).await?))
    }

    async fn get_setpoint(
        &self,
        request: Request<pb::GetSetpointRequest>,
    ) -> Result<Response<pb::Setpoint>, Status> {
        let (who, _slot) = reader(&request, &self.limits)?;
        Ok(Response::new(self.get(&who, request.into_inner()).await?))
    }

    async fn list_setpoints(
        &self,
        request: Request<pb::ListSetpointsRequest>,
    ) -> Result<Response<pb::ListSetpointsResponse>, Status> {
        let (who, _slot) = reader(&request, &self.limits)?;
        Ok(Response::new(self.list(&who, request.into_inner()).await?))
    }

    async fn delete_setpoint(
        &self,
        request: Request<pb::DeleteSetpointRequest>,
    ) -> Result<Response<pb::DeleteSetpointResponse>, Status> {
        let who = self.writer(&request)?;
        self.delete(&who, request.into_inner()).await?;
        Ok(Response::new(pb::DeleteSetpointResponse {}))
    }

    async fn list_setpoint_history(
        &self,
        request: Request<pb::ListSetpointHistoryRequest>,
    ) -> Result<Response<pb::ListSetpointHistoryResponse>, Status> {
        let (who, _slot) = reader(&request, &self.limits)?;
        Ok(Response::new(
            self.history(&who, request.into_inner()).await?,
        ))
    }

    async fn write_setpoint_level(
        &self,
        request: Request<pb::WriteSetpointLevelRequest>,
    ) -> Result<Response<pb::SetpointLevels>, Status> {
        let level = request.get_ref().level;
        let (who, level) = self.level_writer(&request, level)?;
        Ok(Response::new(
            self.write_level(&who, level, request.into_inner()).await?,
        ))
    }

    async fn relinquish_setpoint_level(
        &self,
        request: Request<pb::RelinquishSetpointLevelRequest>,
    ) -> Result<Response<pb::SetpointLevels>, Status> {
        let level = request.get_ref().level;
        let (who, level) = self.level_writer(&request, level)?;
        Ok(Response::new(
            self.relinquish_level(&who, level, request.into_inner())
                .await?,
        ))
    }

    async fn get_setpoint_levels(
        &self,
        request: Request<pb::GetSetpointLevelsRequest>,
    ) -> Result<Response<pb::SetpointLevels>, Status> {
        let (who, _slot) = reader(&request, &self.limits)?;
        let sensor_id = SensorId::parse(request.into_inner().sensor_id).map_err(Error::from)?;
        Ok(Response::new(
            self.levels_answer(&sensor_id, &who.scope).await?,
        ))
    }
}
