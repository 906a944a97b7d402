//! The control socket's routes: an HTTP request becomes a [`VmmAction`], and the action's
//! result becomes a response. The one place that maps [`VmmActionError`] to HTTP statuses.
//!
//! | route                | method | body                                   | answer            |
//! |----------------------|--------|----------------------------------------|-------------------|
//! | `/vm`                | GET    |                                        | 200 [`VmInfo`]    |
//! | `/vm`                | PATCH  | `{"state": "paused" \| "running"}`     | 204               |
//! | `/vm`                | PUT    | [`StartVmBody`] + descriptors          | 204               |
//! | `/snapshot/create`   | PUT    | `{"snapshot_dir": ABS}`                | 200 JSON          |
//! | `/snapshot/create`   | PUT    | [`SnapshotCreateBody`] + descriptors   | 200 JSON          |
//! | `/snapshot/load`     | PUT    | `{"snapshot_dir": ABS, "resume": b}`   | 200 JSON          |
//! | `/snapshot/load`     | PUT    | [`SnapshotLoadBody`] + descriptors     | 200 JSON          |
//! | `/actions`           | PUT    | `{"action_type": "stop"}`              | 200 [`RunReport`] |
//! | `/actions`           | PUT    | `{"action_type": "finish", "grace_ms": n}` | 200 [`RunReport`] |
//! | `/metrics`           | GET    |                                        | 200 [`VmMetrics`] |
//!
//! `PUT /vm` starts a spare (`cella-vmm spare`): the request carries the devices' host ends as
//! descriptors (`SCM_RIGHTS`, at most [`MAX_FDS`]), and its body says which is which; so does
//! `PUT /snapshot/load` into a spare session VMM (`cella-vmm session --api-fd`), with the
//! snapshot's files and the vsock listener instead of `snapshot_dir`. Any other request that
//! carries descriptors is refused (400) and they are closed.
//!
//! Errors: 400 (malformed), 404 (no such route), 405 (wrong method), 409 (wrong state), 413
//! (body over 64 KiB), 500 (the VMM failed), each with
//! `{"fault_message": "..."}`.
//!
//! [`VmInfo`]: crate::rpc_interface::VmInfo
//! [`VmMetrics`]: crate::rpc_interface::VmMetrics
//! [`RunReport`]: crate::RunReport

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use std::time::Duration;

use super::http::{HttpError, Request, Response};
use crate::handover::{HandedSnapshot, HandedSnapshotOutput, Handover, StartVm, MAX_FDS};
use crate::rpc_interface::{VmmAction, VmmActionError, VmmData};

/// How long `finish` waits for the guest to end on its own unless told otherwise.
pub const FINISH_GRACE_MS: u64 = 1000;
/// The longest `grace_ms` a `finish` may ask for.
pub const FINISH_GRACE_MAX_MS: u64 = 10_000;

/// `PATCH /vm`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStatePatch {
    pub state: WantedState,
}

/// The states a client may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WantedState {
    Paused,
    Running,
}

/// `PUT /vm`: which handed-over descriptor is which (indices into the request's descriptors).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartVmBody {
    /// Attached read-only as the disk: a regular file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_fd: Option<usize>,
    /// The guest's connection to `port` gets the connected Unix stream socket `fd`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vsock_channels: Vec<VsockChannel>,
}

/// One vsock channel of a [`StartVmBody`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockChannel {
    pub port: u32,
    pub fd: usize,
}

/// `PUT /snapshot/create`: the folder to write the snapshot into, or (with descriptors) the two
/// new, empty files to write it into (the client renames them into place).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_fd: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_fd: Option<usize>,
}

