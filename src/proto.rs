//! Code generated from `proto/` by `build.rs` (never edited by hand), the encoded descriptor
//! set that server reflection serves, and the conversion both the API and the Kafka edges need.

use chrono::{DateTime, TimeDelta, Utc};

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("thermostat.v1");
}

/// Every file of `proto/` and its imports, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/thermostat_descriptor.bin"));

/// A protobuf timestamp of `time`. chrono writes a leap second (a JSON reading at `23:59:60`, a
/// protobuf one with `nanos` from 1e9 on a :59 second) as nanoseconds past 1e9, which a
/// protobuf timestamp does not allow and strict clients refuse: it becomes the last nanosecond
/// of the second before.
pub fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    const LAST_NANO: u32 = 999_999_999;
    prost_types::Timestamp {
        seconds: time.timestamp(),
        // At most LAST_NANO, so it fits.
        nanos: time.timestamp_subsec_nanos().min(LAST_NANO) as i32,
    }
}

/// The time of a protobuf timestamp; `None` when its nanoseconds are out of range or it lies
/// beyond what chrono represents.
pub fn from_timestamp(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(
        t.seconds,
        u32::try_from(t.nanos).ok().filter(|n| *n < 1_000_000_000)?,
    )
}

/// The span of a protobuf duration; `None` when its nanoseconds are out of range or it lies
/// beyond what chrono represents.
pub fn from_duration(d: &prost_types::Duration) -> Option<TimeDelta> {
    if d.nanos.unsigned_abs() >= 1_000_000_000 {
        return None;
    }
    TimeDelta::try_seconds(d.seconds)?.checked_add(&TimeDelta::nanoseconds(i64::from(d.nanos)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_converts_with_its_sign_and_refuses_what_is_out_of_range() {
        let d = |seconds, nanos| prost_types::Duration { seconds, nanos };
        assert_eq!(from_duration(&d(7200, 0)), Some(TimeDelta::hours(2)));
        assert_eq!(
            from_duration(&d(-1, -500_000_000)),
            Some(TimeDelta::milliseconds(-1500))
        );
        assert_eq!(from_duration(&d(0, 1_000_000_000)), None);
        assert_eq!(from_duration(&d(i64::MAX, 0)), None);
    }

    #[test]
    fn a_leap_second_becomes_the_last_nanosecond_before_it() {
        let plain = DateTime::from_timestamp(1_800_000_000, 5).unwrap();
        assert_eq!(
            timestamp(plain),
            prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 5
            }
        );
        let leap = DateTime::parse_from_rfc3339("2016-12-31T23:59:60.5Z")
            .unwrap()
            .with_timezone(&Utc);
        let t = timestamp(leap);
        assert_eq!((t.seconds % 60, t.nanos), (59, 999_999_999));
    }
}
