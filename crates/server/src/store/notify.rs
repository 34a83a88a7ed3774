//! Wakes long-polling pulls when a dataset's head moves.

use std::collections::HashMap;
use std::sync::Mutex;

use deltasync_protocol::UserId;
use tokio::sync::watch;

/// One watch channel per dataset that someone waits on.
#[derive(Debug, Default)]
pub struct Notifier {
    heads: Mutex<HashMap<UserId, watch::Sender<u64>>>,
}

impl Notifier {
    /// A receiver of `user`'s head seq.
    pub fn subscribe(&self, user: &UserId) -> watch::Receiver<u64> {
        let mut heads = self.heads.lock().expect("notifier lock");
        heads.entry(user.clone()).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    /// Tells every waiter on `user` that the head is now `head`.
    pub fn publish(&self, user: &UserId, head: u64) {
        let mut heads = self.heads.lock().expect("notifier lock");
        if let Some(tx) = heads.get(user) {
            if tx.receiver_count() == 0 {
                heads.remove(user);
            } else {
                tx.send_replace(head);
            }
        }
    }

    /// Wakes every waiter, with the head unchanged: used when notifications may have been missed.
    pub fn wake_all(&self) {
        let heads = self.heads.lock().expect("notifier lock");
        for tx in heads.values() {
            tx.send_modify(|_| {});
        }
    }
}