impl SnapshotCreateBody {
    /// The action: into a folder without descriptors, into the files with them.
    fn action(self, fds: Handover) -> Result<VmmAction, Response> {
        match (self.snapshot_dir, fds.is_empty(), self.memory_fd, self.state_fd) {
            (Some(snapshot_dir), true, None, None) => Ok(VmmAction::CreateSnapshot { snapshot_dir }),
            (None, false, Some(memory_fd), Some(state_fd)) => {
                let handed = HandedSnapshotOutput { memory_fd, state_fd, fds };
                handed.check().map_err(|why| Response::fault(400, format!("PUT /snapshot/create: {why}")))?;
                Ok(VmmAction::CreateSnapshotInto { handed })
            }
            _ => Err(Response::fault(
                400,
                "PUT /snapshot/create takes either snapshot_dir, or memory_fd and state_fd with those \
                 descriptors attached",
            )),
        }
    }
}

/// `PUT /snapshot/load`: the snapshot's folder, or (with descriptors) which descriptor holds
/// which of its files.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_dir: Option<PathBuf>,
    #[serde(default)]
    pub resume: bool,
    /// The state file (`state.bin`), a regular file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_fd: Option<usize>,
    /// The memory file (`memory.bin`), a regular file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_fd: Option<usize>,
    /// The disk, if the snapshot's VM had one: a regular file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_fd: Option<usize>,
    /// The vsock device's host socket, if the VM had one: a listening Unix stream socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_fd: Option<usize>,
    /// With descriptors: stop the VM (as `timed_out`) this many ms after it starts, instead of
    /// the VMM's `--max-duration-secs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration_ms: Option<u64>,
}

impl SnapshotLoadBody {
    /// The action: by folder without descriptors, by descriptors without a folder.
    fn action(self, fds: Handover) -> Result<VmmAction, Response> {
        let handed = (self.state_fd, self.memory_fd, self.disk_fd, self.vsock_fd);
        let max_duration = self.max_duration_ms.map(Duration::from_millis);
        match (self.snapshot_dir, fds.is_empty(), handed) {
            (Some(snapshot_dir), true, (None, None, None, None)) if max_duration.is_none() => {
                Ok(VmmAction::LoadSnapshot { snapshot_dir, resume: self.resume })
            }
            (None, false, (Some(state_fd), Some(memory_fd), disk_fd, vsock_fd)) => {
                let handed = HandedSnapshot { state_fd, memory_fd, disk_fd, vsock_fd, fds };
                handed.check().map_err(|why| Response::fault(400, format!("PUT /snapshot/load: {why}")))?;
                Ok(VmmAction::LoadHandedSnapshot { handed, resume: self.resume, max_duration })
            }
            _ => Err(Response::fault(
                400,
                "PUT /snapshot/load takes either snapshot_dir, or state_fd and memory_fd (and \
                 disk_fd, vsock_fd, max_duration_ms) with those descriptors attached",
            )),
        }
    }
}

/// `PUT /actions`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    pub action_type: ActionType,
    /// `finish` only: how long to wait for the guest to end on its own, in ms (default
    /// [`FINISH_GRACE_MS`], at most [`FINISH_GRACE_MAX_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_ms: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionType {
    Stop,
    Finish,
}

/// The HTTP status for an action's error: the only such mapping in the VMM.
pub fn status_of(error: &VmmActionError) -> u16 {
    match error {
        VmmActionError::BadRequest(_) => 400,
        VmmActionError::WrongState { .. } => 409,
        VmmActionError::Internal { .. } => 500,
    }
}

/// The response for a request that could not be read.
pub fn for_http_error(error: &HttpError) -> Response {
    match error {
        HttpError::TooLarge(why) => Response::fault(413, why.clone()),
        other => Response::fault(400, other.to_string()),
    }
}

/// The action a request asks for, or the response that refuses it.
pub fn route(request: &Request) -> Result<VmmAction, Response> {
    route_with(request, Handover::default())
}

