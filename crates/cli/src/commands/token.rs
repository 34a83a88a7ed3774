//! `deltasync token`: mint an HS256 token for `--auth jwt`.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Args;
use deltasync_protocol::UserId;
use deltasync_server::auth::{mint_token, read_secret};
use deltasync_server::config::parse_duration;

/// Flags of `deltasync token`.
#[derive(Args, Debug)]
pub struct TokenArgs {
    /// The user id the token names (its `sub`): 1–128 characters, no control characters.
    #[arg(long)]
    user: String,
    /// File holding the HS256 secret (the same file the server reads).
    #[arg(long, value_name = "FILE")]
    secret_file: PathBuf,
    /// How long the token is valid: an integer followed by s, m, h or d.
    #[arg(long, default_value = "24h", value_name = "DURATION")]
    ttl: String,
}

/// Parses `30s`, `15m`, `24h`, `7d` into seconds (the syntax of the config file's durations).
pub fn parse_ttl(s: &str) -> anyhow::Result<u64> {
    Ok(parse_duration(s).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?.as_secs())
}

/// Prints the token alone on stdout.
pub fn run(args: TokenArgs) -> anyhow::Result<()> {
    let user = UserId::parse(args.user.as_str()).map_err(|e| anyhow::anyhow!("--user: {e}"))?;
    let ttl = parse_ttl(&args.ttl)?;
    let secret = read_secret(&args.secret_file)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    println!("{}", mint_token(&secret, &user, now, ttl));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_ttl;

    #[test]
    fn ttl_units() {
        assert_eq!(parse_ttl("30s").unwrap(), 30);
        assert_eq!(parse_ttl("15m").unwrap(), 900);
        assert_eq!(parse_ttl("24h").unwrap(), 86_400);
        assert_eq!(parse_ttl("7d").unwrap(), 604_800);
        for bad in ["", "h", "10", "1.5h", "-1h", "10w"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }
}
