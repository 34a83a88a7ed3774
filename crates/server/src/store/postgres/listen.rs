//! Waking long polls across instances: `LISTEN` on the schema's channel, re-opened with backoff.

use std::sync::Arc;
use std::time::Duration;

use deltasync_protocol::UserId;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::store::notify::Notifier;

/// The longest channel name PostgreSQL keeps (NAMEDATALEN - 1).
const MAX_CHANNEL_BYTES: usize = 63;

/// The notification channel of the schema the connection works in: one per
/// deployment, so that deployments sharing a database never wake each other.
pub(super) fn channel_name(schema: &str) -> String {
    let name = format!("deltasync_{schema}");
    if name.len() <= MAX_CHANNEL_BYTES {
        return name;
    }
    let digest = Sha256::digest(schema.as_bytes());
    format!("deltasync_{}", &hex::encode(digest)[..32])
}

/// `name` as a quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Keeps one connection listening on `channel` and wakes local waiters for
/// every push another instance commits; re-opens the connection with backoff.
pub(super) async fn listen(config: tokio_postgres::Config, channel: String, notifier: Arc<Notifier>) {
    let mut delay = Duration::from_millis(100);
    loop {
        match listen_once(&config, &channel, &notifier).await {
            Ok(()) => {
                tracing::warn!("the PostgreSQL notification connection closed; re-opening it");
                delay = Duration::from_millis(100);
            }
            Err(e) => tracing::warn!(error = %e, retry_in = ?delay, "cannot listen for pushes from other instances"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Listens on one connection until it closes, waking local waiters for every notification.
async fn listen_once(
    config: &tokio_postgres::Config,
    channel: &str,
    notifier: &Notifier,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            let sent = match message? {
                AsyncMessage::Notification(n) => tx.send(n).is_ok(),
                AsyncMessage::Notice(n) => {
                    tracing::debug!(notice = %n, "PostgreSQL notice");
                    true
                }
                _ => true,
            };
            if !sent {
                break;
            }
        }
        Ok::<(), tokio_postgres::Error>(())
    });
    client.batch_execute(&format!("LISTEN {}", quote_ident(channel))).await?;
    // Pushes committed while nobody listened may have gone unnoticed.
    notifier.wake_all();
    while let Some(n) = rx.recv().await {
        let Some((head, user)) = n.payload().split_once(' ') else { continue };
        let (Ok(head), Ok(user)) = (head.parse::<u64>(), UserId::parse(user)) else { continue };
        notifier.publish(&user, head);
    }
    drop(client);
    match driver.await {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_fit_postgres_identifiers() {
        assert_eq!(channel_name("public"), "deltasync_public");
        let long = "s".repeat(80);
        let name = channel_name(&long);
        assert!(name.len() <= MAX_CHANNEL_BYTES, "{name}");
        assert_ne!(name, channel_name(&"t".repeat(80)));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
