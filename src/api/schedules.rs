//! `thermostat.v1.ScheduleService`: presets, schedules, their history, and the preview of a
//! sensor's effective setpoint.

use std::collections::HashMap;

use chrono::{TimeDelta, Utc};
use prost::Message;
use tonic::{Request, Response, Status};

use super::convert::{
    expected_revision, preset_to_proto, schedule_from_proto, schedule_to_proto, segment_to_proto,
    transition_to_proto, values_from_proto,
};
use super::limits::Limits;
use super::{authorize, effective, page_token, reader};
use crate::config::LimitsConfig;
use crate::domain::levels::LevelValues;
use crate::domain::schedule::LocalName;
use crate::domain::{Action, BuildingId, Identity, Reason, SensorId, ValidationError};
use crate::error::{Error, Result};
use crate::proto::v1 as pb;
use crate::proto::{from_duration, from_timestamp, timestamp};
use crate::store::{ScheduleRecord, ScheduleWrite, Store};

/// How far a preview looks ahead by default, and at most.
const PREVIEW_DEFAULT: TimeDelta = TimeDelta::days(7);
const PREVIEW_MAX: TimeDelta = TimeDelta::days(31);

pub struct ScheduleApi {
    store: Store,
    limits: Limits,
    /// The bytes a page of a list may take: `MAX_MESSAGE_SIZE` less the rest of a response.
    page_bytes: usize,
}

impl ScheduleApi {
    pub fn new(store: Store, limits: Limits, config: &LimitsConfig) -> Self {
        Self {
            store,
            limits,
            page_bytes: config
                .max_message_size
                .saturating_sub(page_token::RESPONSE_RESERVE),
        }
    }

    /// An operator of `building`, within its write budget.
    fn writer<T>(&self, request: &Request<T>, building: &BuildingId) -> Result<Identity> {
        let who = authorize(request, Action::Write)?;
        self.limits.write(&who.subject)?;
        // The caller named this building itself, so refusing it reveals nothing.
        if !who.sees(building) {
            return Err(Error::PermissionDenied(format!(
                "building_id {:?} is not among the caller's buildings",
                building.as_str()
            )));
        }
        Ok(who)
    }

    /// A reader of `building`: another building's schedules are NOT_FOUND.
    fn check_sees(
        who: &Identity,
        building: &BuildingId,
        kind: &'static str,
        id: &str,
    ) -> Result<()> {
        if who.sees(building) {
            Ok(())
        } else {
            Err(Error::NotFound {
                kind,
                id: format!("{}/{id}", building.as_str()),
            })
        }
    }

    /// Schedules as the API shows them, each with its next transition.
    async fn schedules_answer(
        &self,
        building: &BuildingId,
        records: &[ScheduleRecord],
    ) -> Result<Vec<pb::Schedule>> {
        let presets: HashMap<LocalName, LevelValues> = self
            .store
            .presets(building)
            .await?
            .into_iter()
            .map(|p| (p.name, p.values))
            .collect();
        let now = Utc::now();
        Ok(records
            .iter()
            .map(|record| {
                let next = record
                    .schedule
                    .next_change(now)
                    .map(|c| transition_to_proto(record.schedule_id.as_str(), &c, &presets));
                schedule_to_proto(record, next)
            })
            .collect())
    }

    async fn schedule_answer(&self, record: ScheduleRecord) -> Result<pb::Schedule> {
        let building = BuildingId::parse(record.building_id.clone())
            .map_err(|e| Error::Internal(format!("stored {e}")))?;
        let mut answer = self.schedules_answer(&building, &[record]).await?;
        answer
            .pop()
            .ok_or_else(|| Error::Internal("no schedule answered".into()))
    }
}

fn parse_building(value: &str) -> Result<BuildingId> {
    Ok(BuildingId::parse(value.to_owned())?)
}

fn parse_name(field: &str, value: &str) -> Result<LocalName> {
    Ok(LocalName::parse(field, value)?)
}

