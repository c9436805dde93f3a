// A building-management client in Go, generated from proto/ (clients/go/run.sh): put, update
// with a mask, read the error details of bad requests, page through 1,200 setpoints, watch and
// resume, hold a room with an expiring override. Prints one line per step; exits non-zero on
// the first surprise.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"sort"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/fieldmaskpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "thermostat/gen/go/thermostat/v1"
)

func check(ok bool, format string, args ...interface{}) {
	if !ok {
		fmt.Fprintf(os.Stderr, "failed: "+format+"\n", args...)
		os.Exit(1)
	}
}

func must(err error, what string) {
	check(err == nil, "%s: %v", what, err)
}

// refused returns the status of err, which must carry code.
func refused(err error, code codes.Code) *status.Status {
	s, ok := status.FromError(err)
	check(ok && s.Code() == code, "wanted %v, got %v", code, err)
	return s
}

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	conn, err := grpc.DialContext(ctx, os.Args[1], grpc.WithInsecure(), grpc.WithBlock())
	must(err, "dial")
	defer conn.Close()
	setpoints := pb.NewSetpointServiceClient(conn)

	// Put, then change one field with an update mask: the others stay.
	created, err := setpoints.PutSetpoint(ctx, &pb.PutSetpointRequest{Setpoint: &pb.Setpoint{
		SensorId: "go/room-1", BuildingId: "go", DesiredCelsius: 20,
		UpDeltaCelsius: 1.5, DownDeltaCelsius: 0.5}})
	must(err, "put")
	check(created.Revision == 1, "revision %d", created.Revision)
	updated, err := setpoints.UpdateSetpoint(ctx, &pb.UpdateSetpointRequest{
		Setpoint:   &pb.Setpoint{SensorId: "go/room-1", DesiredCelsius: 22},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"desired_celsius"}}})
	must(err, "update")
	check(updated.Revision == 2 && updated.DesiredCelsius == 22 && updated.UpDeltaCelsius == 1.5,
		"updated %v", updated)
	fmt.Println("put and masked update: ok")

	// A bad request names its field in a BadRequest; a stale revision gives the current one.
	_, err = setpoints.PutSetpoint(ctx, &pb.PutSetpointRequest{Setpoint: &pb.Setpoint{
		SensorId: "go/room-1", BuildingId: "go", DesiredCelsius: 900}})
	var info *errdetails.ErrorInfo
	var violations []string
	for _, d := range refused(err, codes.InvalidArgument).Details() {
		switch d := d.(type) {
		case *errdetails.ErrorInfo:
			info = d
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				violations = append(violations, v.GetField())
			}
		}
	}
	check(info != nil && info.GetReason() == "INVALID_FIELD" && info.GetDomain() == "thermostat",
		"error info %v", info)
	check(len(violations) == 1 && violations[0] == "setpoint.desired_celsius", "%v", violations)
	stale := int64(1)
	_, err = setpoints.UpdateSetpoint(ctx, &pb.UpdateSetpointRequest{
		Setpoint:         &pb.Setpoint{SensorId: "go/room-1", DesiredCelsius: 19},
		UpdateMask:       &fieldmaskpb.FieldMask{Paths: []string{"desired_celsius"}},
		ExpectedRevision: &stale})
	info = nil
	for _, d := range refused(err, codes.Aborted).Details() {
		if d, ok := d.(*errdetails.ErrorInfo); ok {
			info = d
		}
	}
	check(info != nil && info.GetReason() == "REVISION_MISMATCH" &&
		info.GetMetadata()["current_revision"] == "2", "error info %v", info)
	fmt.Println("error details: ok")

	// 1,200 setpoints, paged through at the largest page size.
	for n := 0; n < 1200; n++ {
		_, err := setpoints.PutSetpoint(ctx, &pb.PutSetpointRequest{Setpoint: &pb.Setpoint{
			SensorId: fmt.Sprintf("go-many/room-%04d", n), BuildingId: "go-many",
			DesiredCelsius: 21, UpDeltaCelsius: 0.5, DownDeltaCelsius: 0.5}})
		must(err, "put many")
	}
	var seen []string
	pages, token := 0, ""
	for {
		page, err := setpoints.ListSetpoints(ctx, &pb.ListSetpointsRequest{
			BuildingId: "go-many", PageSize: 1000, PageToken: token})
		must(err, "list")
		for _, s := range page.Setpoints {
			seen = append(seen, s.SensorId)
		}
		pages++
		if token = page.NextPageToken; token == "" {
			break
		}
	}
	check(len(seen) == 1200 && sort.StringsAreSorted(seen), "%d setpoints", len(seen))
	fmt.Printf("paged through 1200 setpoints in %d pages: ok\n", pages)

	// Watch a building: its state, then the marker; a reconnecting client resumes from it.
	heaters := pb.NewHeaterControlServiceClient(conn)
	marker := func(request *pb.WatchHeaterCommandsRequest) *pb.SnapshotComplete {
		watchCtx, stop := context.WithCancel(ctx)
		defer stop()
		watch, err := heaters.WatchHeaterCommands(watchCtx, request)
		must(err, "watch")
		for {
			item, err := watch.Recv()
			check(err != io.EOF, "the watch ended")
			must(err, "watch item")
			if done := item.GetSnapshotComplete(); done != nil {
				return done
			}
		}
	}
	first := marker(&pb.WatchHeaterCommandsRequest{BuildingId: "go"})
	check(!first.Resumed, "a first watch is not resumed")
	again := marker(&pb.WatchHeaterCommandsRequest{BuildingId: "go", ResumeFrom: first.AsOf})
	check(again.Resumed, "a watch from the marker is resumed")
	fmt.Println("watch: snapshot complete and resume: ok")

	// Hold the room at 23 °C for a minute: an override above its setpoint.
	until := time.Now().Add(time.Minute).Truncate(time.Second)
	levels, err := setpoints.WriteSetpointLevel(ctx, &pb.WriteSetpointLevelRequest{
		SensorId: "go/room-1", Level: pb.SetpointLevel_SETPOINT_LEVEL_OVERRIDE,
		DesiredCelsius: 23, UpDeltaCelsius: 0.5, DownDeltaCelsius: 0.5,
		ExpireTime: timestamppb.New(until), Reason: "meeting"})
	must(err, "override")
	check(levels.EffectiveLevel == pb.SetpointLevel_SETPOINT_LEVEL_OVERRIDE &&
		levels.EffectiveUntil.AsTime().Equal(until) && len(levels.Levels) == 2,
		"levels %v", levels)
	fmt.Println("override until a time: ok")
}
