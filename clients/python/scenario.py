"""A building-management app's first steps with thermostat, through the generated Python client.

Usage: scenario.py HOST:PORT (plaintext, authentication off). Exits non-zero on the first step
that does not behave as docs/api.md says.
"""

import sys

import grpc
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from thermostat.v1 import control_pb2, control_pb2_grpc
from thermostat.v1 import setpoint_pb2 as pb
from thermostat.v1 import setpoint_pb2_grpc


def details(error):
    """The google.rpc details of a failed call, by type name."""
    found = {}
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest,
                     error_details_pb2.RetryInfo, error_details_pb2.ResourceInfo):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.DESCRIPTOR.name] = message
    return found


def refused(call, code):
    try:
        call()
    except grpc.RpcError as error:
        assert error.code() == code, f"{error.code()} instead of {code}: {error.details()}"
        return error
    raise AssertionError(f"expected {code}, the call succeeded")


def main(address):
    channel = grpc.insecure_channel(address)
    setpoints = setpoint_pb2_grpc.SetpointServiceStub(channel)

    # A sensor that will never report: STALE_AFTER after its setpoint, it is sent OFF.
    setpoints.PutSetpoint(pb.PutSetpointRequest(setpoint=pb.Setpoint(
        sensor_id="py-quiet/room-1", building_id="py-quiet", desired_celsius=20.0,
        up_delta_celsius=0.5, down_delta_celsius=0.5)))

    # Put, then change one field with an update mask: the others stay.
    created = setpoints.PutSetpoint(pb.PutSetpointRequest(setpoint=pb.Setpoint(
        sensor_id="py/room-1", building_id="py", desired_celsius=20.0,
        up_delta_celsius=1.5, down_delta_celsius=0.5)))
    assert created.revision == 1, created
    updated = setpoints.UpdateSetpoint(pb.UpdateSetpointRequest(
        setpoint=pb.Setpoint(sensor_id="py/room-1", desired_celsius=22.0),
        update_mask=field_mask_pb2.FieldMask(paths=["desired_celsius"])))
    assert (updated.revision, updated.desired_celsius, updated.up_delta_celsius) == (2, 22.0, 1.5), updated
    print("put and masked update: ok")

    # A bad request names its field in a BadRequest; a stale revision gives the current one.
    error = refused(lambda: setpoints.PutSetpoint(pb.PutSetpointRequest(setpoint=pb.Setpoint(
        sensor_id="py/room-1", building_id="py", desired_celsius=900.0))),
        grpc.StatusCode.INVALID_ARGUMENT)
    found = details(error)
    assert found["ErrorInfo"].reason == "INVALID_FIELD", found
    assert found["ErrorInfo"].domain == "thermostat", found
    violations = found["BadRequest"].field_violations
    assert [v.field for v in violations] == ["setpoint.desired_celsius"], violations
    error = refused(lambda: setpoints.UpdateSetpoint(pb.UpdateSetpointRequest(
        setpoint=pb.Setpoint(sensor_id="py/room-1", desired_celsius=19.0),
        update_mask=field_mask_pb2.FieldMask(paths=["desired_celsius"]),
        expected_revision=1)), grpc.StatusCode.ABORTED)
    info = details(error)["ErrorInfo"]
    assert (info.reason, info.metadata["current_revision"]) == ("REVISION_MISMATCH", "2"), info
    print("error details: ok")

    # 1,200 setpoints, paged through at the largest page size.
    for n in range(1200):
        setpoints.PutSetpoint(pb.PutSetpointRequest(setpoint=pb.Setpoint(
            sensor_id=f"py-many/room-{n:04}", building_id="py-many", desired_celsius=21.0,
            up_delta_celsius=0.5, down_delta_celsius=0.5, reason="commissioning " + "x" * 200)))
    seen, pages, token = [], 0, ""
    while True:
        page = setpoints.ListSetpoints(pb.ListSetpointsRequest(
            building_id="py-many", page_size=1000, page_token=token))
        seen += [s.sensor_id for s in page.setpoints]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(seen) and len(set(seen)) == 1200, (len(seen), pages)
    print(f"paged through 1200 setpoints in {pages} pages: ok")

    # Watch a building: its state (the last command of each heater that has one), then the
    # marker; a reconnecting client resumes from the marker.
    heaters = control_pb2_grpc.HeaterControlServiceStub(channel)
    def marker(watch):
        return next(i for i in watch if i.WhichOneof("kind") == "snapshot_complete")
    watch = heaters.WatchHeaterCommands(control_pb2.WatchHeaterCommandsRequest(building_id="py"))
    first = marker(watch)
    assert not first.snapshot_complete.resumed, first
    watch.cancel()
    resumed = heaters.WatchHeaterCommands(control_pb2.WatchHeaterCommandsRequest(
        building_id="py", resume_from=first.snapshot_complete.as_of))
    assert marker(resumed).snapshot_complete.resumed
    resumed.cancel()
    print("watch: snapshot complete and resume: ok")

    # A command decided without a reading carries no temperature: absent, not 0 °C.
    watch = heaters.WatchHeaterCommands(
        control_pb2.WatchHeaterCommandsRequest(building_id="py-quiet"))
    stale = next(i.event for i in watch if i.WhichOneof("kind") == "event")
    watch.cancel()
    assert stale.reason == control_pb2.COMMAND_REASON_SENSOR_STALE, stale
    assert not stale.HasField("temperature_celsius"), stale
    assert not stale.HasField("reading_time"), stale
    print("stale without a reading, no temperature: ok")


if __name__ == "__main__":
    main(sys.argv[1])
