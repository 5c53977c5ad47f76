//! CancelRequest forwarding. Each client gets a proxy-made (pid, secret)
//! in BackendKeyData; while it holds a server connection, its entry points
//! at that server's real key. A CancelRequest arriving on a new connection
//! is looked up here and re-sent to the right server.

use rand::Rng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub addr: Arc<str>,
    pub pid: i32,
    pub secret: i32,
}

pub type CancelSlot = Arc<Mutex<Option<CancelTarget>>>;

#[derive(Default)]
pub struct CancelRegistry {
    clients: Mutex<HashMap<(i32, i32), CancelSlot>>,
}

impl CancelRegistry {
    /// Registers a new client; returns its key and its slot.
    pub fn register(&self) -> ((i32, i32), CancelSlot) {
        let mut rng = rand::thread_rng();
        let mut map = crate::lock(&self.clients);
        loop {
            let key = (rng.gen_range(1..i32::MAX), rng.gen::<i32>());
            if let std::collections::hash_map::Entry::Vacant(e) = map.entry(key) {
                let slot = CancelSlot::default();
                e.insert(slot.clone());
                return (key, slot);
            }
        }
    }

    pub fn unregister(&self, key: (i32, i32)) {
        crate::lock(&self.clients).remove(&key);
    }

    /// Forwards a cancel for `key` if that client is running something.
    pub async fn cancel(&self, key: (i32, i32)) {
        let target = {
            let map = crate::lock(&self.clients);
            map.get(&key).and_then(|slot| crate::lock(slot).clone())
        };
        match target {
            Some(t) => {
                if let Err(e) = crate::backend::conn::send_cancel(&t.addr, t.pid, t.secret).await {
                    tracing::warn!(server = %t.addr, error = %e, "forwarding cancel failed");
                }
            }
            None => tracing::debug!("cancel request for an idle or unknown client ignored"),
        }
    }
}