/// [`route`] for a request that came with descriptors.
pub fn route_with(request: &Request, fds: Handover) -> Result<VmmAction, Response> {
    let method = request.method.as_str();
    let takes_fds =
        matches!(request.path.as_str(), "/vm" | "/snapshot/load" | "/snapshot/create") && method == "PUT";
    if !fds.is_empty() && !takes_fds {
        return Err(Response::fault(400, format!("{method} {} takes no descriptors", request.path)));
    }
    if fds.len() > MAX_FDS {
        return Err(Response::fault(400, format!("a request carries at most {MAX_FDS} descriptors")));
    }
    match request.path.as_str() {
        "/vm" => match method {
            "GET" => no_body(request).map(|()| VmmAction::GetState),
            "PATCH" => body::<VmStatePatch>(request).map(|patch| match patch.state {
                WantedState::Paused => VmmAction::Pause,
                WantedState::Running => VmmAction::Resume,
            }),
            "PUT" => body::<StartVmBody>(request).and_then(|b| {
                let start = StartVm {
                    disk_fd: b.disk_fd,
                    vsock_channels: b.vsock_channels.iter().map(|c| (c.port, c.fd)).collect(),
                    fds,
                };
                start.check().map_err(|why| Response::fault(400, format!("PUT /vm: {why}")))?;
                Ok(VmmAction::StartVm(start))
            }),
            _ => Err(not_allowed("GET, PATCH, PUT")),
        },
        "/snapshot/create" => match method {
            "PUT" => body::<SnapshotCreateBody>(request).and_then(|b| b.action(fds)),
            _ => Err(not_allowed("PUT")),
        },
        "/snapshot/load" => match method {
            "PUT" => body::<SnapshotLoadBody>(request).and_then(|b| b.action(fds)),
            _ => Err(not_allowed("PUT")),
        },
        "/actions" => match method {
            "PUT" => body::<ActionBody>(request).and_then(|b| match (b.action_type, b.grace_ms) {
                (ActionType::Stop, None) => Ok(VmmAction::Stop),
                (ActionType::Stop, Some(_)) => Err(Response::fault(400, "grace_ms is for finish only")),
                (ActionType::Finish, grace) => match grace.unwrap_or(FINISH_GRACE_MS) {
                    ms if ms > FINISH_GRACE_MAX_MS => Err(Response::fault(
                        400,
                        format!("grace_ms {ms} is over the limit of {FINISH_GRACE_MAX_MS}"),
                    )),
                    ms => Ok(VmmAction::Finish { grace: Duration::from_millis(ms) }),
                },
            }),
            _ => Err(not_allowed("PUT")),
        },
        "/metrics" => match method {
            "GET" => no_body(request).map(|()| VmmAction::GetMetrics),
            _ => Err(not_allowed("GET")),
        },
        other => Err(Response::fault(
            404,
            format!("no route {other}; routes: /vm, /snapshot/create, /snapshot/load, /actions, /metrics"),
        )),
    }
}

/// The response for an action's result.
pub fn respond(result: Result<VmmData, VmmActionError>) -> Response {
    match result {
        Ok(VmmData::Empty) => Response::no_content(),
        Ok(data) => Response::json(200, &data),
        Err(e) => Response::fault(status_of(&e), e.to_string()),
    }
}

fn not_allowed(allow: &'static str) -> Response {
    Response {
        allow: Some(allow),
        ..Response::fault(405, format!("method not allowed here; allowed: {allow}"))
    }
}

fn no_body(request: &Request) -> Result<(), Response> {
    if request.body.is_empty() {
        Ok(())
    } else {
        Err(Response::fault(400, format!("{} {} takes no body", request.method, request.path)))
    }
}

