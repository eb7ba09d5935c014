//! The node registry (meta group): which nodes belong to the cluster and where they listen.

use super::{Applied, CommandError, NodeInfo, Outcome, State};

pub(super) fn register(state: &mut State, info: NodeInfo) -> Outcome {
    if info.node_id == 0 || info.grpc.is_empty() {
        return Err(CommandError::Invalid {
            reason: "a node needs an id and a gRPC address".into(),
        });
    }
    let node = info.node_id;
    let new = match state.nodes.get_mut(&node) {
        Some(known) => {
            // Keep the first registration time; addresses may move across restarts.
            let registered_at = known.registered_at;
            *known = NodeInfo {
                registered_at,
                ..info
            };
            false
        }
        None => {
            state.nodes.insert(node, info);
            true
        }
    };
    Ok(Applied::NodeRegistered { node, new })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::state::{apply, Command};

    fn info(id: u64, grpc: &str, at: u64) -> NodeInfo {
        NodeInfo {
            node_id: id,
            grpc: grpc.into(),
            http: String::new(),
            p2p: vec![],
            registered_at: at,
        }
    }

    #[test]
    fn register_and_update_addresses() {
        let mut s = State::default();
        let r = apply(
            &mut s,
            Command::RegisterNode {
                info: info(7, "127.0.0.1:1", 10),
            },
        );
        assert_eq!(r, Ok(Applied::NodeRegistered { node: 7, new: true }));
        let r = apply(
            &mut s,
            Command::RegisterNode {
                info: info(7, "127.0.0.1:2", 20),
            },
        );
        assert_eq!(
            r,
            Ok(Applied::NodeRegistered {
                node: 7,
                new: false
            })
        );
        assert_eq!(s.nodes[&7].grpc, "127.0.0.1:2");
        assert_eq!(s.nodes[&7].registered_at, 10);
        let before = s.clone();
        assert!(apply(
            &mut s,
            Command::RegisterNode {
                info: info(0, "x", 1)
            }
        )
        .is_err());
        assert_eq!(s, before);
    }
}
