//! The users of OpenID Connect sign-in: the first valid token of an
//! (issuer, subject) pair makes a user with a new random UUID, and the same
//! pair maps to it ever after (on every instance, in both stores).

/// The user id of an (issuer `$1`, subject `$2`) pair, if it has one.
pub const FIND_USER: &str = "SELECT user_id FROM users WHERE issuer = $1 AND subject = $2";

/// Makes the user `$1` of issuer `$2` and subject `$3` at `$4` (ms) unless
/// the pair has one: two instances signing in the same pair at once keep the first.
pub const CREATE_USER: &str = "INSERT INTO users (user_id, issuer, subject, created_at) VALUES ($1, $2, $3, $4) \
     ON CONFLICT (issuer, subject) DO NOTHING";

/// The user id read from the store, checked.
pub fn user_id(text: &str) -> Result<deltasync_protocol::UserId, crate::store::StoreError> {
    deltasync_protocol::UserId::parse(text)
        .map_err(|e| crate::store::StoreError::Corrupt(format!("users.user_id {text:?}: {e}")))
}

/// A fresh user id: a random (version 4) UUID.
pub fn new_user_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
