//! [`Client::conflicts`]: the server's record of the changes that lost, for
//! an app (or `deltasync client conflicts`) to show.

use deltasync_protocol::wire::ConflictsResponse;

use crate::client::Client;
use crate::error::Result;

impl Client {
    /// One page of the conflict records of this user's dataset, oldest first:
    /// the records after record id `since` (0 for the first page), at most
    /// `limit` of them (the server's default, 100, when `None`; the server
    /// takes at most 1000). Pass the answer's `cursor` as `since` to read the
    /// next page while `has_more` is true.
    ///
    /// The records are the server's: every change that lost in part or whole,
    /// from any device, not only this one's.
    pub async fn conflicts(&self, since: u64, limit: Option<u64>) -> Result<ConflictsResponse> {
        self.api()?.conflicts(since, limit).await
    }
}
