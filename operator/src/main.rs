//! `dishpatch-operator`: the operator binary.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "dishpatch-operator", version, about = "The dishpatch operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the CRDs generated from the Rust types into a directory.
    Crds {
        /// Directory to write `<plural>.dishpatch.dev.yaml` files into.
        #[arg(long, default_value = "crds")]
        out_dir: PathBuf,
        /// Write nothing; fail if the directory differs from the types.
        #[arg(long)]
        check: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crds { out_dir, check } => crds(&out_dir, check),
    }
}

fn crds(out_dir: &Path, check: bool) -> anyhow::Result<()> {
    let files = dishpatch_api::crd_files().context("rendering CRDs")?;
    let mut stale = Vec::new();
    for file in &files {
        let path = out_dir.join(&file.file_name);
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current == file.contents {
            continue;
        }
        if check {
            stale.push(path.display().to_string());
        } else {
            std::fs::create_dir_all(out_dir)
                .with_context(|| format!("creating {}", out_dir.display()))?;
            std::fs::write(&path, &file.contents)
                .with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    if !stale.is_empty() {
        bail!(
            "CRDs differ from the Rust types: {}; run `make crds`",
            stale.join(", ")
        );
    }
    Ok(())
}