#[tonic::async_trait]
impl pb::schedule_service_server::ScheduleService for ScheduleApi {
    async fn put_preset(
        &self,
        request: Request<pb::PutPresetRequest>,
    ) -> Result<Response<pb::Preset>, Status> {
        let req = request.get_ref();
        let preset = req
            .preset
            .as_ref()
            .ok_or_else(|| Error::from(ValidationError::new("preset", "is required")))?;
        let parsed = (|| {
            Ok::<_, ValidationError>((
                BuildingId::parse(preset.building_id.clone())?,
                LocalName::parse("name", &preset.name)?,
                values_from_proto("values", preset.values.as_ref())?,
                Reason::parse(preset.reason.clone())?,
            ))
        })();
        let (building, name, values, reason) =
            parsed.map_err(|e| Error::from(e.within("preset")))?;
        let expected = expected_revision(req.expected_revision).map_err(Error::from)?;
        let who = self.writer(&request, &building)?;
        let stored = self
            .store
            .put_preset(
                &building,
                &name,
                values,
                expected,
                who.subject.as_str(),
                &reason,
            )
            .await?;
        tracing::info!(
            building = building.as_str(),
            preset = name.as_str(),
            revision = stored.revision,
            "preset written"
        );
        Ok(Response::new(preset_to_proto(&stored)))
    }

    async fn get_preset(
        &self,
        request: Request<pb::GetPresetRequest>,
    ) -> Result<Response<pb::Preset>, Status> {
        let (who, _slot) = reader(&request, &self.limits)?;
        let req = request.into_inner();
        let building = parse_building(&req.building_id)?;
        let name = parse_name("name", &req.name)?;
        Self::check_sees(&who, &building, "preset", name.as_str())?;
        let stored = self.store.preset(&building, &name).await?;
        Ok(Response::new(preset_to_proto(&stored)))
    }

    async fn list_presets(
        &self,
        request: Request<pb::ListPresetsRequest>,
    ) -> Result<Response<pb::ListPresetsResponse>, Status> {
        let (who, _slot) = reader(&request, &self.limits)?;
        let building = parse_building(&request.get_ref().building_id)?;
        let presets = if who.sees(&building) {
            self.store.presets(&building).await?
        } else {
            Vec::new()
        };
        Ok(Response::new(pb::ListPresetsResponse {
            presets: presets.iter().map(preset_to_proto).collect(),
        }))
    }

    async fn delete_preset(
        &self,
        request: Request<pb::DeletePresetRequest>,
    ) -> Result<Response<pb::DeletePresetResponse>, Status> {
        let req = request.get_ref();
        let building = parse_building(&req.building_id)?;
        let name = parse_name("name", &req.name)?;
        let reason = Reason::parse(req.reason.clone()).map_err(Error::from)?;
        let expected = expected_revision(req.expected_revision).map_err(Error::from)?;
        let who = self.writer(&request, &building)?;
        self.store
            .delete_preset(&building, &name, expected, who.subject.as_str(), &reason)
            .await?;
        tracing::info!(
            building = building.as_str(),
            preset = name.as_str(),
            "preset deleted"
        );
        Ok(Response::new(pb::DeletePresetResponse {}))
    }

    async fn list_preset_history(
        &self,
        request: Request<pb::ListPresetHistoryRequest>,
    ) -> Result<Response<pb::ListPresetHistoryResponse>, Status> {
        let (who, _slot) = reader(&request, &self.limits)?;
        let req = request.into_inner();
        let building = parse_building(&req.building_id)?;
        let name = parse_name("name", &req.name)?;
        Self::check_sees(&who, &building, "preset", name.as_str())?;
        let limit = page_token::page_size(req.page_size).map_err(Error::from)?;
        let scope = format!("presets:{}/{}", building.as_str(), name.as_str());
        let before = page_position(&scope, &req.page_token)?;
        let rows = self
            .store
            .preset_history(&building, &name, before, limit + 1)
            .await?;
        let (entries, next_page_token) = page_token::paginate(
            rows,
            limit,
            self.page_bytes,
            &scope,
            |last| last.revision.to_string(),
            |p| pb::PresetHistoryEntry {
                preset: Some(preset_to_proto(p)),
                deleted: p.deleted,
            },
        );
        Ok(Response::new(pb::ListPresetHistoryResponse {
            entries,
            next_page_token,
        }))
    }

