//! A real PostgreSQL server per test, from Debian's `postgresql` package:
//! its own data directory in a temporary folder, on a loopback port, with
//! password authentication over TCP. A test may stop and start it to see
//! what its code does while the database is down.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); hack/deps.sh installs it"
    )]
    NotInstalled,
    #[error("{what}: {detail}")]
    Command { what: String, detail: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// The binaries of the newest installed major version.
pub fn bin_dir() -> Result<PathBuf, Error> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| Error::NotInstalled)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b).ok_or(Error::NotInstalled)
}

pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    password: String,
    /// PostgreSQL refuses to run as root: as root, run it as `postgres`.
    as_postgres: bool,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Postgres {
    /// initdb and start a fresh server.
    pub async fn start() -> Result<Self, Error> {
        let bin = bin_dir()?;
        let dir = std::env::temp_dir().join(format!(
            "dishpatch-pg-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("run"))?;
        let as_postgres = std::fs::metadata("/proc/self")?.uid() == 0;
        let password = format!("pw{:x}{:x}", std::process::id(), rand_u64());
        std::fs::write(dir.join("pwfile"), &password)?;
        if as_postgres {
            run(
                "chown",
                Command::new("chown").arg("-R").arg("postgres:").arg(&dir),
            )
            .await?;
        }
        let pg = Self {
            port: crate::net::free_port(),
            dir,
            bin,
            password,
            as_postgres,
        };
        let data = pg.dir.join("data");
        let mut initdb = pg.command("initdb");
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "dishpatch",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pg.dir.join("pwfile").display()))
            .args(["-E", "UTF8", "--no-sync"]);
        run("initdb", &mut initdb).await?;
        pg.resume().await?;
        Ok(pg)
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    /// `postgres://` URL of the `postgres` database, over TCP with a password.
    pub fn url(&self) -> String {
        format!(
            "postgres://dishpatch:{}@127.0.0.1:{}/postgres",
            self.password, self.port
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts the server again after `stop` (same data, same port).
    pub async fn resume(&self) -> Result<(), Error> {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c synchronous_commit=off",
            self.port,
            self.dir.join("run").display()
        );
        let mut c = self.command("pg_ctl");
        c.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-o", &opts, "-w", "-t", "60", "-l"])
            .arg(self.dir.join("server.log"))
            .arg("start");
        run("pg_ctl start", &mut c).await
    }

    /// Stops the server (fast shutdown: connections are closed at once).
    pub async fn stop(&self) -> Result<(), Error> {
        let mut c = self.command("pg_ctl");
        c.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-w", "stop"]);
        run("pg_ctl stop", &mut c).await
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let mut c = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(pg_ctl);
            c
        } else {
            std::process::Command::new(pg_ctl)
        };
        let _ = c
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn run(what: &str, c: &mut Command) -> Result<(), Error> {
    let out = c.output().await?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Command {
        what: what.to_string(),
        detail: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    })
}

/// Enough randomness for a throwaway password, without a dependency.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}
