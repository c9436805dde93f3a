//! Heater settings on `HeaterControlService`: PutHeaterLimits, GetHeaterSettings and
//! SetOutOfService, per building and per sensor in it.

use chrono::TimeDelta;
use tonic::Request;

use super::authorize;
use super::limits::Limits as CallLimits;
use crate::domain::equipment::{HeaterSettings, Limits, OutOfService, Resolved};
use crate::domain::protection::Protection;
use crate::domain::{Action, BuildingId, Identity, Reason, SensorId, ValidationError};
use crate::error::{Error, Result};
use crate::proto::v1 as pb;
use crate::proto::{from_duration, timestamp};
use crate::store::{SettingsRecord, Store};

pub struct EquipmentApi {
    store: Store,
    calls: CallLimits,
    /// The service's limits, under the buildings' and sensors' own.
    service: Protection,
}

/// A limit as the API shows it: whole milliseconds, as stored.
fn duration(span: TimeDelta) -> prost_types::Duration {
    prost_types::Duration {
        seconds: span.num_seconds(),
        nanos: (span.subsec_nanos() / 1_000_000) * 1_000_000,
    }
}

pub fn limits_to_proto(limits: &Limits) -> pb::HeaterLimits {
    pb::HeaterLimits {
        min_on_time: limits.min_on.map(duration),
        min_off_time: limits.min_off.map(duration),
        max_run_time: limits.max_run.map(duration),
        run_cooldown: limits.cooldown.map(duration),
        keep_alive: limits.keep_alive.map(duration),
    }
}

/// Every limit of `protection`, zero for none.
pub fn protection_to_proto(protection: &Protection) -> pb::HeaterLimits {
    let zero = TimeDelta::zero();
    limits_to_proto(&Limits {
        min_on: Some(protection.min_on),
        min_off: Some(protection.min_off),
        max_run: Some(protection.max_run.unwrap_or(zero)),
        cooldown: Some(protection.cooldown),
        keep_alive: Some(protection.keep_alive.unwrap_or(zero)),
    })
}

pub fn out_of_service_to_proto(out: &OutOfService) -> pb::OutOfService {
    pb::OutOfService {
        reason: out.reason.clone(),
        since: Some(timestamp(out.since)),
        by: out.by.clone(),
        keep_heater_state: !out.release,
        building_wide: out.building_wide,
    }
}

fn limits_from_proto(limits: Option<pb::HeaterLimits>) -> Result<Limits> {
    let limits = limits.ok_or_else(|| ValidationError::new("limits", "is required"))?;
    let span = |field: &str, d: Option<prost_types::Duration>| {
        d.map(|d| {
            from_duration(&d).ok_or_else(|| ValidationError::new(field, "must be a valid duration"))
        })
        .transpose()
    };
    let limits = Limits {
        min_on: span("limits.min_on_time", limits.min_on_time)?,
        min_off: span("limits.min_off_time", limits.min_off_time)?,
        max_run: span("limits.max_run_time", limits.max_run_time)?,
        cooldown: span("limits.run_cooldown", limits.run_cooldown)?,
        keep_alive: span("limits.keep_alive", limits.keep_alive)?,
    };
    limits.validate().map_err(|e| e.within("limits"))?;
    Ok(limits)
}

/// The building and optional sensor a request names.
fn target(building_id: String, sensor_id: String) -> Result<(BuildingId, Option<SensorId>)> {
    let building = BuildingId::parse(building_id)?;
    let sensor = (!sensor_id.is_empty())
        .then(|| SensorId::parse(sensor_id))
        .transpose()?;
    Ok((building, sensor))
}

impl EquipmentApi {
    pub fn new(store: Store, calls: CallLimits, service: Protection) -> Self {
        Self {
            store,
            calls,
            service,
        }
    }

    /// The caller, allowed `action` on `building`: another building is NOT_FOUND to a
    /// reader, and refused to a writer (it named it itself).
    fn caller<T>(
        &self,
        request: &Request<T>,
        action: Action,
        building: &BuildingId,
    ) -> Result<Identity> {
        let who = authorize(request, action)?;
        if action == Action::Write {
            self.calls.write(&who.subject)?;
        }
        if who.sees(building) {
            Ok(who)
        } else if action == Action::Write {
            Err(Error::PermissionDenied(format!(
                "building_id {:?} is not among the caller's buildings",
                building.as_str()
            )))
        } else {
            Err(Error::NotFound {
                kind: "building",
                id: building.to_string(),
            })
        }
    }

    /// The settings of `building`, or of `sensor` in it, with the limits that apply there.
    async fn answer(
        &self,
        building: &BuildingId,
        sensor: Option<&SensorId>,
    ) -> Result<pb::HeaterSettings> {
        let (of_building, own) = self.store.heater_settings(building, sensor).await?;
        let mut table = HeaterSettings::new(self.service);
        for record in [&of_building, &own].into_iter().flatten() {
            table.set(
                record.building.clone(),
                record.sensor.clone(),
                record.settings.clone(),
            );
        }
        let Resolved {
            protection,
            out_of_service,
        } = table.resolve(sensor.map_or("", SensorId::as_str), Some(building));
        let here: Option<&SettingsRecord> = if sensor.is_some() {
            own.as_ref()
        } else {
            of_building.as_ref()
        };
        Ok(pb::HeaterSettings {
            building_id: building.to_string(),
            sensor_id: sensor.map(ToString::to_string).unwrap_or_default(),
            limits: Some(limits_to_proto(
                &here.map(|r| r.settings.limits).unwrap_or_default(),
            )),
            out_of_service: out_of_service.as_ref().map(out_of_service_to_proto),
            effective_limits: Some(protection_to_proto(&protection)),
            revision: here.map_or(0, |r| r.revision),
            update_time: here.map(|r| timestamp(r.update_time)),
            updated_by: here.map(|r| r.updated_by.clone()).unwrap_or_default(),
        })
    }

    pub async fn put_limits(
        &self,
        request: Request<pb::PutHeaterLimitsRequest>,
    ) -> Result<pb::HeaterSettings> {
        let req = request.get_ref().clone();
        let (building, sensor) = target(req.building_id, req.sensor_id)?;
        let limits = limits_from_proto(req.limits)?;
        let who = self.caller(&request, Action::Write, &building)?;
        self.store
            .put_heater_limits(&building, sensor.as_ref(), &limits, who.subject.as_str())
            .await?;
        self.answer(&building, sensor.as_ref()).await
    }

    pub async fn get(
        &self,
        request: Request<pb::GetHeaterSettingsRequest>,
    ) -> Result<pb::HeaterSettings> {
        let req = request.get_ref().clone();
        let (building, sensor) = target(req.building_id, req.sensor_id)?;
        self.caller(&request, Action::Read, &building)?;
        self.answer(&building, sensor.as_ref()).await
    }

    pub async fn set_out_of_service(
        &self,
        request: Request<pb::SetOutOfServiceRequest>,
    ) -> Result<pb::HeaterSettings> {
        let req = request.get_ref().clone();
        let (building, sensor) = target(req.building_id, req.sensor_id)?;
        let reason = Reason::parse(req.reason)?;
        if req.out_of_service && reason.as_str().trim().is_empty() {
            return Err(
                ValidationError::new("reason", "is required to take it out of service").into(),
            );
        }
        let who = self.caller(&request, Action::Write, &building)?;
        let out = req
            .out_of_service
            .then_some((&reason, req.keep_heater_state));
        self.store
            .set_out_of_service(&building, sensor.as_ref(), out, who.subject.as_str())
            .await?;
        self.answer(&building, sensor.as_ref()).await
    }
}
