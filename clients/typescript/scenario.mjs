// A dashboard's first steps with thermostat, through the client protoc-gen-es generates and
// Connect-ES's gRPC transport. Usage: node scenario.mjs HOST:PORT (plaintext, authentication
// off). Exits non-zero on the first step that does not behave as docs/api.md says.
import assert from "node:assert/strict";

import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";

import { BadRequestSchema, ErrorInfoSchema } from "./google/rpc/error_details_pb.js";
import { HeaterControlService } from "./thermostat/v1/control_pb.js";
import { SetpointService } from "./thermostat/v1/setpoint_pb.js";

const transport = createGrpcTransport({ baseUrl: `http://${process.argv[2]}` });
const client = createClient(SetpointService, transport);
const heaters = createClient(HeaterControlService, transport);

// The first item of a watch, then the watch is closed.
async function firstOfWatch(request, through = heaters) {
  const abort = new AbortController();
  for await (const item of through.watchHeaterCommands(request, { signal: abort.signal })) {
    abort.abort();
    return item;
  }
  assert.fail("the watch ended without an item");
}

async function refused(call, code) {
  try {
    await call();
  } catch (e) {
    const error = ConnectError.from(e);
    assert.equal(error.code, code, error.message);
    return error;
  }
  assert.fail(`expected ${Code[code]}, the call succeeded`);
}

// Put, then change one field with an update mask: the others stay.
const created = await client.putSetpoint({
  setpoint: {
    sensorId: "ts/room-1", buildingId: "ts", desiredCelsius: 20,
    upDeltaCelsius: 1.5, downDeltaCelsius: 0.5,
  },
});
assert.equal(created.revision, 1n);
const updated = await client.updateSetpoint({
  setpoint: { sensorId: "ts/room-1", desiredCelsius: 22 },
  updateMask: { paths: ["desired_celsius"] },
});
assert.deepEqual(
  [updated.revision, updated.desiredCelsius, updated.upDeltaCelsius],
  [2n, 22, 1.5],
);
console.log("put and masked update: ok");

// A bad request names its field; a stale revision gives the current one.
let error = await refused(() => client.putSetpoint({
  setpoint: { sensorId: "ts/room-1", buildingId: "ts", desiredCelsius: 900 },
}), Code.InvalidArgument);
const [info] = error.findDetails(ErrorInfoSchema);
assert.deepEqual([info.reason, info.domain], ["INVALID_FIELD", "thermostat"]);
const [bad] = error.findDetails(BadRequestSchema);
assert.deepEqual(bad.fieldViolations.map((v) => v.field), ["setpoint.desired_celsius"]);
error = await refused(() => client.updateSetpoint({
  setpoint: { sensorId: "ts/room-1", desiredCelsius: 19 },
  updateMask: { paths: ["desired_celsius"] },
  expectedRevision: 1n,
}), Code.Aborted);
const [stale] = error.findDetails(ErrorInfoSchema);
assert.deepEqual([stale.reason, stale.metadata.current_revision], ["REVISION_MISMATCH", "2"]);
console.log("error details: ok");

// 1,200 setpoints, changed in one batch, paged through at the largest page size.
const rooms = Array.from({ length: 1200 }, (_, n) => `ts-many/room-${String(n).padStart(4, "0")}`);
for (let at = 0; at < rooms.length; at += 100) {
  await Promise.all(rooms.slice(at, at + 100).map((sensorId) => client.putSetpoint({
    setpoint: {
      sensorId, buildingId: "ts-many", desiredCelsius: 21, upDeltaCelsius: 0.5,
      downDeltaCelsius: 0.5,
    },
  })));
}
const batch = await client.batchUpdateSetpoints({
  requests: rooms.slice(0, 1000).map((sensorId) => ({
    setpoint: { sensorId, desiredCelsius: 19 },
    updateMask: { paths: ["desired_celsius"] },
  })),
});
assert.equal(batch.results.length, 1000);
assert.ok(batch.results.every((r) => r.result.case === "setpoint" && r.result.value.desiredCelsius === 19));
const seen = [];
let pageToken = "";
let pages = 0;
do {
  const page = await client.listSetpoints({ buildingId: "ts-many", pageSize: 1000, pageToken });
  seen.push(...page.setpoints.map((s) => s.sensorId));
  pageToken = page.nextPageToken;
  pages += 1;
} while (pageToken !== "");
assert.deepEqual(seen, rooms);
console.log(`batch of 1000 and paged through 1200 setpoints in ${pages} pages: ok`);

// Watch a building: its state is complete at once (no heater has a command yet), and a
// reconnecting client resumes from the marker.
const first = await firstOfWatch({ buildingId: "ts-many" });
assert.equal(first.kind.case, "snapshotComplete");
assert.equal(first.kind.value.resumed, false);
const again = await firstOfWatch({ buildingId: "ts-many", resumeFrom: first.kind.value.asOf });
assert.equal(again.kind.case, "snapshotComplete");
assert.equal(again.kind.value.resumed, true);
console.log("watch: snapshot complete and resume: ok");

// The same API over gRPC-Web on HTTP/1.1, as a browser calls it: a unary call and a stream.
const webTransport = createGrpcWebTransport({
  baseUrl: `http://${process.argv[2]}`,
  httpVersion: "1.1",
});
const viaWeb = await createClient(SetpointService, webTransport).getSetpoint({ sensorId: "ts/room-1" });
assert.equal(viaWeb.desiredCelsius, 22);
const webWatch = await firstOfWatch(
  { buildingId: "ts-many" },
  createClient(HeaterControlService, webTransport),
);
assert.equal(webWatch.kind.case, "snapshotComplete");
console.log("grpc-web over HTTP/1.1: ok");
