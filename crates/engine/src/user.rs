//! The replica belongs to one user: the one the server named in its first
//! answer. A token for another user never gets this replica's changes, and
//! never sends them into another user's dataset.
//!
//! The engine keeps the user (`user_id`) and the token it was learned with
//! (`user_token`: the token's `sub` claim when it is a JWT, otherwise a
//! fingerprint). A request with another token first asks the server whose it
//! is (`GET /v1/status` without a device id, so the other dataset records
//! nothing of this device) and is refused, before anything of the replica is
//! sent, when the answer names another user.

use base64::Engine as _;
use deltasync_protocol::wire::ConflictsResponse;
use serde_json::Value;

use crate::clock::Clock;
use crate::engine::{Engine, Origin};
use crate::error::{Error, Result};
use crate::replica::{self, keys};
use crate::store::{Access, LocalStore, StoreTx};
use crate::transport::Transport;

/// The meta key of the token the user was learned with.
const USER_TOKEN: &str = "user_token";

/// The `sub` claim of a JWT, read without checking its signature (the server
/// checks it); `None` for anything else.
pub fn token_subject(token: &str) -> Option<String> {
    let mut parts = token.split('.');
    let (_header, claims, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims.trim_end_matches('=')).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("sub")?.as_str().map(str::to_owned)
}

/// What identifies a token's user without keeping the token: its `sub`, or a
/// fingerprint (FNV-1a) of an opaque token, or `none`.
pub fn token_key(token: Option<&str>) -> String {
    match token {
        None => "none".into(),
        Some(t) => match token_subject(t) {
            Some(sub) => format!("sub:{sub}"),
            None => {
                let hash =
                    t.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
                format!("opaque:{hash:016x}")
            }
        },
    }
}

impl<S: LocalStore, T: Transport, C: Clock> Engine<S, T, C> {
    /// The transport, once it is sure that its token is for the replica's
    /// user (asking the server about a token not seen before).
    pub(crate) async fn bound_transport(&self) -> Result<&T> {
        let transport = self.transport()?;
        let mut tx = self.store.begin(Access::Read).await?;
        let (user, seen) = (tx.meta(keys::USER_ID).await?, tx.meta(USER_TOKEN).await?);
        drop(tx);
        if user.is_some() && seen.as_deref() != Some(token_key(transport.token().as_deref()).as_str()) {
            let status = transport.status(None).await?;
            self.bind_user(&status.user_id, transport).await?;
        }
        Ok(transport)
    }

    /// Binds the replica to `user` (the server's answer for the transport's
    /// token), or refuses when it already belongs to another.
    pub(crate) async fn bind_user(&self, user: &str, transport: &T) -> Result<()> {
        let mut tx = self.store.begin(Access::Write).await?;
        if let Some(bound) = tx.meta(keys::USER_ID).await?.filter(|bound| bound != user) {
            return Err(Error::WrongUser { replica_user: bound, token_user: user.to_owned() });
        }
        tx.set_meta(keys::USER_ID, user).await?;
        tx.set_meta(USER_TOKEN, &token_key(transport.token().as_deref())).await?;
        tx.commit().await
    }

    /// Before the first sync (or the first since the replica learned to keep
    /// its user): the server's policies, horizon and the replica's user.
    /// Returns the server's head when it asked for it.
    pub(crate) async fn learn_server(&self, transport: &T) -> Result<Option<u64>> {
        let state = replica::sync_state(&mut self.store.begin(Access::Read).await?).await?;
        if state.policies.is_some() && state.user_id.is_some() {
            return Ok(None);
        }
        let status = transport.status(Some(self.device.as_str())).await?;
        self.observe_server_time(status.server_time).await?;
        self.bind_user(&status.user_id, transport).await?;
        let mut tx = self.store.begin(Access::Write).await?;
        replica::set_policies(&mut tx, &status.policies).await?;
        tx.set_meta(keys::HORIZON, &status.horizon.to_string()).await?;
        tx.commit().await?;
        Ok(Some(status.head))
    }

    /// The server's conflict records (this user's), a page from `since`.
    pub async fn conflicts(&self, since: u64, limit: Option<u64>) -> Result<ConflictsResponse> {
        self.bound_transport().await?.conflicts(since, limit).await
    }

    /// Deletes the replica: confirmed state, outbox, journal, sync state and
    /// the user it belongs to. The device keeps its id and its clock (so its
    /// stamps keep increasing) and the server URL. Refused while changes are
    /// pending or failed, unless `force`.
    pub async fn reset(&self, force: bool) -> Result<()> {
        let _guard = self.sync_lock.lock().await;
        let mut tx = self.store.begin(Access::Write).await?;
        let (pending, failed) = tx.outbox_counts().await?;
        if (pending > 0 || failed > 0) && !force {
            return Err(Error::PendingChanges { pending, failed });
        }
        tx.clear_all(&[keys::DEVICE_ID, keys::SERVER_URL, keys::CLOCK, keys::CLOCK_OFFSET_MS]).await?;
        tx.commit().await?;
        self.emit(Origin::Reset, Vec::new());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", b64(r#"{"alg":"HS256"}"#), b64(claims))
    }

    #[test]
    fn a_jwt_is_known_by_its_subject_and_anything_else_by_a_fingerprint() {
        assert_eq!(token_subject(&jwt(r#"{"sub":"alice","exp":1}"#)).as_deref(), Some("alice"));
        assert_eq!(token_key(Some(&jwt(r#"{"sub":"alice","exp":2}"#))), "sub:alice");
        assert_eq!(token_subject("not.a-jwt"), None);
        assert_eq!(token_subject(&jwt(r#"{"exp":1}"#)), None);
        assert_eq!(token_key(None), "none");
        let opaque = token_key(Some("s3cret"));
        assert!(opaque.starts_with("opaque:") && !opaque.contains("s3cret"), "{opaque}");
        assert_ne!(opaque, token_key(Some("s3cret2")));
    }
}