    async fn put_schedule(
        &self,
        request: Request<pb::PutScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        let req = request.get_ref();
        let proto = req
            .schedule
            .as_ref()
            .ok_or_else(|| Error::from(ValidationError::new("schedule", "is required")))?;
        let (building, id, sensors, schedule) = schedule_from_proto(proto).map_err(Error::from)?;
        // So that its answer, and a page of a listing, always holds it.
        let most = self.page_bytes / 2;
        if proto.encoded_len() > most {
            return Err(Error::from(ValidationError::new(
                "schedule",
                format!(
                    "encodes to {} bytes; at most {most} (half of MAX_MESSAGE_SIZE)",
                    proto.encoded_len()
                ),
            ))
            .into());
        }
        let reason =
            Reason::parse(proto.reason.clone()).map_err(|e| Error::from(e.within("schedule")))?;
        let expected = expected_revision(req.expected_revision).map_err(Error::from)?;
        let who = self.writer(&request, &building)?;
        let stored = self
            .store
            .put_schedule(ScheduleWrite {
                building_id: &building,
                schedule_id: &id,
                sensor_ids: &sensors,
                schedule: &schedule,
                expected_revision: expected,
                actor: who.subject.as_str(),
                reason: &reason,
            })
            .await?;
        tracing::info!(
            building = building.as_str(),
            schedule = id.as_str(),
            revision = stored.revision,
            "schedule written"
        );
        Ok(Response::new(self.schedule_answer(stored).await?))
    }

    async fn get_schedule(
        &self,
        request: Request<pb::GetScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        let (who, _slot) = reader(&request, &self.limits)?;
        let req = request.into_inner();
        let building = parse_building(&req.building_id)?;
        let id = parse_name("schedule_id", &req.schedule_id)?;
        Self::check_sees(&who, &building, "schedule", id.as_str())?;
        let stored = self.store.schedule(&building, &id).await?;
        Ok(Response::new(self.schedule_answer(stored).await?))
    }

    async fn list_schedules(
        &self,
        request: Request<pb::ListSchedulesRequest>,
    ) -> Result<Response<pb::ListSchedulesResponse>, Status> {
        let (who, _slot) = reader(&request, &self.limits)?;
        let req = request.into_inner();
        let building = parse_building(&req.building_id)?;
        let limit = page_token::page_size(req.page_size).map_err(Error::from)?;
        let scope = format!("schedules:{}", building.as_str());
        let after = page_token::decode(&scope, &req.page_token).map_err(Error::from)?;
        let schedules = if who.sees(&building) {
            self.store
                .schedules(&building, after.as_deref(), limit + 1)
                .await?
        } else {
            Vec::new()
        };
        let answered = self.schedules_answer(&building, &schedules).await?;
        let (schedules, next_page_token) = page_token::paginate(
            answered,
            limit,
            self.page_bytes,
            &scope,
            |last| last.schedule_id.clone(),
            Clone::clone,
        );
        Ok(Response::new(pb::ListSchedulesResponse {
            schedules,
            next_page_token,
        }))
    }

