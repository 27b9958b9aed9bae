//! Writes the man pages (`man/`) and shell completions (`completions/`) generated from the
//! clap command. Run it after changing the command line, and commit the result:
//!
//! ```sh
//! cargo run --example generate-docs            # rewrite man/ and completions/
//! cargo run --example generate-docs -- --check # exit 1 and list what is stale
//! ```
//!
//! The test suite fails while the committed files differ from what this renders.

mod docs;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    let check = std::env::args().skip(1).any(|a| a == "--check");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = docs::generated(orchctl::cli::command());
    let wanted: BTreeSet<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
    let mut stale = Vec::new();
    for (rel, bytes) in &files {
        let path = root.join(rel);
        if std::fs::read(&path).ok().as_deref() != Some(bytes.as_slice()) {
            stale.push(rel.display().to_string());
            if !check {
                std::fs::create_dir_all(path.parent().unwrap()).expect("creating the folder");
                std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
        }
    }
    // A page or completion of a command that no longer exists.
    for dir in docs::DIRS {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for e in entries.flatten() {
            let rel = Path::new(dir).join(e.file_name());
            if !wanted.contains(&rel) {
                stale.push(format!("{} (not generated any more)", rel.display()));
                if !check {
                    std::fs::remove_file(e.path()).expect("removing a stale file");
                }
            }
        }
    }
    if stale.is_empty() {
        println!(
            "man/ and completions/ are up to date ({} files)",
            files.len()
        );
        ExitCode::SUCCESS
    } else if check {
        eprintln!("stale: {}", stale.join(", "));
        eprintln!("run: cargo run --example generate-docs");
        ExitCode::FAILURE
    } else {
        for s in &stale {
            println!("wrote {s}");
        }
        ExitCode::SUCCESS
    }
}
