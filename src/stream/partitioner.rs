//! Which sensor-topic partition a producer sends a sensor's readings to, for a sensor that has
//! not reported yet: its silence is judged by the replica that owns that partition.

use std::ffi::c_void;

use crate::config::SensorPartitioner;

/// The partition of `key` among `partitions` under `partitioner`, computed by librdkafka's own
/// partitioner functions (murmur2 is also the Java client's): the same answer as the producer's.
/// `None` without partitions.
pub fn partition_of(partitioner: SensorPartitioner, key: &[u8], partitions: i32) -> Option<i32> {
    use rdkafka::bindings as rd;
    if partitions <= 0 {
        return None;
    }
    let hash = match partitioner {
        SensorPartitioner::Consistent => rd::rd_kafka_msg_partitioner_consistent,
        SensorPartitioner::Murmur2 => rd::rd_kafka_msg_partitioner_murmur2,
        SensorPartitioner::Fnv1a => rd::rd_kafka_msg_partitioner_fnv1a,
    };
    // SAFETY: these three read `keylen` bytes of `key` and nothing else (rdkafka_msg.c: a hash
    // of the key modulo `partition_cnt`); the topic and opaque pointers are never used.
    let partition = unsafe {
        hash(
            std::ptr::null(),
            key.as_ptr().cast::<c_void>(),
            key.len(),
            partitions,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    Some(partition)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_the_producers() {
        // zlib's CRC-32 (Python: `zlib.crc32(b"quiet") % 4`).
        assert_eq!(
            partition_of(SensorPartitioner::Consistent, b"quiet", 4),
            Some(0)
        );
        assert_eq!(
            partition_of(SensorPartitioner::Consistent, b"s", 2),
            Some(1)
        );
        // Kafka's Java client: `Utils.murmur2("foobar".getBytes())` is -790332482 (UtilsTest),
        // and the partition `toPositive(hash) % n`.
        assert_eq!(
            partition_of(SensorPartitioner::Murmur2, b"foobar", 10),
            Some((-790_332_482i32 & 0x7fff_ffff) % 10)
        );
        assert_eq!(partition_of(SensorPartitioner::Fnv1a, b"s", 0), None);
    }
}
