//! The façade as tests drive it from outside.

use std::ffi::OsStr;
use std::path::Path;

/// A `role` token for `sub` (email `sub@example.com`) valid for `ttl`,
/// minted by running `bin token --key-file key_file`, so tests sign with
/// exactly the code the façade verifies with. Panics with the binary's stderr
/// if it fails.
///
/// The façade's jwt tests run `token` with other arguments on purpose
/// (`--key-dir`, no `--email`, issuer/audience from the environment) and keep
/// their own commands.
pub async fn mint_token(
    bin: impl AsRef<OsStr>,
    key_file: &Path,
    role: &str,
    sub: &str,
    ttl: &str,
) -> String {
    let out = tokio::process::Command::new(bin.as_ref())
        .args(["token", "--role", role, "--sub", sub, "--ttl", ttl])
        .arg("--key-file")
        .arg(key_file)
        .args(["--email", &format!("{sub}@example.com")])
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {} token: {e}", bin.as_ref().to_string_lossy()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap_or_else(|e| panic!("token is not UTF-8: {e}"))
        .trim()
        .to_string()
}
