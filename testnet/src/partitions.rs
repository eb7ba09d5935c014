//! Aiming at partitions: room names that land in a given partition, and the
//! membership writes (`JoinRoom` / `LeaveRoom`) that go through that partition's Raft
//! group. Shared by `failover` and `raft-bench`.

use std::time::Duration;

use parley_node::ids::PartitionId;
use parley_proto::v1::chat_client::ChatClient;
use parley_proto::v1::{JoinRoomRequest, LeaveRoomRequest};
use tonic::transport::Channel;
use tonic::Code;

use crate::bench::setup::{authed, User};

/// `per_partition` room names `"{prefix}-p{p}-{k}"` for every partition `p`, each
/// chosen so that its room lives in `p` (a room and its name share a partition).
pub fn room_names(prefix: &str, partitions: u32, per_partition: usize) -> Vec<(u32, String)> {
    let mut out = Vec::with_capacity(partitions as usize * per_partition);
    for p in 0..partitions {
        let mut found = 0;
        // Each candidate lands in p with probability 1/P: 10,000 tries cannot all miss
        // for any P a cluster uses.
        for k in 0..10_000u32 {
            if found == per_partition {
                break;
            }
            let name = format!("{prefix}-p{p}-{k}");
            if PartitionId::of_room_name(&name, partitions).0 == p {
                out.push((p, name));
                found += 1;
            }
        }
    }
    out
}

/// One membership write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Join,
    Leave,
}

/// How a membership write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The change applied.
    Done,
    /// The partition's state machine refused it (already a member / not a member):
    /// the write still went through the group's leader, the state just differed.
    Refused(Code),
    /// Not through: unavailable, timeout, transport error.
    Failed(String),
}

/// `JoinRoom` or `LeaveRoom` of `room` as `user`, bounded by `timeout`.
pub async fn membership_write(
    client: &ChatClient<Channel>,
    user: &User,
    room: &str,
    op: Op,
    timeout: Duration,
) -> Outcome {
    let mut c = client.clone();
    let res = match op {
        Op::Join => {
            let req = authed(
                JoinRoomRequest {
                    room: room.to_string(),
                },
                &user.auth,
            );
            tokio::time::timeout(timeout, async move { c.join_room(req).await.map(|_| ()) }).await
        }
        Op::Leave => {
            let req = authed(
                LeaveRoomRequest {
                    room: room.to_string(),
                },
                &user.auth,
            );
            tokio::time::timeout(timeout, async move { c.leave_room(req).await.map(|_| ()) }).await
        }
    };
    match res {
        Ok(Ok(())) => Outcome::Done,
        Ok(Err(s)) => match (op, s.code()) {
            (Op::Join, Code::AlreadyExists) | (Op::Leave, Code::PermissionDenied) => {
                Outcome::Refused(s.code())
            }
            (_, code) => Outcome::Failed(format!("{code:?}")),
        },
        Err(_) => Outcome::Failed("ClientTimeout".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_every_partition() {
        let names = room_names("x", 16, 2);
        assert_eq!(names.len(), 32);
        for p in 0..16 {
            assert_eq!(names.iter().filter(|(q, _)| *q == p).count(), 2);
        }
        for (p, n) in &names {
            assert_eq!(PartitionId::of_room_name(n, 16).0, *p);
            assert!(parley_node::ids::validate_room_name(n).is_ok(), "{n}");
        }
    }
}
