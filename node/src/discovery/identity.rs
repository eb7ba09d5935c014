//! The node's libp2p identity: an ed25519 keypair in `<data_dir>/p2p_key` (libp2p's
//! protobuf encoding), created on first start and reused after, so the peer id is stable
//! across restarts.

use std::io::Write as _;
use std::path::Path;

use libp2p::identity::Keypair;

use super::DiscoveryError;

const KEY_FILE: &str = "p2p_key";

/// Loads the keypair, or creates and stores a new one if the file does not exist.
/// A file that exists but does not decode is an error, never silently replaced: a new key
/// means a new peer id, which the operator must choose knowingly.
pub(super) fn load_or_create(data_dir: &Path) -> Result<Keypair, DiscoveryError> {
    let path = data_dir.join(KEY_FILE);
    let io_err = |source| DiscoveryError::KeyIo {
        path: path.clone(),
        source,
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            Keypair::from_protobuf_encoding(&bytes).map_err(|e| DiscoveryError::CorruptKey {
                path: path.clone(),
                reason: e.to_string(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir).map_err(io_err)?;
            let keypair = Keypair::generate_ed25519();
            let bytes = keypair
                .to_protobuf_encoding()
                .map_err(|e| DiscoveryError::CorruptKey {
                    path: path.clone(),
                    reason: format!("cannot encode the new key: {e}"),
                })?;
            write_atomically(&path, &bytes).map_err(io_err)?;
            Ok(keypair)
        }
        Err(e) => Err(io_err(e)),
    }
}

/// Writes to a temporary file, syncs it and renames it over `path`, so a crash leaves
/// either no key file or a whole one.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        // Make the rename itself durable; not every platform can open a directory.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
