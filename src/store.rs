//! Where the cluster state that the control plane changes lives: which
//! server is each shard's primary after a failover, which servers are
//! fenced, and the topology epoch. The embedded default is one JSON file,
//! `<proxy.state_dir>/cluster.json`, replaced atomically (write, fsync,
//! rename, fsync the directory) so a crash leaves the old or the new state,
//! never half of one.
//!
//! The file overrides the configuration for the shards it names: a restarted
//! proxy comes back with the primary failover chose, not the one the
//! configuration file still lists.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// The topology epoch of the last change the control plane made.
    pub epoch: u64,
    #[serde(default)]
    pub shards: Vec<ShardState>,
    /// Bucket owners changed by resharding, by shard name (ranges such as
    /// `"0-127"`); empty: the configuration's map.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buckets: Vec<BucketOwner>,
    /// Bucket moves not yet finished, and the last finished ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moves: Vec<crate::reshard::Move>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketOwner {
    pub shard: String,
    pub buckets: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardState {
    pub name: String,
    /// `host:port` of the primary.
    pub primary: String,
    /// Replicas in use (settings such as weight come from the
    /// configuration when it lists the address).
    pub replicas: Vec<String>,
    /// Former primaries: never given traffic again until rejoined.
    #[serde(default)]
    pub fenced: Vec<String>,
    /// A promotion was decided but not confirmed done: the next start
    /// finishes it.
    #[serde(default)]
    pub promoting: bool,
}

impl ClusterState {
    pub fn shard(&self, name: &str) -> Option<&ShardState> {
        self.shards.iter().find(|s| s.name == name)
    }

    /// Sets the state of one shard (replacing what was there).
    pub fn set_shard(&mut self, state: ShardState) {
        match self.shards.iter_mut().find(|s| s.name == state.name) {
            Some(s) => *s = state,
            None => self.shards.push(state),
        }
    }
}

/// The state file of one proxy.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    pub fn new(state_dir: &Path) -> Store {
        Store {
            path: state_dir.join("cluster.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state; an empty one when there is no file yet.
    pub fn load(&self) -> std::io::Result<ClusterState> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", self.path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ClusterState::default()),
            Err(e) => Err(e),
        }
    }

    /// Replaces the saved state; durable when this returns.
    pub fn save(&self, state: &ClusterState) -> std::io::Result<()> {
        use std::io::Write;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = self.path.with_extension("json.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        std::fs::File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&dir.path().join("state"));
        assert_eq!(store.load().unwrap(), ClusterState::default());
        let mut s = ClusterState {
            epoch: 7,
            ..ClusterState::default()
        };
        s.set_shard(ShardState {
            name: "s0".into(),
            primary: "127.0.0.1:2".into(),
            replicas: vec!["127.0.0.1:3".into()],
            fenced: vec!["127.0.0.1:1".into()],
            promoting: false,
        });
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap(), s);
        std::fs::write(store.path(), b"{").unwrap();
        assert!(store.load().is_err());
    }
}