fn body<T: DeserializeOwned>(request: &Request) -> Result<T, Response> {
    serde_json::from_slice(&request.body).map_err(|e| {
        Response::fault(400, format!("bad JSON body for {} {}: {e}", request.method, request.path))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request { method: method.into(), path: path.into(), body: body.as_bytes().to_vec() }
    }

    #[test]
    fn routes_each_request_to_its_action() {
        let cases = [
            (req("GET", "/vm", ""), VmmAction::GetState),
            (req("PATCH", "/vm", r#"{"state":"paused"}"#), VmmAction::Pause),
            (req("PATCH", "/vm", r#"{"state":"running"}"#), VmmAction::Resume),
            (req("PUT", "/actions", r#"{"action_type":"stop"}"#), VmmAction::Stop),
            (req("GET", "/metrics", ""), VmmAction::GetMetrics),
            (
                req("PUT", "/snapshot/create", r#"{"snapshot_dir":"/s"}"#),
                VmmAction::CreateSnapshot { snapshot_dir: "/s".into() },
            ),
            (
                req("PUT", "/snapshot/load", r#"{"snapshot_dir":"/s","resume":true}"#),
                VmmAction::LoadSnapshot { snapshot_dir: "/s".into(), resume: true },
            ),
        ];
        for (request, action) in cases {
            assert_eq!(route(&request).unwrap(), action, "{request:?}");
        }
    }

    #[test]
    fn refuses_unknown_routes_methods_and_bodies() {
        let status = |r: Request| route(&r).unwrap_err().status;
        assert_eq!(status(req("GET", "/nope", "")), 404);
        assert_eq!(status(req("GET", "/vm?x=1", "")), 404);
        assert_eq!(status(req("DELETE", "/vm", "")), 405);
        assert_eq!(route(&req("POST", "/actions", "")).unwrap_err().allow, Some("PUT"));
        assert_eq!(status(req("PATCH", "/vm", r#"{"state":"stopped"}"#)), 400);
        assert_eq!(status(req("PATCH", "/vm", r#"{"state":"paused","x":1}"#)), 400);
        assert_eq!(status(req("PUT", "/actions", r#"{"action_type":"reboot"}"#)), 400);
        assert_eq!(status(req("GET", "/vm", "{}")), 400);
        assert_eq!(status(req("PATCH", "/vm", "not json")), 400);
    }

    #[test]
    fn a_load_takes_a_folder_or_descriptors_never_both_nor_half() {
        let fds = |n: usize| {
            Handover::new((0..n).map(|_| std::os::unix::net::UnixStream::pair().unwrap().0.into()).collect())
        };
        let load = |body: &str, n: usize| route_with(&req("PUT", "/snapshot/load", body), fds(n));
        let handed =
            load(r#"{"state_fd":1,"memory_fd":0,"vsock_fd":2,"resume":true,"max_duration_ms":5000}"#, 3);
        match handed.unwrap() {
            VmmAction::LoadHandedSnapshot { handed, resume: true, max_duration } => {
                assert_eq!(
                    (handed.state_fd, handed.memory_fd, handed.disk_fd, handed.vsock_fd),
                    (1, 0, None, Some(2))
                );
                assert_eq!(max_duration, Some(Duration::from_secs(5)));
            }
            other => panic!("{other:?}"),
        }
        let refused = |body: &str, n: usize| load(body, n).unwrap_err();
        for (body, n) in [
            (r#"{"snapshot_dir":"/s","state_fd":0,"memory_fd":1}"#, 2),
            (r#"{"snapshot_dir":"/s"}"#, 1),
            (r#"{"state_fd":0}"#, 1),
            (r#"{"state_fd":0,"memory_fd":1}"#, 0),
            (r#"{"snapshot_dir":"/s","max_duration_ms":1}"#, 0),
        ] {
            assert_eq!(refused(body, n).status, 400, "{body} with {n} descriptors");
        }
        let named_twice = refused(r#"{"state_fd":0,"memory_fd":0}"#, 1);
        let said = String::from_utf8_lossy(named_twice.body.as_deref().unwrap()).into_owned();
        assert!(said.contains("named twice"), "{said}");
    }

    #[test]
    fn error_kinds_map_to_their_statuses() {
        use crate::rpc_interface::VmState;
        let wrong = VmmActionError::WrongState { action: "pause", state: VmState::Paused, hint: " already" };
        let response = respond(Err(wrong));
        assert_eq!(response.status, 409);
        let body: serde_json::Value = serde_json::from_slice(response.body.as_deref().unwrap()).unwrap();
        assert_eq!(body["fault_message"], "cannot pause: the VM is paused already");
        assert_eq!(respond(Err(VmmActionError::BadRequest("x".into()))).status, 400);
        assert_eq!(respond(Ok(VmmData::Empty)).status, 204);
    }
}
