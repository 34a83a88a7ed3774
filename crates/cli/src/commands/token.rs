//! `deltasync token`: mint an HS256 token for `--auth jwt`.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Args;
use deltasync_protocol::UserId;
use deltasync_server::auth::{mint_token, read_secret};

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

/// Parses `30s`, `15m`, `24h`, `7d` into seconds.
pub fn parse_ttl(s: &str) -> anyhow::Result<u64> {
    let (digits, unit) = s.split_at(s.len().saturating_sub(1));
    let n: u64 =
        digits.parse().with_context(|| format!("--ttl must be an integer followed by s, m, h or d, got {s:?}"))?;
    let factor = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("--ttl must be an integer followed by s, m, h or d, got {s:?}"),
    };
    n.checked_mul(factor).context("--ttl is too long")
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