    async fn delete_schedule(
        &self,
        request: Request<pb::DeleteScheduleRequest>,
    ) -> Result<Response<pb::DeleteScheduleResponse>, Status> {
        let req = request.get_ref();
        let building = parse_building(&req.building_id)?;
        let id = parse_name("schedule_id", &req.schedule_id)?;
        let reason = Reason::parse(req.reason.clone()).map_err(Error::from)?;
        let expected = expected_revision(req.expected_revision).map_err(Error::from)?;
        let who = self.writer(&request, &building)?;
        self.store
            .delete_schedule(&building, &id, expected, who.subject.as_str(), &reason)
            .await?;
        tracing::info!(
            building = building.as_str(),
            schedule = id.as_str(),
            "schedule deleted"
        );
        Ok(Response::new(pb::DeleteScheduleResponse {}))
    }

    async fn list_schedule_history(
        &self,
        request: Request<pb::ListScheduleHistoryRequest>,
    ) -> Result<Response<pb::ListScheduleHistoryResponse>, Status> {
        let (who, _slot) = reader(&request, &self.limits)?;
        let req = request.into_inner();
        let building = parse_building(&req.building_id)?;
        let id = parse_name("schedule_id", &req.schedule_id)?;
        Self::check_sees(&who, &building, "schedule", id.as_str())?;
        let limit = page_token::page_size(req.page_size).map_err(Error::from)?;
        let scope = format!("schedules:{}/{}", building.as_str(), id.as_str());
        let before = page_position(&scope, &req.page_token)?;
        let rows = self
            .store
            .schedule_history(&building, &id, before, limit + 1)
            .await?;
        let (entries, next_page_token) = page_token::paginate(
            rows,
            limit,
            self.page_bytes,
            &scope,
            |last| last.revision.to_string(),
            |s| pb::ScheduleHistoryEntry {
                schedule: Some(schedule_to_proto(s, None)),
                deleted: s.deleted,
            },
        );
        Ok(Response::new(pb::ListScheduleHistoryResponse {
            entries,
            next_page_token,
        }))
    }

    async fn preview_setpoint(
        &self,
        request: Request<pb::PreviewSetpointRequest>,
    ) -> Result<Response<pb::PreviewSetpointResponse>, Status> {
        let (who, _slot) = reader(&request, &self.limits)?;
        let req = request.into_inner();
        let sensor_id = SensorId::parse(req.sensor_id).map_err(Error::from)?;
        let span = match &req.duration {
            None => PREVIEW_DEFAULT,
            Some(d) => from_duration(d)
                .filter(|d| *d > TimeDelta::zero() && *d <= PREVIEW_MAX)
                .ok_or_else(|| {
                    Error::from(ValidationError::new(
                        "duration",
                        "must be more than 0 and at most 31 days",
                    ))
                })?,
        };
        let now = Utc::now();
        let from = match &req.start_time {
            None => now,
            Some(t) => from_timestamp(t)
                .filter(|t| *t <= now + PREVIEW_MAX)
                .ok_or_else(|| {
                    Error::from(ValidationError::new(
                        "start_time",
                        "must be a valid time at most 31 days ahead",
                    ))
                })?
                .max(now),
        };
        let until = from + span;
        let effective =
            effective::effective_between(&self.store, &sensor_id, &who.scope, from, until).await?;
        let mut segments = Vec::new();
        let (mut bytes, mut end) = (0, until);
        for s in effective {
            let start = s.start;
            let segment = segment_to_proto(s);
            // Cut where a response would be full: the caller asks again from `end_time`.
            bytes += segment.encoded_len() + 8;
            if bytes > self.page_bytes && !segments.is_empty() {
                end = start;
                break;
            }
            segments.push(segment);
        }
        Ok(Response::new(pb::PreviewSetpointResponse {
            sensor_id: sensor_id.to_string(),
            segments,
            end_time: Some(timestamp(end)),
        }))
    }
}

/// The revision a history page starts below.
fn page_position(scope: &str, token: &str) -> Result<Option<i64>> {
    Ok(page_token::decode(scope, token)?
        .map(|p| p.parse::<i64>())
        .transpose()
        .map_err(|_| ValidationError::new("page_token", "is malformed"))?)
}
