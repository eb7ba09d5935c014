//! Parsing of the listen and `--join` multiaddrs. Only what the transport can dial is
//! accepted (`/ip4|ip6/<ip>/tcp/<port>`, no DNS), so a typo fails at start instead of
//! being retried forever.

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

use super::DiscoveryError;

/// A `--join` address split into what to dial and, if given, who should answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct JoinAddr {
    /// The original text, for logs.
    pub text: String,
    /// The address without `/p2p/<id>`.
    pub addr: Multiaddr,
    pub peer: Option<PeerId>,
}

pub(super) fn parse_listen(text: &str) -> Result<Multiaddr, DiscoveryError> {
    let bad = |reason: String| DiscoveryError::BadListenAddress {
        addr: text.to_owned(),
        reason,
    };
    let addr: Multiaddr = text.trim().parse().map_err(|e| bad(format!("{e}")))?;
    let (dialable, peer) = split_tcp(&addr).map_err(bad)?;
    if peer.is_some() {
        return Err(bad("a listen address cannot name a peer id".into()));
    }
    Ok(dialable)
}

pub(super) fn parse_join(text: &str) -> Result<JoinAddr, DiscoveryError> {
    let bad = |reason: String| DiscoveryError::BadJoinAddress {
        addr: text.to_owned(),
        reason,
    };
    let addr: Multiaddr = text.trim().parse().map_err(|e| bad(format!("{e}")))?;
    let (addr, peer) = split_tcp(&addr).map_err(bad)?;
    Ok(JoinAddr {
        text: text.to_owned(),
        addr,
        peer,
    })
}

/// Checks `/ip4|ip6/<ip>/tcp/<port>[/p2p/<id>]` and splits off the peer id.
fn split_tcp(addr: &Multiaddr) -> Result<(Multiaddr, Option<PeerId>), String> {
    let parts: Vec<Protocol<'_>> = addr.iter().collect();
    match parts.as_slice() {
        [ip @ (Protocol::Ip4(_) | Protocol::Ip6(_)), tcp @ Protocol::Tcp(_)] => {
            Ok(([ip.clone(), tcp.clone()].into_iter().collect(), None))
        }
        [ip @ (Protocol::Ip4(_) | Protocol::Ip6(_)), tcp @ Protocol::Tcp(_), Protocol::P2p(peer)] => {
            Ok(([ip.clone(), tcp.clone()].into_iter().collect(), Some(*peer)))
        }
        [] => Err("empty address".into()),
        _ => Err("unsupported protocols".into()),
    }
}

/// `addr` with `/p2p/<peer>` appended, as published in a record.
pub(super) fn with_peer(addr: &Multiaddr, peer: PeerId) -> Multiaddr {
    addr.clone().with(Protocol::P2p(peer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_addresses_with_and_without_peer_id() {
        let peer = PeerId::random();
        let j = parse_join(&format!("/ip4/127.0.0.1/tcp/4001/p2p/{peer}")).unwrap();
        assert_eq!(j.peer, Some(peer));
        assert_eq!(j.addr.to_string(), "/ip4/127.0.0.1/tcp/4001");
        let j = parse_join("/ip4/127.0.0.1/tcp/4001").unwrap();
        assert_eq!(j.peer, None);
        for bad in [
            "",
            "garbage",
            "127.0.0.1:4001",
            "/ip4/127.0.0.1/udp/4001",
            "/dns4/localhost/tcp/4001",
            "/ip4/127.0.0.1/tcp/4001/p2p/notapeer",
        ] {
            assert!(
                matches!(parse_join(bad), Err(DiscoveryError::BadJoinAddress { .. })),
                "{bad:?} must be rejected"
            );
        }
        assert!(parse_listen("/ip4/127.0.0.1/tcp/0").is_ok());
        assert!(parse_listen(&format!("/ip4/127.0.0.1/tcp/0/p2p/{peer}")).is_err());
    }
}
